"""A Sink that keeps readings in memory, for driver contract tests that run without the agent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from agent.core.types import Reading


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
