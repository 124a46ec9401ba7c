"""UPSs watched through a NUT server (Network UPS Tools' upsd, TCP 3493): the UPS stays on its
NUT server (a NAS, the branch server), the gateway reads its variables over the network.

TOML shape (composed by agent.config under ``[[sources.nut]]``)::

    [[sources.nut]]
    name = "main"                  # source id nut.main
    host = "192.168.10.5"
    ups = "ups"                    # the UPS's name on that server (`upsc -l 192.168.10.5`)
    poll_interval_s = 5.0

Pure standard library (asyncio streams): importing this package is cheap.
"""

from __future__ import annotations

from drivers.nut.config import DEFAULT_VARIABLES, NutConfig, NutSourceList
from drivers.nut.source import NutSource, Reachability, build_sources, check_reachable

__all__ = [
    "DEFAULT_VARIABLES",
    "NutConfig",
    "NutSource",
    "NutSourceList",
    "Reachability",
    "build_sources",
    "check_reachable",
]
