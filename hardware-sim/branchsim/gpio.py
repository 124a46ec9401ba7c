"""Simulated GPIO contacts: a MockPin with a contact wired to it, and the contact's behaviour
(levels, bounce) as the timeline asks for it."""

from __future__ import annotations

import time

from gpiozero.pins.mock import MockFactory, MockPin

from branchsim.scenario import SimGpioInput

__all__ = ["SimContact", "WiredPin", "sim_pin_factory"]


class WiredPin(MockPin):  # type: ignore[misc]  # gpiozero is untyped: MockPin is Any to mypy
    """A MockPin with something wired to it: the wired level wins over the internal pull.

    MockPin re-drives an input to its pull level whenever its function or pull is set, so an
    agent opening the pin after the simulator set it would overwrite the contact's state. On a
    real board the contact (a few ohms) beats the ~50 kOhm internal pull; `wire` models that.
    """

    _wired: bool | None = None

    def wire(self, high: bool) -> None:
        """Drive the pin from outside: it stays at `high` whatever pull is set later."""
        self._wired = high
        if high:
            super().drive_high()
        else:
            super().drive_low()

    def drive_high(self) -> None:
        if self._wired is False:
            super().drive_low()
        else:
            super().drive_high()

    def drive_low(self) -> None:
        if self._wired is True:
            super().drive_high()
        else:
            super().drive_low()


def sim_pin_factory() -> MockFactory:
    """A MockFactory whose pins are `WiredPin`s (plain MockPin behaviour until wired)."""
    return MockFactory(pin_class=WiredPin)


class SimContact:
    """One simulated contact (door reed, PIR relay, panic button, tamper loop) on a pin.

    Call only from the simulator's thread: gpiozero then calls the agent back on that thread,
    as lgpio does from its own.
    """

    def __init__(self, cfg: SimGpioInput, factory: MockFactory) -> None:
        self.cfg = cfg
        pin = factory.pin(cfg.pin)
        if not isinstance(pin, WiredPin):
            raise TypeError("the simulator's pin factory must make WiredPin pins")
        self.pin: WiredPin = pin
        self.asserted = cfg.initial
        self._drive(cfg.initial)

    def _drive(self, asserted: bool) -> None:
        self.pin.wire(asserted == self.cfg.asserted_high())

    def set(self, asserted: bool, *, bounce: int = 0, bounce_ms: float = 5.0) -> None:
        """Move the contact to `asserted`, with `bounce` extra alternating edges spread over
        `bounce_ms` before it settles (the agent's debounce must swallow them)."""
        self.asserted = asserted
        self._drive(asserted)
        if not bounce:
            return
        gap = bounce_ms / 1000.0 / (bounce + 1)
        start = time.monotonic()
        level = asserted
        for i in range(1, bounce + 1):
            level = not level
            delay = start + i * gap - time.monotonic()
            if delay > 0.0005:  # below that, sleep() overshoots more than the gap itself
                time.sleep(delay)
            self._drive(level)
        self._drive(asserted)
