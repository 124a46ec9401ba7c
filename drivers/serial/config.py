"""The serial devices' config models (`[sources.serial]`: UPS on Megatec/Q1, Modbus RTU meters,
line-protocol devices), apart from the drivers: loading a config imports no serial stack."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.core.config import StrictModel, duplicates, unique_names
from agent.core.types import TELEMETRY

__all__ = [
    "NAME_PATTERN",
    "LineConfig",
    "LineField",
    "LineFormat",
    "ModbusConfig",
    "ModbusRegister",
    "RegisterMap",
    "RegisterType",
    "SerialConfig",
    "SerialPortConfig",
    "UpsConfig",
]

# Source names become part of source ids ("ups.main") and MQTT topics: keep them plain.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


LineFormat = Literal["kv", "csv", "json"]
RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32"]


class SerialPortConfig(StrictModel):
    """Fields every serial source has. `port` is a device path (/dev/ttyUSB0, a sim symlink)."""

    name: str = Field(pattern=NAME_PATTERN)
    port: str = Field(min_length=1)
    baudrate: int = Field(default=9600, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: Literal[1, 2] = 1
    poll_interval_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_cap_s: float = Field(default=30.0, gt=0)


class LineField(StrictModel):
    """How one named field becomes a reading."""

    type: str = Field(min_length=1)
    unit: str | None = None
    scale: float = 1.0
    priority: int = Field(default=TELEMETRY, ge=0, le=3)


class LineConfig(SerialPortConfig):
    """``[[sources.serial.line]]``: a device that prints one line per measurement."""

    format: LineFormat = "kv"
    columns: list[str] = []
    terminator: Literal["\n", "\r", "\r\n"] = "\n"
    max_line: int = Field(default=512, ge=16, le=65536)
    # Lines per second, after a burst (boot banners, a multi-line report); see the module doc.
    rate_limit_hz: float = Field(default=20.0, gt=0, le=10_000)
    rate_burst: int = Field(default=100, ge=1, le=100_000)
    # field name -> reading; empty means every field, with its own name as the type
    fields: dict[str, LineField] = {}

    @model_validator(mode="after")
    def _csv_needs_columns(self) -> LineConfig:
        if self.format == "csv" and not self.columns:
            raise ValueError("format 'csv' needs 'columns' (the names of the values in order)")
        return self


class UpsConfig(SerialPortConfig):
    """``[[sources.serial.ups]]``: a Megatec/Q1 UPS. Most such units talk 2400 8N1."""

    baudrate: int = Field(default=2400, gt=0)
    # consecutive unanswered polls before the UPS counts as gone
    missed_polls_offline: int = Field(default=3, ge=1)


class ModbusRegister(StrictModel):
    """One value in the device's register map."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    address: int = Field(ge=0, le=65535)
    function: Literal["holding", "input"] = "holding"
    type: RegisterType = "uint16"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    unit: str | None = None  # SenML: V, A, W, Wh, Hz, Cel, %RH
    priority: int = Field(default=TELEMETRY, ge=0, le=3)


# A register map (RTU or TCP): at least one register, names unique (they are the reading types).
RegisterMap = Annotated[list[ModbusRegister], Field(min_length=1), unique_names("register")]


class ModbusConfig(SerialPortConfig):
    """``[[sources.serial.modbus]]``: one RTU device (unit id) and the registers to poll."""

    baudrate: int = Field(default=9600, gt=0)
    unit_id: int = Field(default=1, ge=0, le=247)
    registers: RegisterMap


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
            if dups := duplicates(e.name for e in entries):
                raise ValueError(f"duplicate serial.{kind} names: {', '.join(dups)}")
        if dups := duplicates(e.port for e in [*self.ups, *self.modbus, *self.line]):
            raise ValueError(f"serial port used by more than one device: {', '.join(dups)}")
        return self
