"""The one shape every driver has: readings out, health in, hardware from a factory.

`drivers/` is the ground floor: nothing here imports from `agent/`. A driver receives a
`Sink` (the agent's pipeline + outbox, seen through a narrow interface) and a `Clock`, and gets
its hardware (pin factory, serial port path, D-Bus address) from its own config and the
`SourceContext` the runtime builds.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ALARM",
    "ALERT",
    "DIAGNOSTIC",
    "TELEMETRY",
    "Backoff",
    "Clock",
    "DriverError",
    "Reading",
    "RefusedError",
    "Sink",
    "Source",
    "SourceContext",
    "SourceHealth",
    "SourceState",
    "SystemClock",
    "Value",
]

# Priorities (lower is more urgent). Part of the wire protocol: docs/PROTOCOL.md.
ALARM = 0
ALERT = 1
TELEMETRY = 2
DIAGNOSTIC = 3

Value = float | int | bool | str | Mapping[str, Any] | None


class DriverError(Exception):
    """Base of the errors a driver raises; the project's root error derives from it too."""


class RefusedError(DriverError, RuntimeError):
    """The outbox refused a reading (quota reached for that priority). The caller counts it.

    `retry_after` is a hint in seconds (CoAP ingest turns it into Max-Age on a 5.03).
    """

    def __init__(self, message: str, *, priority: int, retry_after: float = 30.0) -> None:
        super().__init__(message)
        self.priority = priority
        self.retry_after = retry_after


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


class Clock(Protocol):
    """Wall time, monotonic time and whether the wall clock is synchronised (a Pi has no RTC)."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def synchronized(self) -> bool: ...


class SystemClock:
    """The real clock. `synchronized` is decided by a probe chosen in config (see agent.clock)."""

    def __init__(self, synchronized: Callable[[], bool] | None = None) -> None:
        self._sync = synchronized or (lambda: True)

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def synchronized(self) -> bool:
        return self._sync()


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


class Backoff:
    """Jittered exponential backoff ("equal jitter"): sleep a random time in [c/2, c] where
    c = min(cap, base * 2^attempt).

    Used by every driver and uplink so that a branch full of gateways does not reconnect in
    lockstep after a WAN outage.
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()
        self._sleep = sleep

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    async def wait(self) -> float:
        delay = self.next_delay()
        await self._sleep(delay)
        return delay

    def reset(self) -> None:
        self.attempt = 0
