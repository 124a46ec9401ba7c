"""Configuration of the CoAP ingest source (`[sources.coap]`). Kept apart from drivers.coap so
that loading a config does not import aiocoap unless CoAP ingest is configured."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from drivers.base import TELEMETRY
from drivers.configbase import StrictModel

__all__ = ["CoapIngestConfig", "CoapSensorConfig"]


class CoapSensorConfig(StrictModel):
    """One IP sensor: its name (readings come from ``coap.<name>``) and where it may post from."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(min_length=1)
    priority: int = Field(default=TELEMETRY, ge=0, le=3)

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
    [[sources.coap.sensors]]
    name = "atm1"
    allow = ["192.168.10.20", "fd00:10::/64"]
    priority = 2
    """

    name: str = Field(default="lan", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    bind: str = "::"
    port: int = Field(default=5683, ge=0, le=65535)
    max_payload: int = Field(default=8192, ge=64, le=1 << 20)
    max_records: int = Field(default=256, ge=1, le=100_000)
    sensors: tuple[CoapSensorConfig, ...] = ()
