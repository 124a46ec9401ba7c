"""Scenario loading (errors name the key path) and the simulator's timeline on real MockPins."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from branchsim.scenario import (
    GpioStep,
    ScenarioError,
    list_scenarios,
    load_scenario,
    parse_scenario,
)
from branchsim.sim import Simulator
from drivers.gpio.config import GpioConfig

SHIPPED = ["door-propped-open", "facility-over-ip", "flaky-devices", "late-night-vault",
           "night-intrusion", "power-failure", "quiet-day", "sensor-dies"]


def base(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "duration": 10,
        "gpio": [{"name": "door", "pin": 17, "kind": "door", "active_high": True}],
        "ups": [{"name": "main"}],
        "steps": [],
    }
    return data | extra


def test_every_shipped_scenario_is_listed() -> None:
    """`list_scenarios` finds the eight shipped scenarios, each with a description."""
    listed = dict(list_scenarios())
    assert sorted(listed) == SHIPPED
    assert all(listed.values())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_loads_with_steps_in_time_order(name: str) -> None:
    """Each shipped scenario validates; its expanded steps are sorted and within its duration."""
    scenario = load_scenario(name)
    assert scenario.name == name
    times = [s.at for s in scenario.steps]
    assert times and times == sorted(times) and times[-1] <= scenario.duration


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (base(durration=5), "test: durration: unknown key"),
        (base(duration=0), "test: duration: Input should be greater than 0"),
        (
            base(gpio=[{"name": "door", "pin": 17, "pul_up": True}]),
            "test: gpio[0].pul_up: unknown key",
        ),
        (
            base(
                steps=[
                    {"at": 1, "device": "door", "set": True},
                    {"at": 2, "device": "door", "sett": True},
                ]
            ),
            "test: steps[1].sett: unknown key",
        ),
        (
            base(steps=[{"at": 1, "device": "main", "set": {"utility_fial": True}}]),
            "test: steps[0].set.utility_fial: unknown key",
        ),
        (
            base(steps=[{"at": 1, "device": "main", "set": {"load": "heavy"}}]),
            "test: steps[0].set.load: Input should be a valid integer",
        ),
        (
            base(steps=[{"at": 1, "device": "vault", "set": True}]),
            "steps[0].device: unknown device 'vault'",
        ),
        (
            base(steps=[{"at": 11, "device": "door", "set": True}]),
            "steps[0].at: 11.0 is after duration",
        ),
        (
            base(steps=[{"at": 1, "device": "door", "set": True, "hold": 1}]),
            "exactly one of set, hold",
        ),
        (base(steps=[{"at": 1, "device": "main", "unplug": True, "replug": True}]), "both unplug"),
        (
            base(steps=[{"at": 1, "device": "main", "emit": "garbage"}]),
            "steps[0].emit: unknown key",
        ),
        (base(ups=[{"name": "door"}]), "ups[0].name: device name 'door' used twice"),
        (
            base(gpio=[{"name": "a", "pin": 17}, {"name": "b", "pin": "GPIO17"}]),
            "gpio[1].pin: pin 'GPIO17' already used by 'a'",
        ),
    ],
)
def test_bad_scenario_error_names_the_key_path(data: dict[str, Any], message: str) -> None:
    """A bad key or value is a ScenarioError naming the origin and the key path."""
    with pytest.raises(ScenarioError) as err:
        parse_scenario(data, origin="test")
    assert message in str(err.value)


def test_bad_toml_and_unknown_name_are_clear(tmp_path: Path) -> None:
    """Broken TOML names the file and line; an unknown name lists the available scenarios."""
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nduration = = 3\n')
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML: .*line 2"):
        load_scenario(bad)
    with pytest.raises(
        ScenarioError, match=r"no scenario named 'nigth-intrusion' .*night-intrusion"
    ):
        load_scenario("nigth-intrusion")


def test_every_expands_until_inclusive() -> None:
    """`every` repeats a step from `at` up to `until` inclusive (default: the duration)."""
    steps = [
        {"at": 2, "every": 2, "until": 6, "device": "door", "pulse": 0.5},
        {"at": 9, "every": 0.5, "device": "main", "set": {"load": 30}},
        {"at": 3, "device": "door", "set": False},
    ]
    scenario = parse_scenario(base(steps=steps), origin="test")
    assert [(s.at, s.device) for s in scenario.steps] == [
        (2, "door"), (3, "door"), (4, "door"), (6, "door"),
        (9, "main"), (9.5, "main"), (10, "main"),
    ]  # fmt: skip
    assert isinstance(scenario.steps[0].step, GpioStep)


def test_timeline_drives_pins_with_bounce_and_physical_hold(tmp_path: Path) -> None:
    """The simulator's thread drives the MockPin: bounce edges, then a hold released after its
    physical duration even at speed 0."""
    data = base(
        ups=[],
        gpio=[
            {"name": "door", "pin": 17, "kind": "door", "active_high": True},
            {"name": "panic", "pin": 23, "kind": "panic"},
        ],
        steps=[
            {"at": 1, "device": "door", "set": True, "bounce": 4},
            {"at": 2, "device": "panic", "hold": 0.2},
        ],
    )
    sim = Simulator(parse_scenario(data, origin="test"), workdir=tmp_path, speed=0)
    door, panic = sim.pin_factory.pin(17), sim.pin_factory.pin(23)
    sim.start()
    try:
        assert sim.wait_done(5)
    finally:
        sim.stop()
    # Door: NC contact, pull-up, asserted (open) = high; 4 bounce edges then settled high.
    assert [s.state for s in door.states] == [False, True, False, True, False, True]
    # Panic: NO button to ground, pull-up: pressed = low, released after about 0.2 s.
    # (MockPin starts floating, low; the contact's wiring pulls it high at start.)
    assert [s.state for s in panic.states] == [False, True, False, True]
    assert 0.15 < panic.states[3].timestamp < 1.0
    assert sim.errors == 0


def test_agent_config_round_trips_through_the_gpio_model(tmp_path: Path) -> None:
    """The simulator's [sources] config validates as the driver's GpioConfig, as TOML too."""
    scenario = load_scenario("night-intrusion")
    sim = Simulator(scenario, workdir=tmp_path, speed=0)
    cfg = sim.agent_sources_config()
    gpio = GpioConfig.model_validate(cfg["gpio"])
    assert gpio.pin_factory == "mock"
    assert [i.name for i in gpio.inputs] == [g.name for g in scenario.gpio]
    parsed = tomllib.loads(sim.config_snippet())
    assert GpioConfig.model_validate(parsed["sources"]["gpio"]) == gpio
    assert parsed["sources"]["serial"] == {"ups": [], "modbus": [], "line": []}


def test_serial_scenario_exposes_device_paths(tmp_path: Path) -> None:
    """With branchsim.serialdev present, a serial scenario's devices have openable paths."""
    pytest.importorskip("branchsim.serialdev")
    sim = Simulator(load_scenario("power-failure"), workdir=tmp_path, speed=0)
    sim.start(paused=True)
    try:
        paths = sim.device_paths()
        assert set(paths) == {"main", "meter"}
        assert all(Path(p).exists() for p in paths.values())
        assert len(sim.agent_sources_config()["serial"]["ups"]) == 1
        sim.resume()
        assert sim.wait_done(10)
        assert sim.errors == 0
    finally:
        sim.stop()
