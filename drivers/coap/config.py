"""Configuration of the CoAP ingest source (`[sources.coap]`). Kept apart from
drivers.coap.server so that loading a config does not import aiocoap unless CoAP ingest is
configured."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from agent.core.config import StrictModel
from agent.core.types import TELEMETRY

__all__ = ["CoapIngestConfig", "CoapSensorConfig"]


class CoapSensorConfig(StrictModel):
    """One IP sensor: its name (readings come from ``coap.<name>``) and where it may post from."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(min_length=1)
    priority: int = Field(default=TELEMETRY, ge=0, le=3)
    rate_limit_hz: float | None = Field(default=None, gt=0, le=10_000)  # None: the endpoint's
    rate_burst: int | None = Field(default=None, ge=1, le=100_000)  # None: the endpoint's

    @field_validator("allow", mode="before")
    @classmethod
    def _networks(cls, v: object) -> object:
        # "10.0.0.5" and "10.0.0.0/24" alike; strict=False would hide a typo'd host bit.
        if isinstance(v, list | tuple):
            return tuple(ipaddress.ip_network(x) if isinstance(x, str) else x for x in v)
        return v


class CoapIngestConfig(StrictModel):
    """The CoAP ingest endpoint. TOML::

    [sources.coap]
    name = "lan"                # source id coap.lan (health); readings: coap.<sensor>
    bind = "192.168.10.1"       # the LAN interface's address; "::" = every interface
    port = 5683
    max_payload = 8192          # bytes, after block-wise reassembly (4.13 above)
    max_records = 256           # records per request (4.13 above)
    rate_limit_hz = 5.0         # per sensor: requests (blocks) per second, 4.29 above ...
    rate_burst = 20             # ... after a burst of this many
    global_rate_hz = 50.0       # all datagrams together (any peer), dropped above ...
    global_burst = 100          # ... after a burst of this many
    max_concurrent = 32         # requests waiting for the outbox at once, 5.03 above
    [[sources.coap.sensors]]
    name = "atm1"
    allow = ["192.168.10.20", "fd00:10::/64"]
    priority = 2
    rate_limit_hz = 1.0         # optional: this sensor's own rate (and rate_burst)
    """

    name: str = Field(default="lan", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    bind: str = "::"
    port: int = Field(default=5683, ge=0, le=65535)
    max_payload: int = Field(default=8192, ge=64, le=1 << 20)
    max_records: int = Field(default=256, ge=1, le=100_000)
    rate_limit_hz: float = Field(default=5.0, gt=0, le=10_000)
    rate_burst: int = Field(default=20, ge=1, le=100_000)
    # aiocoap remembers each request for 247 s (~3 KB): this rate bounds that memory, too.
    global_rate_hz: float = Field(default=50.0, gt=0, le=100_000)
    global_burst: int = Field(default=100, ge=1, le=1_000_000)
    max_concurrent: int = Field(default=32, ge=1, le=10_000)
    sensors: tuple[CoapSensorConfig, ...] = ()
