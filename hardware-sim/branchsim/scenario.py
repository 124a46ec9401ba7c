"""Scenario timelines: which devices a simulated branch has and what happens to them when.

A scenario is a TOML file (hardware-sim/branchsim/scenarios/*.toml)::

    name = "night-intrusion"
    description = "..."
    duration = 60            # seconds of scenario time

    [[gpio]]                 # the GPIO driver's own input config, plus `initial`
    name = "vault"
    pin = 17
    kind = "vault"
    active_high = true

    [[ups]]                  # serial devices: name + params for branchsim.serialdev
    name = "main"
    params = {}

    [[nut]]                  # facility devices over IP: a UPS on a NUT server (upsd),
    name = "ups"             # an SNMP UPS card / PDU (snmpd), a Modbus TCP meter; the name
    params = {}              # is the agent source's (nut.ups)

    [[steps]]
    at = 10                  # seconds from start (divided by the simulator's speed)
    device = "vault"
    set = true               # gpio: set / hold / pulse, with optional bounce
    bounce = 4

Optional: ``start = 2026-12-01T23:30:00+01:00`` (a TOML offset date-time): the wall clock the
agent sees when the timeline starts (`Simulator.agent_clock`), for scenarios whose rules depend
on the time of day (arming). ``[agent]``: the agent configuration the scenario is written for
(``[agent.arming]``, ``[[agent.held_open]]`` ...), its tables replacing the agent's own where
the agent runs beside the simulator (`branchsim.agentrun.with_scenario`: `branch-sim agent`).

The IP devices' params and steps are validated here, so a typo fails at load with its key path;
their ``params`` say what the simulated device starts with and how often the agent polls it
(`NutParams`, `SnmpParams`, branchsim.modbustcp's params).

Steps may repeat with ``every`` (+ ``until``, default the duration). Errors name the file and
the key path (``steps[3].set.utility_fial: unknown key``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.core.config import StrictModel
from branchsim.snmpagent import OUTLETS, UPS_ALARMS
from drivers.gpio.config import GpioInputConfig, normalise_pin
from drivers.nut.config import NAME_PATTERN, UPS_PATTERN, VARIABLE_PATTERN
from drivers.snmp.config import Profile

__all__ = [
    "SCENARIO_DIR",
    "DeviceKind",
    "GpioStep",
    "IpDeviceSpec",
    "LineStep",
    "ModbusStep",
    "ModbusTcpDeviceSpec",
    "ModbusTcpStep",
    "NutDeviceSpec",
    "NutParams",
    "NutStep",
    "Scenario",
    "ScenarioError",
    "SerialDeviceSpec",
    "SerialStep",
    "SimGpioInput",
    "SnmpDeviceSpec",
    "SnmpOutletChange",
    "SnmpParams",
    "SnmpStep",
    "SnmpUpsSet",
    "Step",
    "TimedStep",
    "UpsSet",
    "UpsStep",
    "list_scenarios",
    "load_scenario",
    "parse_scenario",
    "resolve_scenario",
]

# Scenarios ship inside the package (package data), so an installed copy has them too; the
# wheel's contents are checked in tests/test_dist.py.
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

DeviceKind = Literal["gpio", "ups", "modbus", "line", "nut", "snmp", "modbus_tcp"]
SERIAL_KINDS: tuple[DeviceKind, ...] = ("ups", "modbus", "line")
IP_KINDS: tuple[DeviceKind, ...] = ("nut", "snmp", "modbus_tcp")
MAX_EXPANDED_STEPS = 100_000


class ScenarioError(ValueError):
    """A scenario that cannot be loaded; the message names the file and the key path."""


class SimGpioInput(GpioInputConfig):
    """A simulated contact: the driver's input config plus its state at start."""

    initial: bool = False

    def driver_config(self) -> GpioInputConfig:
        return GpioInputConfig(**self.model_dump(exclude={"initial"}))


class SerialDeviceSpec(StrictModel):
    """``[[ups]]``, ``[[modbus]]``, ``[[line]]``: passed to `branchsim.serialdev.create_device`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    params: dict[str, Any] = Field(default_factory=dict)


class Step(StrictModel):
    at: float = Field(ge=0)
    device: str
    every: float | None = Field(default=None, gt=0)
    until: float | None = Field(default=None, ge=0)

    def payload(self) -> dict[str, Any]:
        """The step's own keys, for the device (timing and addressing removed)."""
        return self.model_dump(
            exclude={"at", "device", "every", "until", "unplug", "replug"}, exclude_none=True
        )


class GpioStep(Step):
    """``set`` the contact (asserted or not), or ``hold``/``pulse`` it asserted for seconds.

    ``bounce`` adds that many alternating edges, spread over ``bounce_ms``, before each
    transition settles. Durations (hold, pulse, bounce) are physical: never compressed by the
    simulator's speed, because the agent's debounce and hold thresholds are physical too.
    """

    set: bool | None = None
    hold: float | None = Field(default=None, gt=0)
    pulse: float | None = Field(default=None, gt=0)
    bounce: int = Field(default=0, ge=0, le=100_000)
    bounce_ms: float = Field(default=5.0, gt=0, le=1000)

    @model_validator(mode="after")
    def _one_action(self) -> GpioStep:
        given = [k for k in ("set", "hold", "pulse") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a gpio step needs exactly one of set, hold, pulse (got {given})")
        return self


class SerialStep(Step):
    unplug: bool = False
    replug: bool = False

    @model_validator(mode="after")
    def _plug(self) -> SerialStep:
        if self.unplug and self.replug:
            raise ValueError("a step cannot both unplug and replug")
        if not (self.unplug or self.replug or self.payload()):
            raise ValueError("the step does nothing")
        return self


class UpsSet(StrictModel):
    """What a UPS step may change (Megatec/Q1 status flags and measurements)."""

    utility_fail: bool | None = None
    battery_low: bool | None = None
    bypass: bool | None = None
    ups_fault: bool | None = None
    shutdown: bool | None = None
    test: bool | None = None
    input_voltage: float | None = None
    output_voltage: float | None = None
    load: int | None = Field(default=None, ge=0, le=100)
    frequency: float | None = None
    battery_voltage: float | None = None
    temperature: float | None = None


class UpsStep(SerialStep):
    set: UpsSet | None = None


class ModbusStep(SerialStep):
    set: dict[str, float | int | bool] | None = None


class LineStep(SerialStep):
    emit: Literal["reading", "garbage", "partial", "framing", "long"] | None = None
    count: int | None = Field(default=None, ge=1, le=10_000)
    set: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _count_needs_emit(self) -> LineStep:
        if self.count is not None and self.emit is None:
            raise ValueError("count applies to emit only")
        return self


# -- facility devices over IP --------------------------------------------------------------------


def _nut_value(value: object) -> str:
    """NUT serves text: numbers are written as TOML gives them (40, 27.2); a bool is a mistake
    (``OB`` is a word of ``ups.status``, not a flag of its own)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"a NUT value is text or a number, not {value!r}")
    return str(value)


NutVariable = Annotated[str, StringConstraints(pattern=VARIABLE_PATTERN)]
NutValue = Annotated[str, BeforeValidator(_nut_value)]


class NutParams(StrictModel):
    """``[[nut]]`` params: the UPS's name on upsd, its variables at start (over
    branchsim.nutserver.DEFAULT_STATE), upsd's MAXAGE (seconds of a frozen driver before its
    data is stale: physical, never compressed by speed) and the agent's poll interval."""

    ups: str = Field(default="sim", pattern=UPS_PATTERN)
    values: dict[NutVariable, NutValue] = Field(default_factory=dict)
    maxage_s: int = Field(default=15, ge=1, le=3600)
    poll_interval_s: float = Field(default=1.0, gt=0)


class SnmpUpsSet(StrictModel):
    """What an SNMP step may change of the UPS (the keys of branchsim.snmpagent.DEFAULT_UPS, in
    the MIB's units)."""

    manufacturer: str | None = None
    model: str | None = None
    battery_status: int | None = Field(default=None, ge=1, le=4)  # 2 normal, 3 low, 4 depleted
    seconds_on_battery: int | None = Field(default=None, ge=0)
    minutes_remaining: int | None = Field(default=None, ge=0)
    charge_remaining: int | None = Field(default=None, ge=0, le=100)
    battery_voltage_dv: int | None = Field(default=None, ge=0)
    battery_temperature: int | None = None
    input_frequency_dhz: int | None = Field(default=None, ge=0)
    input_voltage: int | None = Field(default=None, ge=0)
    output_source: int | None = Field(default=None, ge=1, le=7)  # 3 normal, 4 bypass, 5 battery
    output_voltage: int | None = Field(default=None, ge=0)
    output_load: int | None = Field(default=None, ge=0)
    alarms: list[str] | None = None  # names from branchsim.snmpagent.UPS_ALARMS

    @field_validator("alarms")
    @classmethod
    def _alarm_names(cls, names: list[str] | None) -> list[str] | None:
        if bad := sorted(set(names or ()) - set(UPS_ALARMS)):
            raise ValueError(f"unknown alarms {bad} (known: {', '.join(UPS_ALARMS)})")
        return names


class SnmpOutletChange(StrictModel):
    on: bool | None = None
    current_da: int | None = Field(default=None, ge=0)  # tenths of an ampere


def _outlet_numbers(
    outlets: dict[str, SnmpOutletChange] | None,
) -> dict[str, SnmpOutletChange] | None:
    if bad := [n for n in outlets or () if not n.isdigit() or not 1 <= int(n) <= OUTLETS]:
        raise ValueError(f"outlets {bad}: the simulated PDU has outlets 1-{OUTLETS}")
    return outlets


class SnmpParams(StrictModel):
    """``[[snmp]]`` params: which profile the agent polls (the simulated device serves both a
    UPS and a PDU), the UPS values and outlets at start, the agent's poll interval."""

    profile: Profile = "ups-mib"
    ups: SnmpUpsSet = Field(default_factory=SnmpUpsSet)
    outlets: dict[str, SnmpOutletChange] = Field(default_factory=dict)
    poll_interval_s: float = Field(default=1.0, gt=0)

    _outlets = field_validator("outlets")(_outlet_numbers)


class IpDeviceSpec(StrictModel):
    """``[[nut]]``, ``[[snmp]]``, ``[[modbus_tcp]]``: the name is the agent source's
    (``nut.<name>``), so it follows the agent's source-name rule."""

    name: str = Field(pattern=NAME_PATTERN)


class NutDeviceSpec(IpDeviceSpec):
    params: NutParams = Field(default_factory=NutParams)


class SnmpDeviceSpec(IpDeviceSpec):
    params: SnmpParams = Field(default_factory=SnmpParams)


class ModbusTcpDeviceSpec(IpDeviceSpec):
    # branchsim.modbustcp's params, checked by parse_scenario (that module imports pymodbus,
    # which a scenario without a Modbus TCP device never needs)
    params: dict[str, Any] = Field(default_factory=dict)


def _one_action(step: Step, keys: tuple[str, ...]) -> None:
    if all(getattr(step, k) is None for k in keys):
        raise ValueError(f"the step does nothing (give one of {', '.join(keys)})")


class NutStep(Step):
    """``set`` NUT variables (what upsd then serves), ``driver`` = stop (upsd: driver not
    connected), start, freeze (SIGSTOP: stale after MAXAGE), thaw; ``upsd`` = stop | start (the
    server gone: connection refused). In one step: set, then driver, then upsd."""

    set: dict[NutVariable, NutValue] | None = None
    driver: Literal["stop", "start", "freeze", "thaw"] | None = None
    upsd: Literal["stop", "start"] | None = None

    @model_validator(mode="after")
    def _does_something(self) -> NutStep:
        _one_action(self, ("set", "driver", "upsd"))
        return self


class SnmpStep(Step):
    """``set`` UPS values, ``outlets = {"3" = {on = false}}``, ``snmpd`` = stop | start (no
    answer: the agent's requests time out). In one step: set, outlets, then snmpd."""

    set: SnmpUpsSet | None = None
    outlets: dict[str, SnmpOutletChange] | None = None
    snmpd: Literal["stop", "start"] | None = None

    _outlets = field_validator("outlets")(_outlet_numbers)

    @model_validator(mode="after")
    def _does_something(self) -> SnmpStep:
        _one_action(self, ("set", "outlets", "snmpd"))
        return self


class ModbusTcpStep(SerialStep):
    """branchsim.modbustcp.ModbusTcpDevice.apply's steps: ``set = {register = value}``,
    ``mute = true|false`` (connections accepted, nothing answered), ``unplug`` / ``replug``
    (connections refused meanwhile, same port after)."""

    set: dict[str, float] | None = None
    mute: bool | None = None


STEP_MODELS: dict[DeviceKind, type[Step]] = {
    "gpio": GpioStep,
    "ups": UpsStep,
    "modbus": ModbusStep,
    "line": LineStep,
    "nut": NutStep,
    "snmp": SnmpStep,
    "modbus_tcp": ModbusTcpStep,
}


class _ScenarioFile(StrictModel):
    name: str
    description: str = ""
    duration: float = Field(gt=0)
    start: dt.datetime | None = None
    agent: dict[str, Any] = Field(default_factory=dict)
    gpio: list[SimGpioInput] = Field(default_factory=list)
    ups: list[SerialDeviceSpec] = Field(default_factory=list)
    modbus: list[SerialDeviceSpec] = Field(default_factory=list)
    line: list[SerialDeviceSpec] = Field(default_factory=list)
    nut: list[NutDeviceSpec] = Field(default_factory=list)
    snmp: list[SnmpDeviceSpec] = Field(default_factory=list)
    modbus_tcp: list[ModbusTcpDeviceSpec] = Field(default_factory=list)
    steps: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _start_has_offset(self) -> _ScenarioFile:
        if self.start is not None and self.start.utcoffset() is None:
            raise ValueError("start needs a UTC offset (2026-12-01T23:30:00+01:00): a local "
                             "time alone is ambiguous")
        return self


@dataclass(frozen=True, slots=True)
class TimedStep:
    """One step at one time (``every`` already expanded), addressed to one device."""

    at: float
    device: str
    kind: DeviceKind
    step: Step


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    duration: float
    gpio: tuple[SimGpioInput, ...]
    serial: Mapping[DeviceKind, tuple[SerialDeviceSpec, ...]]
    steps: tuple[TimedStep, ...]
    origin: str = "<scenario>"
    start: float | None = None  # Unix time the agent's wall clock reads at time 0
    agent: Mapping[str, Any] | None = None  # the agent config the scenario is written for
    ip: Mapping[DeviceKind, tuple[IpDeviceSpec, ...]] = dataclasses.field(
        default_factory=dict)  # nut, snmp, modbus_tcp devices by kind


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _messages(origin: str, exc: ValidationError, prefix: tuple[int | str, ...] = ()) -> list[str]:
    msgs = []
    for err in exc.errors():
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        msgs.append(f"{origin}: {_path(prefix + tuple(err['loc']))}: {msg}")
    return msgs


def parse_scenario(data: Mapping[str, Any], origin: str = "<scenario>") -> Scenario:
    """Validate a scenario table (already parsed TOML); raises `ScenarioError` with every error."""
    try:
        raw = _ScenarioFile.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError("\n".join(_messages(origin, exc))) from None

    errors: list[str] = []
    kinds: dict[str, DeviceKind] = {}
    tables: list[tuple[DeviceKind, list[Any]]] = [
        ("gpio", raw.gpio),
        ("ups", raw.ups),
        ("modbus", raw.modbus),
        ("line", raw.line),
        ("nut", raw.nut),
        ("snmp", raw.snmp),
        ("modbus_tcp", raw.modbus_tcp),
    ]
    for kind, devices in tables:
        for i, dev in enumerate(devices):
            if dev.name in kinds:
                errors.append(f"{origin}: {kind}[{i}].name: device name {dev.name!r} used twice")
            kinds[dev.name] = kind
    pins: dict[str, str] = {}
    for i, g in enumerate(raw.gpio):
        key = normalise_pin(g.pin)
        if key in pins:
            errors.append(f"{origin}: gpio[{i}].pin: pin {g.pin!r} already used by {pins[key]!r}")
        pins[key] = g.name
    registers = _modbus_tcp_registers(origin, raw.modbus_tcp, errors)

    steps: list[TimedStep] = []
    for i, raw_step in enumerate(raw.steps):
        device = raw_step.get("device")
        if not isinstance(device, str) or device not in kinds:
            known = ", ".join(sorted(kinds)) or "none"
            errors.append(
                f"{origin}: steps[{i}].device: unknown device {device!r} (devices: {known})"
            )
            continue
        kind = kinds[device]
        try:
            step = STEP_MODELS[kind].model_validate(raw_step)
        except ValidationError as exc:
            errors.extend(_messages(origin, exc, ("steps", i)))
            continue
        if isinstance(step, ModbusTcpStep) and (
            unknown := sorted(set(step.set or {}) - registers.get(device, set(step.set or {})))
        ):
            errors.append(f"{origin}: steps[{i}].set: unknown registers {unknown} "
                          f"(known: {', '.join(sorted(registers[device]))})")
            continue
        until = raw.duration if step.until is None else step.until
        if step.at > raw.duration:
            errors.append(f"{origin}: steps[{i}].at: {step.at} is after duration {raw.duration}")
            continue
        if step.every is None:
            steps.append(TimedStep(step.at, device, kind, step))
            continue
        n = int((until - step.at) / step.every + 1e-9) + 1
        if n > MAX_EXPANDED_STEPS:
            errors.append(f"{origin}: steps[{i}].every: expands to {n} steps (max 100000)")
            continue
        steps.extend(TimedStep(step.at + k * step.every, device, kind, step) for k in range(n))
    if errors:
        raise ScenarioError("\n".join(errors))
    steps.sort(key=lambda s: s.at)  # stable: same-time steps keep file order
    return Scenario(
        name=raw.name,
        description=raw.description,
        duration=raw.duration,
        gpio=tuple(raw.gpio),
        serial={"ups": tuple(raw.ups), "modbus": tuple(raw.modbus), "line": tuple(raw.line)},
        steps=tuple(steps),
        origin=origin,
        start=raw.start.timestamp() if raw.start is not None else None,
        agent=raw.agent or None,
        ip={"nut": tuple(raw.nut), "snmp": tuple(raw.snmp), "modbus_tcp": tuple(raw.modbus_tcp)},
    )


def _modbus_tcp_registers(origin: str, devices: list[ModbusTcpDeviceSpec],
                          errors: list[str]) -> dict[str, set[str]]:
    """Checks each Modbus TCP device's params; its register names by device name."""
    if not devices:
        return {}
    from branchsim.modbustcp import ModbusTcpParams
    from branchsim.serialdev.modbus import REGISTER_MAP

    out: dict[str, set[str]] = {}
    for i, dev in enumerate(devices):
        try:
            params = ModbusTcpParams.model_validate(dev.params)
        except ValidationError as exc:
            errors.extend(_messages(origin, exc, ("modbus_tcp", i, "params")))
            continue
        names = {r.name for r in REGISTER_MAP} | {r.name for r in params.extra_registers}
        if unknown := sorted(set(params.values) - names):
            errors.append(f"{origin}: modbus_tcp[{i}].params.values: unknown registers {unknown}")
        out[dev.name] = names
    return out


def resolve_scenario(name_or_path: str | Path) -> Path:
    """A path as given, or a bare name looked up in `SCENARIO_DIR`."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists() or len(path.parts) > 1:
        return path
    candidate = SCENARIO_DIR / f"{name_or_path}.toml"
    if not candidate.exists():
        names = ", ".join(n for n, _ in list_scenarios()) or "none"
        raise ScenarioError(f"no scenario named {str(name_or_path)!r} (available: {names})")
    return candidate


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load and validate a scenario by name or path; raises `ScenarioError`."""
    path = resolve_scenario(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    return parse_scenario(data, origin=str(path))


def list_scenarios() -> list[tuple[str, str]]:
    """(name, description) of every shipped scenario, sorted by name."""
    out = []
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        try:
            desc = str(tomllib.loads(path.read_text(encoding="utf-8")).get("description", ""))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            desc = f"(unreadable: {exc})"
        out.append((path.stem, desc))
    return out
