"""A simulated Megatec/Q1 UPS (the protocol NUT's blazer_ser drives).

Commands (each ends with CR): ``Q1`` -> status line, ``F`` -> ratings, ``I`` -> identity;
anything else is echoed back, as many real units do. Replies follow NUT's test tables:
``(215.0 195.0 230.0 014 49.0 22.7 30.0 00000000\\r``, ``#230.0 000 024.0 50.0\\r``,
``#NOT_A_LIVE_UPS  TESTING    TESTING   \\r`` (company 15, model 10, version 10 characters).

Params (scenario ``[[ups]]`` table, all optional): any status field below as its initial
value, ``poll_interval_s`` (suggested for the agent, default 1.0), ``company``, ``model``,
``version``. Steps: ``set = {utility_fail = true, battery_voltage = 23.1, ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from branchsim.serialdev.pty import PtyDevice

__all__ = ["UpsDevice", "UpsState"]


class UpsState(BaseModel):
    """What the UPS reports. Validated on every `set` so a scenario typo is a clear error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    input_voltage: float = 230.0
    fault_voltage: float = 230.0
    output_voltage: float = 230.0
    load: int = Field(default=25, ge=0, le=999)
    frequency: float = 50.0
    battery_voltage: float = 27.2
    temperature: float = 30.0
    utility_fail: bool = False
    battery_low: bool = False
    bypass: bool = False
    ups_fault: bool = False
    standby: bool = True
    test: bool = False
    shutdown: bool = False
    beeper: bool = False

    def q1(self) -> bytes:
        bits = "".join(
            "1" if flag else "0"
            for flag in (
                self.utility_fail,
                self.battery_low,
                self.bypass,
                self.ups_fault,
                self.standby,
                self.test,
                self.shutdown,
                self.beeper,
            )
        )
        return (
            f"({self.input_voltage:05.1f} {self.fault_voltage:05.1f} {self.output_voltage:05.1f} "
            f"{self.load:03d} {self.frequency:04.1f} {self.battery_voltage:04.1f} "
            f"{self.temperature:04.1f} {bits}\r"
        ).encode("ascii")


class UpsParams(UpsState):
    poll_interval_s: float = Field(default=1.0, gt=0)
    company: str = "BRANCHSIM"
    model: str = "SIM-UPS"
    version: str = "1.0"


class UpsDevice(PtyDevice):
    kind = "ups"
    link_prefix = "ttyUPS"

    def __init__(self, name: str, params: Mapping[str, Any], workdir: Path) -> None:
        super().__init__(name, workdir)
        self.params = UpsParams.model_validate(dict(params))
        self.state = UpsState.model_validate(
            self.params.model_dump(include=set(UpsState.model_fields))
        )
        self._buf = b""
        self.commands = 0

    def received(self, data: bytes) -> None:
        self._buf += data
        while b"\r" in self._buf:
            command, _, self._buf = self._buf.partition(b"\r")
            self.commands += 1
            self.write(self._reply(command))
        if len(self._buf) > 256:  # line noise without a CR; a real UPS drops it too
            self._buf = b""

    def _reply(self, command: bytes) -> bytes:
        if command == b"Q1":
            return self.state.q1()
        if command == b"F":
            return b"#230.0 000 024.0 50.0\r"
        if command == b"I":
            p = self.params
            return f"#{p.company:<15.15} {p.model:<10.10} {p.version:<10.10}\r".encode("ascii")
        return command + b"\r"

    def apply_step(self, step: Mapping[str, Any]) -> None:
        unknown = set(step) - {"set"}
        if unknown:
            raise ValueError(f"ups {self.name}: unknown step keys {sorted(unknown)}")
        changes = step["set"]
        if not isinstance(changes, Mapping):
            raise ValueError(f"ups {self.name}: 'set' must be a table")
        self.state = self.state.model_validate({**self.state.model_dump(), **changes})

    def agent_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "port": self.path,
            "poll_interval_s": self.params.poll_interval_s,
            "timeout_s": 1.0,
        }
