"""The vocabulary every layer shares: priorities, readings (what a driver observes) and events
(what the pipeline makes of them, what the outbox stores and the platform receives)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALARM",
    "ALERT",
    "DIAGNOSTIC",
    "PRIORITIES",
    "TELEMETRY",
    "TQ_SYNCED",
    "TQ_UNSYNCED",
    "Event",
    "Priority",
    "Reading",
    "Value",
]


class Priority(enum.IntEnum):
    """Lower is more urgent. Part of the wire protocol (docs/PROTOCOL.md, `prio`)."""

    ALARM = 0
    ALERT = 1
    TELEMETRY = 2
    DIAGNOSTIC = 3

    @property
    def label(self) -> str:
        """The name people read (status, the demo): "alarm", "telemetry" ..."""
        return self.name.lower()


# Plain ints on the hot path: the outbox and the encoder compare and encode them per event,
# and an int is cheaper than an IntEnum there (`Priority(p).label` names one).
ALARM = int(Priority.ALARM)
ALERT = int(Priority.ALERT)
TELEMETRY = int(Priority.TELEMETRY)
DIAGNOSTIC = int(Priority.DIAGNOSTIC)
PRIORITIES = tuple(int(p) for p in Priority)

# Time quality of an event's capture time (`tq`): a Pi has no RTC.
TQ_SYNCED = 0
TQ_UNSYNCED = 1

Value = float | int | bool | str | Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Reading:
    """One observation from a driver, before the pipeline's rules.

    `source` is the configured source id (e.g. ``gpio.vault_door``), `type` what was observed
    (``contact``, ``temperature``, ``ups.on_battery``, ``source.offline`` ...). `ts` is the wall
    clock at capture (the driver's clock); `priority` is the driver's suggestion, the pipeline's
    rules may override it.
    """

    source: str
    type: str
    value: Value
    unit: str | None = None
    ts: float | None = None
    priority: int = TELEMETRY
    attrs: Mapping[str, Any] | None = None


@dataclass(slots=True)
class Event:
    """One event before commit. Field names follow the wire format (docs/PROTOCOL.md).

    Treated as immutable, but not declared frozen: a frozen dataclass's __init__ costs
    0.7 us more per event (1.1 vs 0.4), a tenth of the whole durable-ingest path
    (bench/outbox.py)."""

    src: str
    type: str
    v: Value
    t: float
    tq: int = TQ_SYNCED
    prio: int = TELEMETRY
    u: str | None = None
    attrs: Mapping[str, Any] | None = None

    @property
    def urgent(self) -> bool:
        """Alarms are committed at once, without waiting for the group-commit window."""
        return self.prio == ALARM
