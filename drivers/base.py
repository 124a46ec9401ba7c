"""The one shape every driver has: readings out, health in, hardware from a factory.

Of the agent, drivers see only `agent.core` (types, errors, clock, backoff, config base). A
driver receives a `Sink` (the agent's pipeline + outbox, seen through a narrow interface) and a
`Clock`, and gets its hardware (pin factory, serial port path, D-Bus address) from its own
config and the `SourceContext` the runtime builds.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from agent.core.clock import Clock
from agent.core.types import Reading

__all__ = ["Sink", "Source", "SourceContext", "SourceHealth", "SourceState"]


class Sink(Protocol):
    """Where a driver hands its readings. Awaiting `submit` returns only when every event the
    readings became is durably committed (or the pipeline filtered them out), so a driver that
    acknowledges its device after `submit` (CoAP ingest) never acknowledges an unsaved reading.
    Raises `RefusedError` when the outbox refuses that priority."""

    async def submit(self, reading: Reading) -> None: ...

    async def submit_many(self, readings: Sequence[Reading], key: str | None = None) -> None:
        """`key`, when given, makes the submission idempotent across agent crashes: readings
        already committed under that key (e.g. a CoAP request retransmitted to a restarted
        agent) are not stored again."""


class SourceState(enum.StrEnum):
    STARTING = "starting"
    ONLINE = "online"
    OFFLINE = "offline"
    STOPPED = "stopped"


@dataclass(slots=True)
class SourceHealth:
    """What `branch-agent status` and the status topic show for one source."""

    name: str
    kind: str
    state: SourceState = SourceState.STARTING
    last_reading: float | None = None
    readings: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    # Counters that are not errors (BLE: adverts dropped by the privacy filter, duplicates).
    stats: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.errors[what] = self.errors.get(what, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": str(self.state),
            "last_reading": self.last_reading,
            "readings": self.readings,
            "errors": dict(self.errors),
            "stats": dict(self.stats),
            "detail": self.detail,
        }


@runtime_checkable
class Source(Protocol):
    """A driver instance. `run` lives until cancelled, reconnects by itself and never raises for
    bad input or an unplugged device (it reports through `health` and `source.offline`)."""

    name: str
    health: SourceHealth

    async def run(self, sink: Sink) -> None: ...


@dataclass(slots=True)
class SourceContext:
    """What the runtime gives every driver factory: the clock, and the hardware factories."""

    clock: Clock
    pin_factory: Any = None  # a gpiozero Factory; None means gpiozero's default (lgpio on a Pi)
    extra: dict[str, Any] = field(default_factory=dict)
