"""Serial devices: Megatec/Q1 UPS, Modbus RTU meters and transmitters, line-protocol sensors.

TOML shape (composed by agent.config under ``[sources.serial]``)::

    [[sources.serial.ups]]
    name = "main"
    port = "/dev/ttyUSB0"
    poll_interval_s = 5.0

    [[sources.serial.modbus]]
    name = "meter"
    port = "/dev/ttyUSB1"
    unit_id = 1
    registers = [
      { name = "voltage", address = 0, function = "input", type = "float32", unit = "V" },
    ]

    [[sources.serial.line]]
    name = "climate"
    port = "/dev/ttyAMA0"
    format = "kv"
    fields = { temp = { type = "temperature", unit = "Cel" } }
"""

from __future__ import annotations

from pydantic import model_validator

from agent.core.config import StrictModel
from drivers.base import Source, SourceContext
from drivers.serial.line import LineConfig, LineField, LineSource
from drivers.serial.megatec import Q1Status, UpsConfig, UpsSource, parse_q1
from drivers.serial.modbus import ModbusConfig, ModbusRegister, ModbusSource
from drivers.serial.port import PortSource, PortUnavailable, SerialPortConfig

__all__ = [
    "LineConfig",
    "LineField",
    "LineSource",
    "ModbusConfig",
    "ModbusRegister",
    "ModbusSource",
    "PortSource",
    "PortUnavailable",
    "Q1Status",
    "SerialConfig",
    "SerialPortConfig",
    "UpsConfig",
    "UpsSource",
    "build_sources",
    "parse_q1",
]


class SerialConfig(StrictModel):
    """``[sources.serial]``: lists of devices per protocol. Names are unique per protocol
    (they make the source ids ``ups.<name>``, ``modbus.<name>``, ``line.<name>``), and no two
    devices may share a port."""

    ups: list[UpsConfig] = []
    modbus: list[ModbusConfig] = []
    line: list[LineConfig] = []

    @model_validator(mode="after")
    def _unique(self) -> SerialConfig:
        for kind, entries in (("ups", self.ups), ("modbus", self.modbus), ("line", self.line)):
            names = [e.name for e in entries]
            if dups := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"duplicate serial.{kind} names: {', '.join(dups)}")
        ports = [e.port for e in [*self.ups, *self.modbus, *self.line]]
        if dups := sorted({p for p in ports if ports.count(p) > 1}):
            raise ValueError(f"serial port used by more than one device: {', '.join(dups)}")
        return self


def build_sources(cfg: SerialConfig, ctx: SourceContext) -> list[Source]:
    """One source per configured device."""
    sources: list[Source] = []
    sources += [UpsSource(c, ctx.clock) for c in cfg.ups]
    sources += [ModbusSource(c, ctx.clock) for c in cfg.modbus]
    sources += [LineSource(c, ctx.clock) for c in cfg.line]
    return sources
