"""A synthetic source: readings at a fixed rate, for commissioning, load tests and benchmarks.

An installer can enable it to watch a reading travel to the platform before any sensor is wired
(`branch-agent doctor` and the runbook use it); tests and `bench/` use it as a load generator.
Values follow a slow sine so that deadband rules have something to do.
"""

from __future__ import annotations

import asyncio
import math
from typing import Literal

import structlog
from pydantic import Field

from agent.core.config import StrictModel
from agent.core.errors import RefusedError
from agent.core.types import TELEMETRY, Reading
from drivers.base import Sink, Source, SourceContext, SourceHealth, SourceState

__all__ = ["SyntheticConfig", "SyntheticSource", "build_sources"]

log = structlog.get_logger(__name__)


class SyntheticConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9_\-]+$")
    rate_hz: float = Field(default=1.0, gt=0, le=100_000)
    type: str = "synthetic"
    unit: str | None = None
    priority: int = Field(default=TELEMETRY, ge=0, le=3)
    count: int | None = Field(default=None, ge=0, description="stop after this many readings")
    batch: int = Field(default=1, ge=1, le=10_000, description="readings handed over per submit")
    waveform: Literal["sine", "counter"] = "sine"


class SyntheticSource:
    def __init__(self, cfg: SyntheticConfig, ctx: SourceContext) -> None:
        self.cfg = cfg
        self.name = f"synthetic.{cfg.name}"
        self.health = SourceHealth(name=self.name, kind="synthetic")
        self._clock = ctx.clock

    def _value(self, n: int) -> float:
        if self.cfg.waveform == "counter":
            return float(n)
        return round(20.0 + 5.0 * math.sin(n / 60.0), 3)

    async def run(self, sink: Sink) -> None:
        cfg = self.cfg
        self.health.state = SourceState.ONLINE
        interval = cfg.batch / cfg.rate_hz
        n = 0
        next_at = self._clock.monotonic()
        while cfg.count is None or n < cfg.count:
            size = cfg.batch if cfg.count is None else min(cfg.batch, cfg.count - n)
            now = self._clock.time()
            readings = [
                Reading(
                    source=self.name,
                    type=cfg.type,
                    value=self._value(n + i),
                    unit=cfg.unit,
                    ts=now,
                    priority=cfg.priority,
                )
                for i in range(size)
            ]
            try:
                await sink.submit_many(readings)
            except RefusedError:
                self.health.count("refused", size)
            n += size
            self.health.readings = n
            self.health.last_reading = now
            next_at += interval
            delay = next_at - self._clock.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = self._clock.monotonic()  # fell behind: do not burst to catch up
                await asyncio.sleep(0)
        self.health.state = SourceState.STOPPED
        log.info("synthetic.done", source=self.name, readings=n)


def build_sources(cfgs: list[SyntheticConfig], ctx: SourceContext) -> list[Source]:
    return [SyntheticSource(c, ctx) for c in cfgs]
