"""Modbus RTU poller: reads a configured register map with pymodbus's asyncio serial client.

Registers of one function (holding / input) that lie close together are read in one request
(at most 125 registers, the protocol limit); values are decoded with pymodbus's
`convert_from_registers`, multiplied by `scale` and reported with their SenML unit.
pymodbus's own reconnect is switched off (``reconnect_delay=0``): `PortSource` owns the
retry policy so that every serial source backs off and reports offline the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.core.clock import Clock
from agent.core.types import Reading
from drivers.serial.config import ModbusConfig, ModbusRegister
from drivers.serial.port import PortSource, PortUnavailable

if TYPE_CHECKING:
    from pymodbus.client import AsyncModbusSerialClient

__all__ = ["ModbusConfig", "ModbusRegister", "ModbusSource", "decode_registers", "plan_reads"]

MAX_READ = 125  # registers per read request (Modbus application protocol, 6.3)
WIDTH: dict[str, int] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}


@dataclass(frozen=True, slots=True)
class ReadBlock:
    function: Literal["holding", "input"]
    address: int
    count: int
    registers: tuple[ModbusRegister, ...]


def plan_reads(registers: Sequence[ModbusRegister]) -> list[ReadBlock]:
    """Group registers into as few reads as the protocol allows (pure)."""
    blocks: list[ReadBlock] = []
    for function in ("holding", "input"):
        regs = sorted((r for r in registers if r.function == function), key=lambda r: r.address)
        group: list[ModbusRegister] = []
        for reg in regs:
            end = reg.address + WIDTH[reg.type]
            if group and end - group[0].address > MAX_READ:
                blocks.append(_block(function, group))
                group = []
            group.append(reg)
        if group:
            blocks.append(_block(function, group))
    return blocks


def _block(function: Literal["holding", "input"], group: list[ModbusRegister]) -> ReadBlock:
    start = group[0].address
    count = max(r.address + WIDTH[r.type] for r in group) - start
    return ReadBlock(function, start, count, tuple(group))


def decode_registers(
    block: ReadBlock, words: Sequence[int], source: str, ts: float | None
) -> list[Reading]:
    """Pure: the words of one block -> one reading per register (short replies skip)."""
    # pymodbus (~10 MB) is imported when a Modbus device is polled, not when a config is read.
    from pymodbus.client import AsyncModbusSerialClient as client_cls

    readings: list[Reading] = []
    for reg in block.registers:
        offset = reg.address - block.address
        chunk = list(words[offset : offset + WIDTH[reg.type]])
        if len(chunk) != WIDTH[reg.type]:
            continue
        raw = client_cls.convert_from_registers(
            chunk, client_cls.DATATYPE[reg.type.upper()], word_order=reg.word_order
        )
        assert isinstance(raw, int | float)  # scalar types only (RegisterType)
        value = raw * reg.scale if reg.scale != 1.0 else raw
        if isinstance(value, float):
            value = round(value, 9)  # 0.1 * 215 -> 21.5, not 21.500000000000004
        readings.append(Reading(source, reg.name, value, reg.unit, ts, reg.priority))
    return readings


class ModbusSource(PortSource):
    """Polls the register map every `poll_interval_s`; id ``modbus.<name>``."""

    kind = "modbus"

    def __init__(self, cfg: ModbusConfig, clock: Clock) -> None:
        from pymodbus.exceptions import ModbusException

        super().__init__(cfg, clock)
        self._modbus_errors = ModbusException
        self.mb_cfg = cfg
        self.blocks = plan_reads(cfg.registers)

    async def session(self) -> None:
        from pymodbus.client import AsyncModbusSerialClient

        client = AsyncModbusSerialClient(
            self.cfg.port,
            baudrate=self.cfg.baudrate,
            bytesize=self.cfg.bytesize,
            parity=self.cfg.parity,
            stopbits=self.cfg.stopbits,
            timeout=self.cfg.timeout_s,
            retries=1,
            reconnect_delay=0,
            name=self.name,
        )
        try:
            if not await client.connect():
                raise PortUnavailable(f"cannot open {self.cfg.port}")
            while True:
                readings: list[Reading] = []
                for block in self.blocks:
                    readings += await self._read(client, block)
                await self.connected()
                await self.emit_many(readings)
                await asyncio.sleep(self.cfg.poll_interval_s)
        finally:
            client.close()

    async def _read(self, client: AsyncModbusSerialClient, block: ReadBlock) -> list[Reading]:
        read = (
            client.read_holding_registers
            if block.function == "holding"
            else client.read_input_registers
        )
        try:
            reply = await read(block.address, count=block.count, device_id=self.mb_cfg.unit_id)
        except (self._modbus_errors, OSError) as exc:
            self.health.count("no_answer")
            raise PortUnavailable(f"{block.function} read at {block.address}: {exc}") from exc
        if reply.isError():
            # the device answers but refuses (illegal address): a config error, not an outage
            self.health.count("exception_reply")
            self.log.warning("modbus.exception_reply", address=block.address, reply=str(reply))
            return []
        return decode_registers(block, reply.registers, self.name, self.clock.time())
