"""Modbus TCP poller: reads a register map with pymodbus's asyncio TCP client.

The register map, its grouping into reads (`plan_reads`) and the decoding (`decode_registers`)
are the Modbus RTU driver's, so one map gives the same readings (type, value, unit, priority)
over either link; only the source id differs (``modbus_tcp.<name>``, the config table's name).

Failures are classified once, in `read_block`, for the poller and the doctor alike:

- no TCP connection (refused, unreachable, closed by the device): `DeviceUnavailable`, counted
  ``connect_failed`` / ``connection_lost``;
- no answer within ``timeout_s``: `DeviceUnavailable`, counted ``timeout``; the connection is
  dropped, so a late answer can never be taken for the next request's;
- an exception reply (illegal address, device failure): the device is there but refuses that
  read, a config error rather than an outage: counted ``exception_reply``, logged at most once
  per block per `REJECT_LOG_INTERVAL`, the other blocks are still read, the source stays online.

pymodbus's own reconnect is off (``reconnect_delay=0``) and the client is never asked to reach a
device it lost (it would reconnect by itself on the next request): `SupervisedSource` owns the
retry policy, so every device source backs off and reports offline the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.core.clock import Clock
from agent.core.types import Reading
from drivers.base import Source, SourceContext
from drivers.modbus_tcp.config import ModbusTcpConfig
from drivers.ratelimit import LogGates
from drivers.serial.modbus import ReadBlock, decode_registers, plan_reads
from drivers.supervised import DeviceUnavailable, Reachability, SupervisedSource

if TYPE_CHECKING:
    from pymodbus.client import AsyncModbusTcpClient

__all__ = [
    "EXCEPTION_CODES",
    "ModbusTcpSource",
    "ModbusTcpUnavailable",
    "Reachability",
    "Refused",
    "build_sources",
    "check_reachable",
    "read_block",
]

# Modbus application protocol, 7: what an exception reply's code means (for logs and doctor).
EXCEPTION_CODES: dict[int, str] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class ModbusTcpUnavailable(DeviceUnavailable):
    """The device cannot be reached or did not answer; `counter` names the health counter."""

    def __init__(self, message: str, counter: str) -> None:
        super().__init__(message)
        self.counter = counter


@dataclass(frozen=True, slots=True)
class Refused:
    """The device answered a read with a Modbus exception reply."""

    code: int

    def __str__(self) -> str:
        return f"exception {self.code} ({EXCEPTION_CODES.get(self.code, 'unknown code')})"


def new_client(cfg: ModbusTcpConfig, name: str) -> AsyncModbusTcpClient:
    """A client without pymodbus's reconnect and retries (see the module doc)."""
    # pymodbus (~10 MB) is imported when a device is polled, not when a config is read.
    from pymodbus.client import AsyncModbusTcpClient

    return AsyncModbusTcpClient(
        cfg.host,
        port=cfg.port,
        timeout=cfg.timeout_s,
        # TCP loses no frame: a retry only waits longer for a device that is not answering.
        retries=0,
        reconnect_delay=0,
        name=name,
    )


async def connect(client: AsyncModbusTcpClient, cfg: ModbusTcpConfig) -> None:
    """Open the TCP connection or raise `ModbusTcpUnavailable` (``connect_failed``)."""
    if not await client.connect():
        raise ModbusTcpUnavailable(f"cannot connect to {cfg.where}", "connect_failed")


async def read_block(
    client: AsyncModbusTcpClient, block: ReadBlock, unit_id: int, timeout_s: float
) -> list[int] | Refused:
    """One read request: the words, or the device's refusal; a lost connection or a missing
    answer raise `ModbusTcpUnavailable`."""
    from pymodbus.exceptions import ConnectionException, ModbusIOException

    # pymodbus 3.16 refuses a request on a lost connection too, but says only "Not connected";
    # the operator reads this reason in source.offline
    if not client.connected:
        raise ModbusTcpUnavailable("connection closed by the device", "connection_lost")
    read = (
        client.read_holding_registers
        if block.function == "holding"
        else client.read_input_registers
    )
    what = f"{block.function} read at {block.address} (+{block.count}) for unit {unit_id}"
    try:
        reply = await read(block.address, count=block.count, device_id=unit_id)
    except ModbusIOException as exc:
        raise ModbusTcpUnavailable(
            f"{what}: no answer within {timeout_s} s", "timeout"
        ) from exc
    except (ConnectionException, OSError) as exc:
        raise ModbusTcpUnavailable(f"{what}: {exc}", "connection_lost") from exc
    if reply.isError():
        return Refused(int(getattr(reply, "exception_code", 0)))
    return list(reply.registers)


class ModbusTcpSource(SupervisedSource):
    """Polls the register map every `poll_interval_s`; id ``modbus_tcp.<name>``.

    The kind is spelled as the config table (``[[sources.modbus_tcp]]``) so one name serves
    config, source id, logs and MQTT topics; an underscore is already allowed in source names,
    while a dot would blur the ``<kind>.<name>`` split.
    """

    kind = "modbus_tcp"
    log_ns = "modbus_tcp"

    def __init__(self, cfg: ModbusTcpConfig, clock: Clock) -> None:
        super().__init__(cfg.name, clock, where=cfg.where, backoff_base_s=cfg.backoff_base_s,
                         backoff_cap_s=cfg.backoff_cap_s)
        self.cfg = cfg
        self.blocks = plan_reads(cfg.registers)
        self._gates = LogGates(clock.monotonic)

    async def session(self) -> None:
        client = new_client(self.cfg, self.name)
        try:
            await connect(client, self.cfg)
            while True:
                readings: list[Reading] = []
                for block in self.blocks:
                    readings += await self._poll(client, block)
                await self.connected()
                await self.emit_many(readings)
                await asyncio.sleep(self.cfg.poll_interval_s)
        except ModbusTcpUnavailable as exc:
            self.health.count(exc.counter)
            raise
        finally:
            client.close()

    async def _poll(self, client: AsyncModbusTcpClient, block: ReadBlock) -> list[Reading]:
        words = await read_block(client, block, self.cfg.unit_id, self.cfg.timeout_s)
        if isinstance(words, Refused):
            self._refused(block, words)
            return []
        return decode_registers(block, words, self.name, self.clock.time())

    def _refused(self, block: ReadBlock, refused: Refused) -> None:
        self.health.count("exception_reply")
        # Every poll repeats a wrong address: one line per block and interval, not per poll.
        held = self._gates.open(f"{block.function}:{block.address}")
        if held is not None:
            self.log.warning(
                "modbus_tcp.exception_reply",
                function=block.function,
                address=block.address,
                count=block.count,
                unit_id=self.cfg.unit_id,
                reply=str(refused),
                registers=[r.name for r in block.registers],
                not_logged_since_last=held,
            )


def build_sources(cfgs: Sequence[ModbusTcpConfig], ctx: SourceContext) -> list[Source]:
    """One source per configured device."""
    return [ModbusTcpSource(c, ctx.clock) for c in cfgs]


# --------------------------------------------------------------------------- doctor


async def check_reachable(cfg: ModbusTcpConfig) -> Reachability:
    """Connect and read the first planned block once (bounded by ``timeout_s`` twice)."""
    block = plan_reads(cfg.registers)[0]
    client = new_client(cfg, f"doctor.{cfg.name}")
    try:
        await connect(client, cfg)
        words = await read_block(client, block, cfg.unit_id, cfg.timeout_s)
    except ModbusTcpUnavailable as exc:
        if exc.counter == "timeout":
            return Reachability(False, f"{cfg.where}: {exc}",
                                f"check unit_id {cfg.unit_id} (a device reached directly often "
                                "answers 1 or 255; behind a gateway, its RS-485 address) and "
                                "that the device is not busy with another master")
        return Reachability(False, f"{cfg.where}: {exc}",
                            f"check that the device is powered and on the LAN, its address "
                            f"({cfg.host}) and port ({cfg.port}), and that no firewall blocks "
                            "TCP to it")
    finally:
        client.close()
    if isinstance(words, Refused):
        return Reachability(False, f"{cfg.where} unit {cfg.unit_id} refused the {block.function} "
                            f"read at {block.address} (+{block.count}): {words}",
                            "check the register map against the device's manual (addresses "
                            "are 0-based; holding vs input registers) and the unit_id")
    return Reachability(True, f"{cfg.where} unit {cfg.unit_id} answers ({block.function} "
                        f"{block.address} +{block.count})")
