"""The Modbus TCP devices' config model (``[[sources.modbus_tcp]]``), apart from the driver:
loading a config imports no pymodbus.

The register map is the Modbus RTU one (`ModbusRegister`), so a map written for an RTU meter
works unchanged when the same meter (or its TCP gateway) is reached over the LAN.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from agent.core.config import StrictModel, host_port, unique_names
from drivers.serial.config import NAME_PATTERN, ModbusRegister, RegisterMap

__all__ = ["ModbusRegister", "ModbusTcpConfig", "ModbusTcpConfigs"]

# A host name, an IPv4 or an IPv6 literal (no brackets, no port: `port` is its own key).
HOST_PATTERN = r"^[A-Za-z0-9:][A-Za-z0-9.:-]*$"


class ModbusTcpConfig(StrictModel):
    """``[[sources.modbus_tcp]]``: one device (host, port, unit id) and the registers to poll."""

    name: str = Field(pattern=NAME_PATTERN)
    host: str = Field(min_length=1, max_length=253, pattern=HOST_PATTERN)
    port: int = Field(default=502, ge=1, le=65535)
    # A device reached directly usually answers any unit id (the spec suggests 255); behind a
    # TCP-to-RTU gateway it is the RTU device's address on the RS-485 bus (1-247).
    unit_id: int = Field(default=1, ge=0, le=255)
    registers: RegisterMap
    poll_interval_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)  # connect, and each request's answer
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_cap_s: float = Field(default=30.0, gt=0)

    @property
    def where(self) -> str:
        return host_port(self.host, self.port)


# The type of the ``modbus_tcp`` list in `SourcesConfig`: names make the source ids
# ``modbus_tcp.<name>``, so they are unique.
ModbusTcpConfigs = Annotated[list[ModbusTcpConfig], unique_names("modbus_tcp")]
