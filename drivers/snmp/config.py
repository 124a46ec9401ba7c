"""The SNMP devices' config model (``[[sources.snmp]]``: a UPS network card on the UPS-MIB, a
rack PDU's outlet table, or a list of OIDs), apart from the driver: loading a config imports no
pysnmp.

Secrets (the v2c community, the v3 keys) are `SecretStr` and may come from a file instead
(``*_file``, read when the source starts). Every check that involves them sits in a validator
of a *non-secret* field: pydantic attaches the input of the failing validator to its error, and
agent.config prints that input, so a model-level check would print the whole entry, keys
included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from agent.core.config import StrictModel, duplicates, host_port
from agent.core.types import TELEMETRY

__all__ = [
    "AUTH_PROTOCOLS",
    "NAME_PATTERN",
    "PRIV_PROTOCOLS",
    "AuthProtocol",
    "PrivProtocol",
    "Profile",
    "SnmpConfig",
    "SnmpOid",
]

# Source names become part of source ids ("snmp.ups") and MQTT topics: keep them plain.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"

# Names as net-snmp's snmpd.conf / snmpget -a / -x spell them.
AUTH_PROTOCOLS = ("MD5", "SHA", "SHA-224", "SHA-256", "SHA-384", "SHA-512")
# AES-192/AES-256: Blumenthal key extension (net-snmp's AES-192, AES-256); the -C variants:
# Reeder key extension (Cisco; net-snmp's AES-192-C, AES-256-C).
PRIV_PROTOCOLS = ("DES", "3DES", "AES", "AES-192", "AES-256", "AES-192-C", "AES-256-C")
AuthProtocol = Literal["MD5", "SHA", "SHA-224", "SHA-256", "SHA-384", "SHA-512"]
PrivProtocol = Literal["DES", "3DES", "AES", "AES-192", "AES-256", "AES-192-C", "AES-256-C"]
Profile = Literal["ups-mib", "pdu-outlets"]


class SnmpOid(StrictModel):
    """One scalar object polled every `poll_interval_s`: numbers become ``value * scale``
    with `unit` (SenML), text stays text."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")  # the reading type
    oid: str = Field(pattern=r"^\.?[0-9]+(\.[0-9]+)+$")
    unit: str | None = None
    scale: float = 1.0
    priority: int = Field(default=TELEMETRY, ge=0, le=3)

    @field_validator("oid")
    @classmethod
    def _plain(cls, value: str) -> str:
        return value.lstrip(".")


def _one_of(info: ValidationInfo, inline: str, path: Path | None, wanted: bool) -> None:
    """`inline` (a SecretStr field) and its ``_file`` twin: exactly one when `wanted`, else
    neither. The message names the keys, never their values."""
    given = info.data.get(inline) is not None, path is not None
    if wanted and given.count(True) != 1:
        raise ValueError(f"exactly one of '{inline}' or '{inline}_file'")
    if not wanted and any(given):
        raise ValueError(f"'{inline}' / '{inline}_file' do not apply to this SNMP version")


class SnmpConfig(StrictModel):
    """``[[sources.snmp]]``: one SNMP agent (UPS card, PDU) polled over UDP; id ``snmp.<name>``.

    SNMPv3 is authPriv only: the gateway sits on a branch LAN, and without privacy the UPS
    and PDU state (and with v2c the community) crosses it in clear text."""

    name: str = Field(pattern=NAME_PATTERN)
    host: str = Field(min_length=1)
    port: int = Field(default=161, ge=1, le=65535)
    version: Literal["2c", "3"] = "2c"
    # v2c
    community: SecretStr | None = None
    community_file: Path | None = None
    # v3 (USM, authPriv)
    user: str | None = Field(default=None, min_length=1, max_length=32)
    auth_protocol: AuthProtocol = "SHA"
    auth_key: SecretStr | None = None
    auth_key_file: Path | None = None
    priv_protocol: PrivProtocol = "AES"
    priv_key: SecretStr | None = None
    priv_key_file: Path | None = None
    # what to poll
    profile: Profile | None = None
    oids: list[SnmpOid] = []
    max_outlets: int = Field(default=48, ge=1, le=1024)  # rows of the outlet table read
    poll_interval_s: float = Field(default=10.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)  # per request try
    retries: int = Field(default=1, ge=0, le=10)  # further tries before a poll counts as lost
    backoff_base_s: float = Field(default=1.0, gt=0)
    backoff_cap_s: float = Field(default=60.0, gt=0)

    @field_validator("community_file")
    @classmethod
    def _community(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        _one_of(info, "community", value, info.data.get("version") == "2c")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("version") == "3" and value is None:
            raise ValueError("a 'user' (SNMPv3 needs one)")
        if info.data.get("version") == "2c" and value is not None:
            raise ValueError("no 'user' with version '2c' (SNMPv3 only)")
        return value

    @field_validator("auth_key_file")
    @classmethod
    def _auth(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        _one_of(info, "auth_key", value, info.data.get("version") == "3")
        return value

    @field_validator("priv_key_file")
    @classmethod
    def _priv(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        _one_of(info, "priv_key", value, info.data.get("version") == "3")
        return value

    @field_validator("oids")
    @classmethod
    def _something_to_poll(cls, value: list[SnmpOid], info: ValidationInfo) -> list[SnmpOid]:
        if not value and info.data.get("profile") is None:
            raise ValueError("a 'profile' (ups-mib, pdu-outlets) or a list of 'oids'")
        if dups := duplicates(o.name for o in value):
            raise ValueError(f"duplicate oid names: {', '.join(dups)}")
        return value

    @property
    def where(self) -> str:
        return host_port(self.host, self.port)
