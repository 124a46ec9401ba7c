"""The GPIO driver's configuration (``[sources.gpio]``) and input kinds, apart from the driver
(drivers.gpio.source): loading a config must not import gpiozero (~2 MB) on a gateway without
GPIO inputs (docs/ARCHITECTURE.md, "Config models live in light modules")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from agent.core.config import StrictModel
from agent.core.types import ALARM, ALERT, TELEMETRY, Value

__all__ = [
    "KINDS",
    "GpioConfig",
    "GpioInputConfig",
    "GpioOutputConfig",
    "InputKind",
    "KindSpec",
    "PinFactoryName",
    "PinSpec",
    "StatusState",
    "normalise_pin",
]

InputKind = Literal["door", "vault", "motion", "panic", "tamper", "keyswitch", "generic"]
PinFactoryName = Literal["default", "lgpio", "mock"]
StatusState = Literal["online", "buffering", "fault"]
PinSpec = int | str


@dataclass(frozen=True, slots=True)
class KindSpec:
    """What one kind of input reports: reading type, priority, and its two values."""

    type: str
    priority: int
    asserted: Value
    normal: Value


KINDS: dict[str, KindSpec] = {
    "door": KindSpec("contact", ALERT, "open", "closed"),
    "vault": KindSpec("contact", ALARM, "open", "closed"),
    "generic": KindSpec("contact", TELEMETRY, "open", "closed"),
    "motion": KindSpec("motion", ALERT, True, False),
    "panic": KindSpec("panic", ALARM, "pressed", "released"),
    "tamper": KindSpec("tamper", ALARM, "tampered", "normal"),
    # The arming keyswitch: asserted = turned to disarm. The runtime takes its changes (not
    # its position at start) as manual disarm/arm (agent.rules.arming, docs/RULES.md).
    "keyswitch": KindSpec("keyswitch", ALERT, "disarm", "arm"),
}


def normalise_pin(pin: PinSpec) -> str:
    """``17``, ``"17"``, ``"gpio17"`` and ``"GPIO17"`` are the same pin (for uniqueness checks)."""
    text = str(pin).strip().upper()
    return f"GPIO{text}" if text.isdigit() else text


class GpioInputConfig(StrictModel):
    """One contact: ``[[sources.gpio.inputs]]``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    pin: PinSpec
    kind: InputKind = "generic"
    # True: internal pull-up, False: pull-down, None: floating (external resistor; then
    # active_high is required).
    pull_up: bool | None = True
    # Electrical level of the *asserted* condition. None: gpiozero's default for the pull
    # (pull-up -> asserted when low, pull-down -> asserted when high).
    active_high: bool | None = None
    debounce_ms: int = Field(default=50, ge=0, le=10_000)
    hold_ms: int = Field(default=0, ge=0, le=60_000)
    priority: int | None = Field(default=None, ge=0, le=3)

    @model_validator(mode="after")
    def _check(self) -> GpioInputConfig:
        if self.pull_up is None and self.active_high is None:
            raise ValueError("a floating input (pull_up unset) needs active_high = true|false")
        if self.hold_ms and self.kind != "panic":
            raise ValueError("hold_ms applies to kind = 'panic' only")
        return self

    @property
    def source_id(self) -> str:
        return f"gpio.{self.name}"

    def gpiozero_active_high(self) -> bool:
        """The level gpiozero calls active for this pull (it refuses active_state with a pull)."""
        if self.pull_up is None:
            assert self.active_high is not None  # guaranteed by _check
            return self.active_high
        return not self.pull_up

    def asserted_high(self) -> bool:
        """Electrical level (True = high) at which the watched condition holds."""
        return self.gpiozero_active_high() if self.active_high is None else self.active_high


class GpioOutputConfig(StrictModel):
    """``[sources.gpio.outputs]``: the status LED, an optional buzzer, and named outputs the
    platform may pulse with a signed command (e.g. ``pulse = { door_strike = 17 }``; the
    command is refused unless ``[commands] allow_outputs`` also names the output)."""

    status_led: PinSpec | None = None
    buzzer: PinSpec | None = None
    active_high: bool = True
    pulse: dict[str, PinSpec] = Field(default_factory=dict)


class GpioConfig(StrictModel):
    """``[sources.gpio]``."""

    enabled: bool = True
    pin_factory: PinFactoryName = "default"
    snapshot_interval_s: float = Field(default=300.0, ge=0)
    inputs: list[GpioInputConfig] = Field(default_factory=list)
    outputs: GpioOutputConfig = Field(default_factory=GpioOutputConfig)

    @model_validator(mode="after")
    def _unique(self) -> GpioConfig:
        names: set[str] = set()
        pins: dict[str, str] = {}
        used = [(i.name, i.pin) for i in self.inputs]
        outs = (("status_led", self.outputs.status_led), ("buzzer", self.outputs.buzzer))
        used += [(f"outputs.{what}", pin) for what, pin in outs if pin is not None]
        used += [(f"outputs.pulse.{what}", pin) for what, pin in self.outputs.pulse.items()]
        for i in self.inputs:
            if i.name in names:
                raise ValueError(f"duplicate input name {i.name!r}")
            names.add(i.name)
        for name, pin in used:
            key = normalise_pin(pin)
            if key in pins:
                raise ValueError(f"pin {pin!r} used by both {pins[key]!r} and {name!r}")
            pins[key] = name
        return self
