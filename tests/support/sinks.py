"""A Sink that keeps readings in memory, for driver contract tests that run without the agent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from agent.core.types import Reading
from drivers.base import Source, SourceState


class CollectingSink:
    """Collects readings; `wait_for` waits (with a timeout, never a sleep) for a condition."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.keys: list[str] = []
        self._changed = asyncio.Event()

    async def submit(self, reading: Reading) -> None:
        self.readings.append(reading)
        self._changed.set()

    async def submit_many(self, readings: Sequence[Reading], key: str | None = None) -> None:
        if key is not None:
            self.keys.append(key)
        self.readings.extend(readings)
        self._changed.set()

    def of_type(self, type_: str) -> list[Reading]:
        return [r for r in self.readings if r.type == type_]

    async def wait_for(
        self, predicate: Callable[[list[Reading]], bool], timeout: float = 10.0
    ) -> list[Reading]:
        async def _wait() -> None:
            while not predicate(self.readings):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout)
        return self.readings


@contextlib.asynccontextmanager
async def running(source: Source, sink: CollectingSink) -> AsyncIterator[asyncio.Task[None]]:
    """`source` runs into `sink` for the block (its task is yielded); then it is cancelled and
    must have reached STOPPED."""
    task = asyncio.create_task(source.run(sink), name=source.name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert source.health.state is SourceState.STOPPED


def has(type_: str, value: Any = None) -> Callable[[list[Reading]], bool]:
    """A `wait_for` predicate: a reading of `type_` (with `value`, when given) arrived."""
    return lambda rs: any(r.type == type_ and (value is None or r.value == value) for r in rs)
