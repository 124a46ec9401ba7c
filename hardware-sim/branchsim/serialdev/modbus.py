"""A simulated Modbus RTU device: an energy meter with a temperature/humidity transmitter.

Served with pymodbus's own parts: its RTU framer cuts requests out of the pty byte stream,
its datastore (`SimDevice`/`SimCore`, what `ModbusSerialServer` uses) answers them, and the
framer encodes the reply. (`ModbusSerialServer` itself wants to open a port by path, and the
simulator holds the master side of a pty, which has no path.)

Register map (unit id 1 by default; holding and input registers are separate spaces):

======================  =========  ========  =======  =====  ======
name                    function   address   type     scale  unit
======================  =========  ========  =======  =====  ======
voltage                 input      0-1       float32  1      V
current                 input      2-3       float32  1      A
active_power            input      4-5       float32  1      W
energy                  input      6-7       uint32   1      Wh
frequency               input      8         uint16   0.01   Hz
temperature             holding    100       int16    0.1    Cel
humidity                holding    101       uint16   0.1    %RH
======================  =========  ========  =======  =====  ======

32-bit values are big-endian words by default (``word_order = "little"`` swaps them, as some
meters do). Params: ``unit_id``, ``word_order``, ``poll_interval_s`` (suggested for the
agent), ``values = {name = value}`` (initial, in engineering units). Steps:
``set = {voltage = 198.5, energy = 123500}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pymodbus.client import ModbusBaseClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from branchsim.serialdev.pty import PtyDevice

__all__ = ["REGISTER_MAP", "ModbusDevice", "SimRegister"]


@dataclass(frozen=True, slots=True)
class SimRegister:
    name: str
    function: Literal["holding", "input"]
    address: int
    type: Literal["int16", "uint16", "int32", "uint32", "float32"]
    scale: float
    unit: str
    initial: float


REGISTER_MAP: tuple[SimRegister, ...] = (
    SimRegister("voltage", "input", 0, "float32", 1.0, "V", 230.0),
    SimRegister("current", "input", 2, "float32", 1.0, "A", 1.5),
    SimRegister("active_power", "input", 4, "float32", 1.0, "W", 345.0),
    SimRegister("energy", "input", 6, "uint32", 1.0, "Wh", 123456),
    SimRegister("frequency", "input", 8, "uint16", 0.01, "Hz", 50.0),
    SimRegister("temperature", "holding", 100, "int16", 0.1, "Cel", 21.5),
    SimRegister("humidity", "holding", 101, "uint16", 0.1, "%RH", 45.0),
)
_BY_NAME = {r.name: r for r in REGISTER_MAP}
_SPACE = 128  # registers per space, enough for the map
_WRITE_FC = {"holding": 16, "input": 4}  # SimCore picks the block by function code


class ModbusParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    unit_id: int = Field(default=1, ge=1, le=247)
    word_order: Literal["big", "little"] = "big"
    poll_interval_s: float = Field(default=1.0, gt=0)
    values: dict[str, float] = {}


class ModbusDevice(PtyDevice):
    kind = "modbus"
    link_prefix = "ttyMB"

    def __init__(self, name: str, params: Mapping[str, Any], workdir: Path) -> None:
        super().__init__(name, workdir)
        self.params = ModbusParams.model_validate(dict(params))
        self._check_names(self.params.values)
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=_SPACE, values=0, datatype=DataType.REGISTERS)]
        device = SimDevice(self.params.unit_id, simdata=(bits, bits, regs, list(regs)))
        self.core = SimCore(device)
        self.framer = FramerRTU(DecodePDU(True))
        self.values = {r.name: r.initial for r in REGISTER_MAP} | self.params.values
        self.requests = 0
        self._buf = b""

    def on_start(self) -> None:
        self.spawn(self._store(self.values))

    def received(self, data: bytes) -> None:
        self._buf += data
        while self._buf:
            try:
                used, pdu = self.framer.handleFrame(self._buf, 0, 0)
            except ModbusException:
                self._buf = b""  # a frame with an unknown function: drop it, as a device does
                return
            self._buf = self._buf[used:]
            if pdu is None:
                break
            if pdu.dev_id == self.params.unit_id:  # others on the bus answer for themselves
                self.spawn(self._answer(pdu))
        if len(self._buf) > 512:
            self._buf = b""

    async def _answer(self, request: ModbusPDU) -> None:
        self.requests += 1
        response = await request.datastore_update(self.core, request.dev_id)  # type: ignore[arg-type]  # SimCore is what pymodbus's own server passes here
        response.dev_id = request.dev_id
        response.transaction_id = request.transaction_id
        self.write(self.framer.buildFrame(response))

    async def _store(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            reg = _BY_NAME[name]
            dtype = ModbusBaseClient.DATATYPE[reg.type.upper()]
            raw: int | float = value if reg.type == "float32" else round(value / reg.scale)
            words = ModbusBaseClient.convert_to_registers(raw, dtype, self.params.word_order)
            await self.core.async_setValues(
                self.params.unit_id, _WRITE_FC[reg.function], reg.address, words
            )

    def apply_step(self, step: Mapping[str, Any]) -> None:
        unknown = set(step) - {"set"}
        if unknown:
            raise ValueError(f"modbus {self.name}: unknown step keys {sorted(unknown)}")
        changes = {k: float(v) for k, v in dict(step["set"]).items()}
        self._check_names(changes)
        self.values.update(changes)
        self.spawn(self._store(changes))

    def _check_names(self, names: Mapping[str, Any]) -> None:
        if unknown := sorted(set(names) - set(_BY_NAME)):
            raise ValueError(
                f"modbus {self.name}: unknown registers {unknown}; known: {sorted(_BY_NAME)}"
            )

    def agent_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "port": self.path,
            "unit_id": self.params.unit_id,
            "poll_interval_s": self.params.poll_interval_s,
            "timeout_s": 0.5,
            "registers": [
                {
                    "name": r.name,
                    "address": r.address,
                    "function": r.function,
                    "type": r.type,
                    "word_order": self.params.word_order,
                    "scale": r.scale,
                    "unit": r.unit,
                }
                for r in REGISTER_MAP
            ],
        }
