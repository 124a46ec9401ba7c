"""The Sink the drivers see (drivers.base.Sink): readings through the pipeline into the
outbox."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agent.core.types import Event, Reading
from agent.outbox import Outbox
from agent.runtime.pipeline import Pipeline

__all__ = ["PipelineSink"]


class PipelineSink:
    """The Sink drivers see: readings through the pipeline into the outbox. `submit` returns
    after the commit, so a driver that acknowledges its device afterwards never acknowledges an
    unsaved reading."""

    def __init__(self, pipeline: Pipeline, outbox: Outbox, monotonic: Callable[[], float],
                 on_committed: Callable[[Sequence[Event]], None] | None = None) -> None:
        self.pipeline = pipeline
        self.outbox = outbox
        self._mono = monotonic
        self._on_committed = on_committed
        self.accepted = 0

    async def _commit(self, events: list[Event], key: str | None = None) -> None:
        await self.outbox.append_many(events, key=key)
        self.accepted += len(events)
        if self._on_committed is not None:
            self._on_committed(events)

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
