"""Simulated serial devices, each on its own pty pair: a Megatec/Q1 UPS, a Modbus RTU
meter, a line-protocol sensor. The simulator core creates them with `create_device`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from branchsim.serialdev.line import LineDevice
from branchsim.serialdev.megatec import UpsDevice
from branchsim.serialdev.modbus import REGISTER_MAP, ModbusDevice
from branchsim.serialdev.pty import PtyDevice

__all__ = [
    "KINDS",
    "REGISTER_MAP",
    "LineDevice",
    "ModbusDevice",
    "PtyDevice",
    "SimSerialDevice",
    "UpsDevice",
    "create_device",
]


@runtime_checkable
class SimSerialDevice(Protocol):
    """What the simulator core sees of a serial device."""

    name: str
    kind: str  # "ups" | "modbus" | "line"
    path: str  # stable path the agent opens: a symlink in the workdir -> /dev/pts/N

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def unplug(self) -> None: ...
    def replug(self) -> None: ...
    def apply(self, step: Mapping[str, Any]) -> None: ...
    def agent_config(self) -> dict[str, Any]: ...


KINDS: dict[str, type[UpsDevice] | type[ModbusDevice] | type[LineDevice]] = {
    "ups": UpsDevice,
    "modbus": ModbusDevice,
    "line": LineDevice,
}


def create_device(
    kind: str, name: str, params: Mapping[str, Any], workdir: Path
) -> SimSerialDevice:
    """A simulated device of `kind`; params are validated now (ValueError names the key)."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown serial device kind {kind!r}; known: {sorted(KINDS)}") from None
    return cls(name, params, Path(workdir))
