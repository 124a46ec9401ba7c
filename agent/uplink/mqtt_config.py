"""`[uplink.mqtt]`: the MQTT uplink's config model and topics, apart from the uplink itself, so
that loading a config (check-config, status, the operator commands) does not import paho."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from agent.core.config import StrictModel

__all__ = ["MqttTlsConfig", "MqttUplinkConfig", "topics"]


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
    return {k: f"{prefix}/{gw}/{k}" for k in ("batch", "ack", "status", "cmd", "cmd-ack")}
