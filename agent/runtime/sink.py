"""The Sink the drivers see (drivers.base.Sink): readings through the pipeline into the
outbox."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from agent.core.errors import RefusedError
from agent.core.types import TELEMETRY, Event, Reading
from agent.outbox import Outbox
from agent.runtime.pipeline import Pipeline

__all__ = ["MAX_WINDOW_EVENTS", "PipelineSink"]

log = structlog.get_logger(__name__)

MAX_WINDOW_EVENTS = 10_000  # telemetry waiting for its window before a driver is made to wait


class PipelineSink:
    """The Sink drivers see: readings through the pipeline into the outbox. `submit` returns
    after the commit, so a driver that acknowledges its device afterwards never acknowledges an
    unsaved reading: alarms, alerts and keyed appends (CoAP readings, answered 2.04).

    Telemetry and diagnostics with no key, when the outbox has a telemetry window
    (agent.outbox.writer), are handed over and `submit` returns at once: a poll loop is not held
    up for the window. Such a reading is accepted (counted in `accepted`) when its window
    commits; a full disk refuses it at once (RefusedError, as before); a refusal at its commit
    (the quota, rare) is counted in `refused_in_window` and in the outbox's `refused`, and
    logged, since no driver waits for it any more. At most `MAX_WINDOW_EVENTS` wait; beyond
    that the driver waits for the oldest."""

    def __init__(self, pipeline: Pipeline, outbox: Outbox, monotonic: Callable[[], float],
                 on_committed: Callable[[Sequence[Event]], None] | None = None) -> None:
        self.pipeline = pipeline
        self.outbox = outbox
        self._mono = monotonic
        self._on_committed = on_committed
        self.accepted = 0
        self.refused_in_window = 0
        self._waiting: dict[asyncio.Task[list[int]], int] = {}  # task -> its events
        self._waiting_events = 0

    async def _commit(self, events: list[Event], key: str | None = None) -> None:
        if (key is None and self.outbox.telemetry_window > 0
                and all(e.prio >= TELEMETRY for e in events)):
            await self._hand_over(events)
            return
        await self.outbox.append_many(events, key=key)
        self._committed(events)

    def _committed(self, events: Sequence[Event]) -> None:
        self.accepted += len(events)
        if self._on_committed is not None:
            self._on_committed(events)

    async def _hand_over(self, events: list[Event]) -> None:
        self.outbox.check_accepts(max(e.prio for e in events))  # a full disk: refused now
        while self._waiting_events >= MAX_WINDOW_EVENTS and self._waiting:
            await asyncio.wait(list(self._waiting), return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.ensure_future(self.outbox.append_many(events))
        self._waiting[task] = len(events)
        self._waiting_events += len(events)
        task.add_done_callback(lambda t: self._window_done(t, events))

    def _window_done(self, task: asyncio.Task[list[int]], events: Sequence[Event]) -> None:
        self._waiting_events -= self._waiting.pop(task, 0)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._committed(events)
        elif isinstance(exc, RefusedError):
            self.refused_in_window += len(events)
            log.warning("sink.refused_in_window", events=len(events), error=str(exc),
                        total=self.refused_in_window)
        else:  # the transaction failed (the writer logged why): these were never accepted
            log.error("sink.window_commit_failed", events=len(events), error=str(exc))

    async def submit(self, reading: Reading) -> None:
        events = self.pipeline.process(reading, self._mono())
        if events:
            await self._commit(events)

    async def submit_many(self, readings: Sequence[Reading], key: str | None = None) -> None:
        now = self._mono()
        events: list[Event] = []
        for r in readings:
            events.extend(self.pipeline.process(r, now))
        if events:
            await self._commit(events, key)

    async def flush_due(self) -> None:
        events = self.pipeline.due(self._mono())
        if events:
            await self._commit(events)
