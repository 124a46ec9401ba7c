"""Megatec "Q1" UPS protocol (the blazer family in NUT): poll ``Q1\\r``, parse the status line.

Reply (NUT's blazer/megatec test tables): ``(MMM.M NNN.N PPP.P QQQ RR.R S.SS TT.T b7..b0\\r``
input V, fault V, output V, load %, frequency Hz, battery V (``S.SS`` per cell or ``SS.S``
total, both seen), temperature C, status bits: 7 utility fail, 6 battery low, 5 bypass/boost,
4 UPS failed, 3 standby type, 2 test in progress, 1 shutdown active, 0 beeper on. Units that
do not know a command echo it back, so anything not starting with ``(`` is not a status.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields
from typing import Final

import structlog

from agent.core.clock import Clock
from agent.core.types import ALERT, DIAGNOSTIC, TELEMETRY, Reading
from drivers.base import SourceState
from drivers.serial.config import UpsConfig
from drivers.serial.line import LineSplitter
from drivers.serial.port import PortSource, PortUnavailable, open_port, read_some

__all__ = ["Q1Status", "UpsConfig", "UpsSource", "parse_q1"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Q1Status:
    input_voltage: float
    fault_voltage: float
    output_voltage: float
    load: int
    frequency: float
    battery_voltage: float
    temperature: float
    utility_fail: bool
    battery_low: bool
    bypass: bool
    ups_failed: bool
    standby: bool
    test: bool
    shutdown: bool
    beeper: bool


_NUMBERS: Final = 7
_FLAG_NAMES: Final = [f.name for f in fields(Q1Status)][_NUMBERS:]

# attribute -> (reading type, unit); emitted every poll as TELEMETRY
MEASUREMENTS: Final[dict[str, tuple[str, str]]] = {
    "input_voltage": ("ups.input_voltage", "V"),
    "output_voltage": ("ups.output_voltage", "V"),
    "load": ("ups.load", "%"),
    "frequency": ("ups.frequency", "Hz"),
    "battery_voltage": ("ups.battery_voltage", "V"),
    "temperature": ("ups.temperature", "Cel"),
}
# attribute -> (reading type, priority); emitted on change only
FLAGS: Final[dict[str, tuple[str, int]]] = {
    "utility_fail": ("ups.on_battery", ALERT),
    "battery_low": ("ups.battery_low", ALERT),
    "bypass": ("ups.bypass", TELEMETRY),
    "ups_failed": ("ups.fault", ALERT),
    "shutdown": ("ups.shutdown_active", ALERT),
    "test": ("ups.test", DIAGNOSTIC),
}


def parse_q1(line: bytes) -> Q1Status | None:
    """Parse one Q1 reply (with or without the trailing CR); None when it is not one."""
    try:
        text = line.decode("ascii").strip()
        if not text.startswith("("):
            return None
        parts = text[1:].split()
        if len(parts) != _NUMBERS + 1:
            return None
        bits = parts[_NUMBERS]
        if len(bits) != 8 or set(bits) - {"0", "1"}:
            return None
        values = [float(p) for p in parts[:_NUMBERS]]
    except (UnicodeDecodeError, ValueError):
        return None
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        return None
    flags = {name: bits[i] == "1" for i, name in enumerate(_FLAG_NAMES)}
    return Q1Status(
        input_voltage=values[0],
        fault_voltage=values[1],
        output_voltage=values[2],
        load=int(values[3]),
        frequency=values[4],
        battery_voltage=values[5],
        temperature=values[6],
        **flags,
    )


def q1_readings(
    status: Q1Status, previous: Q1Status | None, source: str, ts: float | None
) -> list[Reading]:
    """Pure: telemetry for every measurement, flags only where they changed."""
    readings = [
        Reading(source, type_, getattr(status, attr), unit, ts, TELEMETRY)
        for attr, (type_, unit) in MEASUREMENTS.items()
    ]
    for attr, (type_, priority) in FLAGS.items():
        value = getattr(status, attr)
        if previous is None or getattr(previous, attr) != value:
            readings.append(Reading(source, type_, value, None, ts, priority))
    return readings


class UpsSource(PortSource):
    """Polls Q1 every `poll_interval_s`; id ``ups.<name>``."""

    kind = "ups"

    def __init__(self, cfg: UpsConfig, clock: Clock) -> None:
        super().__init__(cfg, clock)
        self.ups_cfg = cfg
        self.last: Q1Status | None = None

    async def session(self) -> None:
        reader, writer = await open_port(self.cfg)
        splitter = LineSplitter(b"\r", max_len=128)
        missed = 0
        try:
            while True:
                writer.write(b"Q1\r")
                line = await self._reply(reader, splitter)
                if line is None:
                    missed += 1
                    self.health.count("timeout")
                    if missed >= self.ups_cfg.missed_polls_offline:
                        raise PortUnavailable(f"no answer to Q1 ({missed} polls)")
                else:
                    missed = 0
                    await self._handle(line)
                await asyncio.sleep(self.cfg.poll_interval_s)
        finally:
            writer.close()

    async def _reply(self, reader: asyncio.StreamReader, splitter: LineSplitter) -> bytes | None:
        deadline = self.clock.monotonic() + self.cfg.timeout_s
        while (left := deadline - self.clock.monotonic()) > 0:
            data = await read_some(reader, left)
            if data is None:
                break
            lines = splitter.feed(data)
            if lines:
                return lines[-1]
        return None

    async def _handle(self, line: bytes) -> None:
        status = parse_q1(line)
        if status is None:
            self.health.count("malformed")
            log.debug("ups.malformed", source=self.name, line=line[:128].hex())
            return
        if self.health.state is not SourceState.ONLINE:
            await self.connected()
        readings = q1_readings(status, self.last, self.name, self.clock.time())
        self.last = status
        await self.emit_many(readings)
