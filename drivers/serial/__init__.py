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

from drivers.base import Source, SourceContext
from drivers.serial.config import (
    LineConfig,
    LineField,
    ModbusConfig,
    ModbusRegister,
    SerialConfig,
    SerialPortConfig,
    UpsConfig,
)
from drivers.serial.line import LineSource
from drivers.serial.megatec import Q1Status, UpsSource, parse_q1
from drivers.serial.modbus import ModbusSource
from drivers.serial.port import PortSource, PortUnavailable

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


def build_sources(cfg: SerialConfig, ctx: SourceContext) -> list[Source]:
    """One source per configured device."""
    sources: list[Source] = []
    sources += [UpsSource(c, ctx.clock) for c in cfg.ups]
    sources += [ModbusSource(c, ctx.clock) for c in cfg.modbus]
    sources += [LineSource(c, ctx.clock) for c in cfg.line]
    return sources
