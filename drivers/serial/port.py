"""Opening a serial port, and the one supervision loop every serial source runs.

A USB-serial adapter that is pulled out makes the device path vanish (open fails with
ENOENT) and an open port report EOF/EIO on read; a pty whose master side closed behaves the
same. Both are mapped to `PortUnavailable` here, in one place, and `PortSource.run` turns them
into one ``source.offline`` reading, a jittered backoff, and ``source.online`` on return.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

import structlog

from agent.core.backoff import Backoff
from agent.core.clock import Clock
from agent.core.errors import DriverError, RefusedError
from agent.core.types import ALERT, TELEMETRY, Reading, Value
from drivers.base import Sink, SourceHealth, SourceState
from drivers.serial.config import SerialPortConfig

__all__ = [
    "PortSource",
    "PortUnavailable",
    "SerialPortConfig",
    "open_port",
]


class PortUnavailable(DriverError, OSError):
    """The port cannot be opened or stopped working (unplugged, hung up, not answering)."""


async def open_port(
    cfg: SerialPortConfig, *, limit: int = 65536
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open `cfg.port` without blocking the loop; every open failure is `PortUnavailable`."""
    # Here, not at module level: loading a config imports no serial stack (tests/test_layering)
    from serial_asyncio_fast import open_serial_connection

    try:
        return await open_serial_connection(
            url=cfg.port,
            baudrate=cfg.baudrate,
            bytesize=cfg.bytesize,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
            limit=limit,
        )
    except (OSError, ValueError) as exc:  # serial.SerialException is an OSError
        raise PortUnavailable(f"cannot open {cfg.port}: {exc}") from exc


async def read_some(reader: asyncio.StreamReader, wait_s: float) -> bytes | None:
    """Read what is there; None on timeout. EOF/EIO (the device went away) raise
    `PortUnavailable`."""
    try:
        async with asyncio.timeout(wait_s):
            data = await reader.read(4096)
    except TimeoutError:
        return None
    except OSError as exc:
        raise PortUnavailable(f"read failed: {exc}") from exc
    if not data:
        raise PortUnavailable("port closed (EOF)")
    return data


class PortSource(ABC):
    """A serial source: `session` talks to the device while it is there; `run` supervises.

    `session` must call `connected()` once the device is reachable and raise
    `PortUnavailable` when it is lost; anything else it raises is a bug and is logged and
    retried the same way, so one bad device never stops the agent.
    """

    kind: str = "serial"

    def __init__(self, cfg: SerialPortConfig, clock: Clock) -> None:
        self.cfg = cfg
        self.name = f"{self.kind}.{cfg.name}"
        self.health = SourceHealth(name=self.name, kind=self.kind)
        self.clock = clock
        self.log = structlog.get_logger(__name__).bind(source=self.name)
        self._backoff = Backoff(base=cfg.backoff_base_s, cap=cfg.backoff_cap_s)
        self._sink: Sink | None = None

    @abstractmethod
    async def session(self) -> None:
        """Talk to the device until it is lost (raise `PortUnavailable`)."""

    async def run(self, sink: Sink) -> None:
        self._sink = sink
        try:
            while True:
                try:
                    await self.session()
                    reason = "session ended"
                except PortUnavailable as exc:
                    reason = str(exc)
                    self.health.count("unavailable")
                except Exception as exc:  # a bug must not stop the agent; it is logged
                    reason = f"{type(exc).__name__}: {exc}"
                    self.health.count("internal")
                    self.log.exception("serial.session_failed")
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
            self.log.info("serial.online", port=self.cfg.port)
            await self.emit("source.online", True, priority=ALERT)

    async def _went_offline(self, reason: str) -> None:
        self.health.detail = reason
        if self.health.state is SourceState.OFFLINE:
            return
        self.health.state = SourceState.OFFLINE
        self.log.warning("serial.offline", port=self.cfg.port, reason=reason)
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
