"""The uplinks' config models (`[uplink.mqtt]`, `[uplink.coap]`) and MQTT topics, apart from the
uplinks themselves: loading a config imports neither paho nor aiocoap and its OSCORE stack
(tens of MB on a Pi) unless that uplink is configured (tests/test_layering.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from agent.core.config import StrictModel

__all__ = ["CoapOscoreConfig", "CoapUplinkConfig", "MqttTlsConfig", "MqttUplinkConfig", "topics"]


class MqttTlsConfig(StrictModel):
    """Mutual TLS: the bank's CA (verifies the broker), the gateway's certificate and key."""

    ca: Path
    cert: Path
    key: Path


class MqttUplinkConfig(StrictModel):
    host: str
    port: int = Field(default=8883, ge=1, le=65535)
    client_id: str | None = None  # None -> "branch-agent-{gw}" (stable: the session is keyed by it)
    topic_prefix: str = "bank/v1"
    keepalive: int = Field(default=30, ge=5, le=65535)
    inflight: int = Field(default=8, ge=1, le=65535)
    tls: MqttTlsConfig | None = None
    insecure: bool = False  # plain TCP; only for the simulator and tests
    connect_timeout: float = Field(default=10.0, gt=0)
    backoff_base: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=60.0, gt=0)
    protocol: Literal["v5", "v311"] = "v5"
    session_expiry: int = Field(default=7 * 24 * 3600, ge=0)  # MQTT 5 only; seconds
    # path supervision (docs/PROTOCOL.md 7): a signed heartbeat every interval, answered
    # within the timeout, on this path whether or not it carries the batches now
    heartbeat_interval_s: float = Field(default=60.0, gt=0, le=86400)
    heartbeat_timeout_s: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _check(self) -> MqttUplinkConfig:
        if self.tls is None and not self.insecure:
            raise ValueError(
                "uplink.mqtt: no [tls] section; the bank's broker requires mutual TLS. "
                "Set tls = {ca, cert, key}, or insecure = true for a local test broker only"
            )
        p = self.topic_prefix
        if not p or p.startswith("/") or p.endswith("/") or "+" in p or "#" in p:
            raise ValueError(f"uplink.mqtt.topic_prefix {p!r}: no wildcards, no leading or "
                             "trailing '/'")
        return self


def topics(prefix: str, gw: str) -> dict[str, str]:
    """The gateway's topics (docs/PROTOCOL.md, "MQTT binding")."""
    return {k: f"{prefix}/{gw}/{k}"
            for k in ("batch", "alarm", "ack", "status", "cmd", "cmd-ack", "heartbeat",
                      "hb-ack")}


class CoapOscoreConfig(StrictModel):
    """``[uplink.coap.oscore]``: the gateway's half of a pre-shared OSCORE context."""

    context: Path  # directory from provisioning; the agent must be able to write sequence.json


class CoapUplinkConfig(StrictModel):
    """TOML::

    [uplink.coap]
    base = "coap://platform.bank.example:5683"
    timeout = 20.0         # seconds for one batch exchange (all blocks) before "down"
    probe_interval = 15.0  # idle liveness probe (GET /.well-known/core)
    heartbeat_interval_s = 60.0  # signed path heartbeat (docs/PROTOCOL.md 7)
    heartbeat_timeout_s = 10.0   # its answer is due within this
    [uplink.coap.oscore]   # OSCORE (RFC 8613); without it `insecure = true` is required
    context = "/var/lib/branch-agent/oscore"
    """

    base: str
    insecure: bool = False
    oscore: CoapOscoreConfig | None = None
    timeout: float = Field(default=20.0, gt=0, le=300)
    probe_interval: float = Field(default=15.0, gt=0, le=3600)
    heartbeat_interval_s: float = Field(default=60.0, gt=0, le=86400)
    heartbeat_timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("coap", "coaps") or not parts.hostname:
            raise ValueError("base must look like coap://host[:port][/path]")
        if parts.query or parts.fragment:
            raise ValueError("base takes no query or fragment")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _security(self) -> CoapUplinkConfig:
        if self.base.startswith("coaps:"):
            raise ValueError(
                "coaps:// (DTLS) is not supported: use coap:// with an [uplink.coap.oscore] "
                "context, or insecure = true (batches stay signed end to end)"
            )
        if self.oscore is None and not self.insecure:
            raise ValueError(
                "plain coap:// carries signed but not confidential batches: give an "
                "[uplink.coap.oscore] context, or set insecure = true to accept that"
            )
        return self
