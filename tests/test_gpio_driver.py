"""GPIO driver contract: pins on a gpiozero MockFactory driven by the simulator's own thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from gpiozero import DigitalInputDevice
from gpiozero.pins.mock import MockFactory
from pydantic import ValidationError

from agent.core.clock import SystemClock
from agent.core.types import ALARM, ALERT, TELEMETRY, Reading
from branchsim.scenario import parse_scenario
from branchsim.sim import Simulator
from drivers.base import SourceContext, SourceState
from drivers.gpio.config import GpioConfig, GpioOutputConfig
from drivers.gpio.source import GpioSource, GpioStatusOutput, build_sources, build_status_output
from tests.support.sinks import CollectingSink


@contextmanager
def simulator(
    tmp_path: Path, gpio: list[dict[str, Any]], steps: list[dict[str, Any]], *, speed: float = 1.0
) -> Iterator[Simulator]:
    """A paused simulator for a GPIO-only scenario; the test resumes it once the agent is up."""
    duration = max([s["at"] for s in steps] + [0.0]) + 0.01
    scenario = parse_scenario(
        {"name": "t", "duration": duration, "gpio": gpio, "steps": steps}, origin="test"
    )
    sim = Simulator(scenario, workdir=tmp_path / "sim", speed=speed)
    sim.start(paused=True)
    try:
        yield sim
    finally:
        sim.stop()


def gpio_config(sim: Simulator, **overrides: Any) -> GpioConfig:
    data = sim.agent_sources_config()["gpio"] | overrides
    return GpioConfig.model_validate(data)


@asynccontextmanager
async def running(
    cfg: GpioConfig, factory: MockFactory, sink: CollectingSink
) -> AsyncIterator[GpioSource]:
    """Run the configured GPIO source until the block ends; initial states are in the sink."""
    sources = build_sources(cfg, SourceContext(clock=SystemClock(), pin_factory=factory))
    assert len(sources) == 1 and isinstance(sources[0], GpioSource)
    source = sources[0]
    task = asyncio.create_task(source.run(sink), name="gpio-under-test")
    try:
        n = len(cfg.inputs)
        await sink.wait_for(lambda rs: sum(1 for r in rs if (r.attrs or {}).get("initial")) >= n)
        yield source
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def changes(sink: CollectingSink, source: str) -> list[Any]:
    """Values reported for `source` after its initial state."""
    return [r.value for r in sink.readings if r.source == source and not (r.attrs or {})]


async def wait_until(pred: Callable[[], bool], within: float = 10.0) -> None:
    """Poll a condition the sink cannot signal (health counters, pin states) until it holds."""
    async with asyncio.timeout(within):
        while not pred():
            await asyncio.sleep(0.01)


DOOR = {"name": "door", "pin": 17, "kind": "door", "active_high": True, "debounce_ms": 20}


async def test_initial_state_of_every_input_is_reported(tmp_path: Path) -> None:
    """At start each input reports its current state, with its kind's type and priority."""
    gpio = [
        DOOR,
        {"name": "vault", "pin": 27, "kind": "vault", "active_high": True, "initial": True},
        {"name": "hall", "pin": 22, "kind": "motion", "active_high": True},
        {"name": "panic", "pin": 23, "kind": "panic"},
        {"name": "loop", "pin": 24, "kind": "tamper", "active_high": True, "initial": True},
    ]
    sink = CollectingSink()
    with simulator(tmp_path, gpio, []) as sim:
        async with running(gpio_config(sim), sim.pin_factory, sink) as source:
            got = {r.source: (r.type, r.value, r.priority) for r in sink.readings}
            assert source.health.state is SourceState.ONLINE
    assert got == {
        "gpio.door": ("contact", "closed", ALERT),
        "gpio.vault": ("contact", "open", ALARM),
        "gpio.hall": ("motion", False, ALERT),
        "gpio.panic": ("panic", "released", ALARM),
        "gpio.loop": ("tamper", "tampered", ALARM),
    }


async def test_contact_bounce_of_five_edges_is_one_event(tmp_path: Path) -> None:
    """Five edges within 20 ms settle into exactly one reported change."""
    steps = [{"at": 0, "device": "door", "set": True, "bounce": 4, "bounce_ms": 15}]
    sink = CollectingSink()
    # A generous debounce: a loaded machine pausing the simulator mid-bounce must not split it.
    door = DOOR | {"debounce_ms": 200}
    with simulator(tmp_path, [door], steps, speed=0) as sim:
        async with running(gpio_config(sim), sim.pin_factory, sink) as source:
            sim.resume()
            assert sim.wait_done(5)
            await wait_until(lambda: source.health.errors.get("bounces_suppressed") == 4)
            assert source.health.errors["edges"] == 5
            assert changes(sink, "gpio.door") == ["open"]
    (reading,) = [r for r in sink.readings if r.value == "open"]
    assert reading.type == "contact" and reading.priority == ALERT


async def test_callback_storm_from_foreign_thread_loses_no_settled_state(tmp_path: Path) -> None:
    """10 000 edges from the simulator thread: every settled state is reported, in order, and
    only the loop thread touches asyncio (the loop's debug mode raises otherwise)."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    # 10 bursts of 1001 edges (1 + 1000 toggles; even, so the last toggle lands on the target),
    # 0.5 s apart: a burst takes ~30 ms, so even a heavily loaded machine leaves each one time
    # to settle (debounce 20 ms) before the next.
    bursts, bounce = 10, 1000
    steps = [
        {"at": 0.5 * i, "device": "door", "set": i % 2 == 0, "bounce": bounce, "bounce_ms": 5}
        for i in range(bursts)
    ]
    sink = CollectingSink()
    try:
        with simulator(tmp_path, [DOOR], steps) as sim:
            async with running(gpio_config(sim), sim.pin_factory, sink) as source:
                sim.resume()
                expected_edges = bursts * (bounce + 1)
                counts = source.health.errors

                def settled() -> bool:
                    reported = len(changes(sink, "gpio.door"))
                    suppressed = counts.get("bounces_suppressed", 0)
                    return counts.get("edges") == expected_edges == suppressed + reported

                await wait_until(settled, within=60)
                adapter = source.adapter
                assert adapter is not None
                assert source.health.errors["edges"] == expected_edges
                assert adapter.handled_off_loop == 0
                assert adapter.callback_threads == {sim.thread_ident}
                assert sim.thread_ident != threading.get_ident()
    finally:
        loop.set_debug(False)
    reported = changes(sink, "gpio.door")
    # Each report is a change (strict alternation from the initial "closed")...
    assert reported == ["open", "closed"] * (len(reported) // 2)
    # ...and every burst's settled state is among them, in order. A loaded machine may pause
    # the simulator's thread mid-burst for longer than the debounce: that intermediate level
    # really was stable and is reported too, so extra pairs are allowed, lost states are not.
    settled_states = iter(reported)
    assert all(state in settled_states for state in ["open", "closed"] * (bursts // 2))


async def test_panic_alarms_only_when_held_for_hold_ms(tmp_path: Path) -> None:
    """A tap shorter than hold_ms is ignored; a press held longer is one ALARM, then released."""
    panic = {"name": "teller", "pin": 23, "kind": "panic", "hold_ms": 500}
    steps = [
        {"at": 0.0, "device": "teller", "hold": 0.05, "bounce": 3},
        {"at": 0.3, "device": "teller", "hold": 0.9, "bounce": 3},
    ]
    sink = CollectingSink()
    with simulator(tmp_path, [panic], steps) as sim:
        async with running(gpio_config(sim), sim.pin_factory, sink):
            sim.resume()
            await sink.wait_for(lambda _: len(changes(sink, "gpio.teller")) >= 2)
            assert sim.wait_done(5)
    assert changes(sink, "gpio.teller") == ["pressed", "released"]
    pressed = next(r for r in sink.readings if r.value == "pressed")
    assert (pressed.type, pressed.priority) == ("panic", ALARM)


async def test_periodic_snapshot_reports_every_input(tmp_path: Path) -> None:
    """Every snapshot_interval_s a contact.snapshot carries all inputs' states."""
    gpio = [DOOR, {"name": "hall", "pin": 22, "kind": "motion", "active_high": True}]
    sink = CollectingSink()
    with simulator(tmp_path, gpio, []) as sim:
        cfg = gpio_config(sim, snapshot_interval_s=0.05)
        async with running(cfg, sim.pin_factory, sink):
            await sink.wait_for(lambda _: len(sink.of_type("contact.snapshot")) >= 2)
    snap: Reading = sink.of_type("contact.snapshot")[0]
    assert (snap.source, snap.priority) == ("gpio", TELEMETRY)
    assert snap.value == {"door": "closed", "hall": False}


async def test_busy_pin_goes_offline_then_online_when_freed(tmp_path: Path) -> None:
    """A pin another device holds: source.offline, retries with backoff, source.online after."""
    sink = CollectingSink()
    with simulator(tmp_path, [DOOR], []) as sim:
        blocker = DigitalInputDevice(17, pin_factory=sim.pin_factory)
        sources = build_sources(
            gpio_config(sim), SourceContext(clock=SystemClock(), pin_factory=sim.pin_factory)
        )
        task = asyncio.create_task(sources[0].run(sink))
        try:
            await sink.wait_for(lambda _: bool(sink.of_type("source.offline")))
            assert sources[0].health.state is SourceState.OFFLINE
            assert sources[0].health.errors["open_failed"] >= 1
            blocker.close()
            await sink.wait_for(lambda _: bool(sink.of_type("source.online")))
            await sink.wait_for(lambda _: bool(sink.of_type("contact")))
        finally:
            blocker.close()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert [r.type for r in sink.readings] == ["source.offline", "source.online", "contact"]
    assert all(r.priority == ALERT for r in sink.readings[:2])


async def test_status_led_and_buzzer_follow_the_state() -> None:
    """online: LED on; fault: fast blink and three beeps; buffering: slow blink (1 s)."""
    factory = MockFactory()
    cfg = GpioConfig(pin_factory="mock", outputs=GpioOutputConfig(status_led=18, buzzer=25))
    out = build_status_output(cfg, SourceContext(clock=SystemClock(), pin_factory=factory))
    assert isinstance(out, GpioStatusOutput)
    led, buzzer = factory.pin(18), factory.pin(25)
    try:
        out.set_state("online")
        assert led.state is True
        led.clear_states()
        out.set_state("fault")
        await wait_until(lambda: len(led.states) >= 5 and len(buzzer.states) >= 7)
        assert [s.state for s in buzzer.states[-6:]] == [True, False] * 3
        # Fast blink: each phase lasts about 0.1 s.
        assert all(0.05 < s.timestamp < 0.5 for s in led.states[2:5])
        led.clear_states()
        out.set_state("buffering")
        await wait_until(lambda: len(led.states) >= 3, within=5)
        assert 0.9 < led.states[2].timestamp < 2.5
    finally:
        out.close()
        out.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inputs": [DOOR, DOOR | {"pin": 5}]}, "duplicate input name 'door'"),
        ({"inputs": [DOOR, DOOR | {"name": "d2", "pin": "GPIO17"}]}, "pin 'GPIO17' used by"),
        ({"inputs": [DOOR], "outputs": {"status_led": "17"}}, "used by both 'door'"),
        ({"inputs": [DOOR | {"hold_ms": 100}]}, "hold_ms applies to kind = 'panic' only"),
        ({"inputs": [DOOR | {"pull_up": None, "active_high": None}]}, "needs active_high"),
        ({"inputs": [DOOR | {"debounce": 5}]}, "Extra inputs are not permitted"),
        ({"pin_factory": "rpigpio"}, "Input should be 'default', 'lgpio' or 'mock'"),
    ],
)
def test_config_rejects_bad_inputs(data: dict[str, Any], message: str) -> None:
    """Duplicate names or pins, misplaced options and unknown keys are config errors."""
    with pytest.raises(ValidationError, match=message):
        GpioConfig.model_validate(data)


def test_disabled_or_empty_config_builds_no_source() -> None:
    """enabled = false or no inputs: no source and no status output."""
    ctx = SourceContext(clock=SystemClock(), pin_factory=MockFactory())
    assert build_sources(GpioConfig.model_validate({"enabled": False, "inputs": [DOOR]}), ctx) == []
    assert build_sources(GpioConfig(), ctx) == []
    assert build_status_output(GpioConfig(), ctx) is None
