"""The one supervision loop every polled device source runs (serial, NUT, SNMP, Modbus TCP).

A subclass's `session` talks to the device while it is reachable, calls `connected()` once it
answers, and raises `DeviceUnavailable` when it is lost (unplugged, refused, not answering).
`run` turns that into one ``source.offline`` reading, a jittered backoff, and ``source.online``
on return; anything else `session` raises is a bug, logged and retried the same way, so one bad
device never stops the agent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import structlog

from agent.core.backoff import Backoff
from agent.core.clock import Clock
from agent.core.errors import DriverError, RefusedError
from agent.core.types import ALERT, TELEMETRY, Reading, Value
from drivers.base import Sink, SourceHealth, SourceState

__all__ = ["DeviceUnavailable", "Reachability", "SupervisedSource"]


@dataclass(frozen=True, slots=True)
class Reachability:
    """The doctor's verdict on one networked device (`check_reachable` in each IP driver):
    `detail` says what was seen, `fix` what to do when not `ok`."""

    ok: bool
    detail: str
    fix: str = ""


class DeviceUnavailable(DriverError, OSError):
    """The device cannot be reached or stopped answering."""


class SupervisedSource(ABC):
    """A device source with the shared supervision: id ``<kind>.<name>``; `where` (a port, a
    host:port) is what the logs name."""

    kind: str = "device"
    log_ns: str = "source"  # log events: <log_ns>.online, .offline, .session_failed

    def __init__(self, name: str, clock: Clock, *, where: str, backoff_base_s: float,
                 backoff_cap_s: float) -> None:
        self.name = f"{self.kind}.{name}"
        self.where = where
        self.health = SourceHealth(name=self.name, kind=self.kind)
        self.clock = clock
        self.log = structlog.get_logger(type(self).__module__).bind(source=self.name)
        self._backoff = Backoff(base=backoff_base_s, cap=backoff_cap_s)
        self._sink: Sink | None = None

    @abstractmethod
    async def session(self) -> None:
        """Talk to the device until it is lost (raise `DeviceUnavailable`)."""

    async def run(self, sink: Sink) -> None:
        self._sink = sink
        try:
            while True:
                try:
                    await self.session()
                    reason = "session ended"
                except DeviceUnavailable as exc:
                    reason = str(exc)
                    self.health.count("unavailable")
                except Exception as exc:  # a bug must not stop the agent; it is logged
                    reason = f"{type(exc).__name__}: {exc}"
                    self.health.count("internal")
                    self.log.exception(f"{self.log_ns}.session_failed")
                await self._went_offline(reason)
                await self._backoff.wait()
        finally:
            self.health.state = SourceState.STOPPED

    async def connected(self) -> None:
        """The device answers: mark online (and say so if it had been offline)."""
        self._backoff.reset()
        was_offline = self.health.state is SourceState.OFFLINE
        self.health.state = SourceState.ONLINE
        self.health.detail = ""
        if was_offline:
            self.log.info(f"{self.log_ns}.online", at=self.where)
            await self.emit("source.online", True, priority=ALERT)

    async def _went_offline(self, reason: str) -> None:
        self.health.detail = reason
        if self.health.state is SourceState.OFFLINE:
            return
        self.health.state = SourceState.OFFLINE
        self.log.warning(f"{self.log_ns}.offline", at=self.where, reason=reason)
        await self.emit("source.offline", reason, priority=ALERT)

    async def emit(
        self, type_: str, value: Value, *, unit: str | None = None, priority: int = TELEMETRY
    ) -> None:
        await self.emit_many([Reading(self.name, type_, value, unit, self.clock.time(), priority)])

    async def emit_many(self, readings: list[Reading]) -> None:
        if not readings or self._sink is None:
            return
        try:
            await self._sink.submit_many(readings)
        except RefusedError:
            self.health.count("refused", len(readings))
            return
        self.health.readings += len(readings)
        self.health.last_reading = readings[-1].ts
