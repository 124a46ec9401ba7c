"""SNMP devices: a UPS network card (UPS-MIB, RFC 1628), a rack PDU's outlet table (APC
PowerNet-MIB), or a list of OIDs; SNMP v2c or v3 authPriv, polled over UDP.

TOML shape (composed by agent.config as ``[[sources.snmp]]``)::

    [[sources.snmp]]
    name = "ups"
    host = "192.0.2.10"
    version = "3"
    user = "branch-agent"
    auth_protocol = "SHA-256"
    auth_key_file = "/etc/branch-agent/snmp/ups.auth"
    priv_protocol = "AES"
    priv_key_file = "/etc/branch-agent/snmp/ups.priv"
    profile = "ups-mib"

Only the config model is imported here; pysnmp loads when a source polls.
"""

from __future__ import annotations

from typing import Annotated

from agent.core.config import unique_names
from drivers.snmp.config import SnmpConfig, SnmpOid
from drivers.snmp.source import (
    Reachability,
    SnmpAuthFailed,
    SnmpSource,
    SnmpUnavailable,
    build_sources,
    check_reachable,
    pdu_readings,
    ups_readings,
)

__all__ = [
    "Reachability",
    "SnmpAuthFailed",
    "SnmpConfig",
    "SnmpList",
    "SnmpOid",
    "SnmpSource",
    "SnmpUnavailable",
    "build_sources",
    "check_reachable",
    "pdu_readings",
    "ups_readings",
]


# The type of ``SourcesConfig.snmp``: the entries, with names unique.
SnmpList = Annotated[list[SnmpConfig], unique_names("snmp")]
