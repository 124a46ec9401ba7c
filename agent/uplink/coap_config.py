"""Configuration of the CoAP uplink (`[uplink.coap]`). Kept apart from agent.uplink.coap so
that loading a config does not import aiocoap and its OSCORE stack (tens of MB on a Pi) unless
the CoAP uplink is configured."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from agent.core.config import StrictModel

__all__ = ["CoapOscoreConfig", "CoapUplinkConfig"]


class CoapOscoreConfig(StrictModel):
    """``[uplink.coap.oscore]``: the gateway's half of a pre-shared OSCORE context."""

    context: Path  # directory from provisioning; the agent must be able to write sequence.json


class CoapUplinkConfig(StrictModel):
    """TOML::

    [uplink.coap]
    base = "coap://platform.bank.example:5683"
    timeout = 20.0         # seconds for one batch exchange (all blocks) before "down"
    probe_interval = 15.0  # idle liveness probe (GET /.well-known/core)
    [uplink.coap.oscore]   # OSCORE (RFC 8613); without it `insecure = true` is required
    context = "/var/lib/branch-agent/oscore"
    """

    base: str
    insecure: bool = False
    oscore: CoapOscoreConfig | None = None
    timeout: float = Field(default=20.0, gt=0, le=300)
    probe_interval: float = Field(default=15.0, gt=0, le=3600)

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
