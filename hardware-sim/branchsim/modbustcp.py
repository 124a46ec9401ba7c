"""A simulated Modbus TCP device: the RTU meter's register map behind pymodbus's own TCP server.

The server (`pymodbus.server.ModbusTcpServer`, the one pymodbus ships for real use) runs on
its own asyncio loop in a thread, on 127.0.0.1 and a port picked by the kernel at the first
start and kept afterwards, so the agent's config stays valid across `unplug`/`replug`.

The register map, the initial values and their encoding are those of the simulated RTU meter
(`branchsim.serialdev.modbus.REGISTER_MAP`): the same agent register map reads the same values
over either link. Params: ``unit_id``, ``word_order``, ``poll_interval_s`` (suggested for the
agent), ``values = {name = value}`` (initial, in engineering units), ``port`` (0: any free one),
``extra_registers = [{name, function, address, type, scale, unit, initial}]`` (more registers
beside the meter's, e.g. an int32).
Steps (`apply`): ``set = {voltage = 198.5}``, ``mute = true|false`` (connections are accepted
but nothing is answered: a hung device), ``unplug``/``replug`` (the server goes away and comes
back on the same port: connections are refused meanwhile). Reading an address outside the map's
space (0-127 in each of holding and input registers) gets an "illegal data address" reply.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Literal, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymodbus.client import ModbusBaseClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from branchsim.serialdev.modbus import REGISTER_MAP, ModbusParams, SimRegister

__all__ = ["ModbusTcpDevice", "encode", "register_entries"]

T = TypeVar("T")
_SPACE = 128  # registers per space, as the RTU meter: enough for the map
_WRITE_FC = {"holding": 16, "input": 4}  # SimCore picks the block by function code


def encode(reg: SimRegister, value: float, word_order: Literal["big", "little"]) -> list[int]:
    """The register words of `value` (engineering units): floats as IEEE 754, integers as
    ``value / scale`` rounded, 32-bit types in `word_order` (as the RTU meter stores them)."""
    dtype = ModbusBaseClient.DATATYPE[reg.type.upper()]
    raw: int | float = value if reg.type == "float32" else round(value / reg.scale)
    return ModbusBaseClient.convert_to_registers(raw, dtype, word_order)


def register_entries(
    word_order: Literal["big", "little"], registers: Iterable[SimRegister] = REGISTER_MAP
) -> list[dict[str, Any]]:
    """The agent's ``registers`` for a simulated meter (the same list over RTU and TCP)."""
    return [
        {
            "name": r.name,
            "address": r.address,
            "function": r.function,
            "type": r.type,
            "word_order": word_order,
            "scale": r.scale,
            "unit": r.unit,
        }
        for r in registers
    ]


class ExtraRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    function: Literal["holding", "input"]
    address: int = Field(ge=0)
    type: Literal["int16", "uint16", "int32", "uint32", "float32"]
    scale: float = 1.0
    unit: str = ""
    initial: float = 0.0

    def register(self) -> SimRegister:
        return SimRegister(**self.model_dump())


class ModbusTcpParams(ModbusParams):
    port: int = Field(default=0, ge=0, le=65535)
    extra_registers: list[ExtraRegister] = []

    @model_validator(mode="after")
    def _fits(self) -> ModbusTcpParams:
        names = [r.name for r in REGISTER_MAP] + [r.name for r in self.extra_registers]
        if dups := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"register names used twice: {dups}")
        for r in self.extra_registers:
            if r.address + (1 if r.type.endswith("16") else 2) > _SPACE:
                raise ValueError(f"register {r.name}: address {r.address} is past {_SPACE - 1}")
        return self


class ModbusTcpDevice:
    """A simulated Modbus TCP meter; `start`/`stop` from any thread (stop is idempotent)."""

    kind = "modbus_tcp"
    host = "127.0.0.1"

    def __init__(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.params = ModbusTcpParams.model_validate(dict(params or {}))
        regs = [*REGISTER_MAP, *(r.register() for r in self.params.extra_registers)]
        self.registers: dict[str, SimRegister] = {r.name: r for r in regs}
        self._check_names(self.params.values)
        self.values: dict[str, float] = {r.name: r.initial for r in regs}
        self.values |= self.params.values
        self.port = self.params.port
        self.muted = False
        self.log = structlog.get_logger(__name__).bind(device=f"{self.kind}.{name}")
        self._server: ModbusTcpServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle (any thread) -------------------------------------------------------------

    def start(self) -> ModbusTcpDevice:
        if self._thread is not None:
            return self
        ready = threading.Event()
        loop = self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=serve, name=f"sim-modbus-tcp-{self.name}",
                                        daemon=True)  # a forgotten stop() must not hang exit
        self._thread.start()
        ready.wait(5.0)
        try:
            self._call(self._up)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._down)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5.0)
            loop.close()
            self._loop = None
            self._thread = None

    def unplug(self) -> None:
        """The device goes away: open connections are closed, new ones refused."""
        self._call(self._down)

    def replug(self) -> None:
        """The device is back, on the same port, with the values it had."""
        self._call(self._up)

    def apply(self, step: Mapping[str, Any]) -> None:
        """One scenario step (keys besides ``at``/``device``): unplug, replug, mute, set."""
        step = {k: v for k, v in step.items() if k not in ("at", "device")}
        if unknown := sorted(set(step) - {"unplug", "replug", "mute", "set"}):
            raise ValueError(f"modbus_tcp {self.name}: unknown step keys {unknown}")
        if step.get("unplug"):
            self.unplug()
        if step.get("replug"):
            self.replug()
        if "mute" in step:
            self.muted = bool(step["mute"])
        if "set" in step:
            changes = {k: float(v) for k, v in dict(step["set"]).items()}
            self._check_names(changes)
            self.values.update(changes)
            if self._server is not None:
                self._call(lambda: self._store(changes))

    def agent_config(self) -> dict[str, Any]:
        """This device's entry for the agent's ``[[sources.modbus_tcp]]``."""
        if not self.port:
            raise RuntimeError("start the device first: its port is chosen then")
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "unit_id": self.params.unit_id,
            "poll_interval_s": self.params.poll_interval_s,
            "timeout_s": 0.5,
            "registers": register_entries(self.params.word_order, self.registers.values()),
        }

    @property
    def up(self) -> bool:
        return self._server is not None

    # -- internals (loop thread) -------------------------------------------------------------

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self._loop is None:
            raise RuntimeError("device not started")
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(10.0)

    async def _up(self) -> None:
        if self._server is not None:
            return
        regs = [SimData(0, count=_SPACE, values=0, datatype=DataType.REGISTERS)]
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        device = SimDevice(self.params.unit_id, simdata=(bits, bits, regs, list(regs)))
        server = ModbusTcpServer(device, address=(self.host, self.port),
                                 trace_packet=self._trace)
        await server.serve_forever(background=True)
        assert isinstance(server.context, SimCore)  # a SimDevice makes a SimCore datastore
        self._server = server
        if not self.port:
            self.port = int(server.transport.sockets[0].getsockname()[1])  # type: ignore[attr-defined]  # a listener's transport is an asyncio.Server
        await self._store(self.values)
        self.log.debug("sim.modbus_tcp.up", port=self.port)

    async def _down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]  # unannotated in pymodbus
            self.log.debug("sim.modbus_tcp.down", port=self.port)

    async def _store(self, values: Mapping[str, float]) -> None:
        assert self._server is not None
        core = self._server.context
        for name, value in values.items():
            reg = self.registers[name]
            words = encode(reg, value, self.params.word_order)
            await core.async_setValues(
                self.params.unit_id, _WRITE_FC[reg.function], reg.address, words
            )

    def _trace(self, sending: bool, data: bytes) -> bytes:
        """pymodbus's packet hook: a muted device reads requests and answers nothing."""
        return b"" if sending and self.muted else data

    def _check_names(self, names: Mapping[str, Any]) -> None:
        if unknown := sorted(set(names) - set(self.registers)):
            raise ValueError(f"modbus_tcp {self.name}: unknown registers {unknown}; "
                             f"known: {sorted(self.registers)}")
