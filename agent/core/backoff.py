"""Reconnecting without a thundering herd."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

__all__ = ["Backoff"]


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
