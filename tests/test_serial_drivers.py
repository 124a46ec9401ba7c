"""Serial drivers against the simulated devices, through real ptys (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.core.clock import SystemClock
from agent.core.types import ALERT, Reading
from branchsim.serialdev import SimSerialDevice, create_device
from drivers.base import Source, SourceContext, SourceState
from drivers.serial import SerialConfig, build_sources
from drivers.serial.config import SerialPortConfig
from drivers.serial.port import open_port, read_some
from tests.support.sinks import CollectingSink, has, running

FAST = {"poll_interval_s": 0.05, "timeout_s": 0.3, "backoff_base_s": 0.05, "backoff_cap_s": 0.2}


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Callable[..., SimSerialDevice]]:
    """Factory for started simulated devices; every one is stopped at the end."""
    started: list[SimSerialDevice] = []

    def make(kind: str, name: str = "dev", **params: Any) -> SimSerialDevice:
        device = create_device(kind, name, params, tmp_path)
        device.start()
        started.append(device)
        return device

    try:
        yield make
    finally:
        for device in started:
            device.stop()


def source_for(device: SimSerialDevice, **overrides: Any) -> Source:
    """The driver source for a device, configured from the device's own agent_config."""
    entry = {**device.agent_config(), **FAST, **overrides}
    cfg = SerialConfig.model_validate({device.kind: [entry]})
    (source,) = build_sources(cfg, SourceContext(clock=SystemClock()))
    return source


def state_of(source: Source) -> SourceState:
    return source.health.state


def after(type_: str, then: str) -> Callable[[list[Reading]], bool]:
    """A reading of type `then` arrived after the last one of `type_`."""

    def check(rs: list[Reading]) -> bool:
        marks = [i for i, r in enumerate(rs) if r.type == type_]
        return bool(marks) and any(r.type == then for r in rs[marks[-1] + 1 :])

    return check


async def test_ups_power_failure_alerts_and_telemetry(
    devices: Callable[..., SimSerialDevice],
) -> None:
    """On-battery then battery-low arrive as ALERT changes; voltages as telemetry with units."""
    ups = devices("ups", "main")
    sink = CollectingSink()
    async with running(source_for(ups), sink):
        await sink.wait_for(has("ups.on_battery", False))
        ups.apply({"set": {"utility_fail": True, "input_voltage": 0.0, "battery_voltage": 25.1}})
        await sink.wait_for(has("ups.on_battery", True))
        ups.apply({"set": {"battery_low": True, "battery_voltage": 22.0}})
        await sink.wait_for(has("ups.battery_low", True))
    flags = [
        (r.type, r.value, r.priority)
        for r in sink.readings
        if r.type.endswith(("on_battery", "battery_low"))
    ]
    assert flags == [
        ("ups.on_battery", False, ALERT),
        ("ups.battery_low", False, ALERT),
        ("ups.on_battery", True, ALERT),
        ("ups.battery_low", True, ALERT),
    ]
    inputs = {(r.value, r.unit) for r in sink.of_type("ups.input_voltage")}
    assert {(230.0, "V"), (0.0, "V")} <= inputs
    battery = [r.value for r in sink.of_type("ups.battery_voltage")]
    assert battery[0] == 27.2 and battery[-1] == 22.0


async def test_ups_sim_answers_ratings_identity_and_echoes(
    devices: Callable[..., SimSerialDevice],
) -> None:
    """The simulated UPS answers F and I with fixed-width fields and echoes unknown commands."""
    ups = devices("ups", "main")
    reader, writer = await open_port(SerialPortConfig(name="raw", port=ups.path))
    try:
        replies = b""
        writer.write(b"F\rI\rXYZ\r")
        while replies.count(b"\r") < 3:
            chunk = await read_some(reader, 5.0)
            assert chunk is not None
            replies += chunk
    finally:
        writer.close()
    assert replies == b"#230.0 000 024.0 50.0\r#BRANCHSIM       SIM-UPS    1.0       \rXYZ\r"


@pytest.mark.parametrize("word_order", ["big", "little"])
async def test_modbus_values_decoded_with_units(
    devices: Callable[..., SimSerialDevice], word_order: str
) -> None:
    """Register map values arrive scaled, with SenML units, and follow the device's changes."""
    meter = devices("modbus", "meter", word_order=word_order, values={"energy": 70000})
    sink = CollectingSink()
    async with running(source_for(meter), sink):
        await sink.wait_for(has("humidity"))
        meter.apply({"set": {"voltage": 198.5, "temperature": -4.5}})
        await sink.wait_for(has("voltage", 198.5))
        await sink.wait_for(has("temperature", -4.5))
    latest = {r.type: (r.value, r.unit) for r in sink.readings if r.type != "voltage"}
    assert latest == {
        "current": (1.5, "A"),
        "active_power": (345.0, "W"),
        "energy": (70000, "Wh"),
        "frequency": (50.0, "Hz"),
        "temperature": (-4.5, "Cel"),
        "humidity": (45.0, "%RH"),
    }


@pytest.mark.parametrize("fmt", ["kv", "csv", "json"])
async def test_line_device_readings(devices: Callable[..., SimSerialDevice], fmt: str) -> None:
    """Each line format yields typed readings with units, following set steps."""
    env = devices("line", "env", format=fmt, interval_s=0)
    sink = CollectingSink()
    async with running(source_for(env), sink) as task:
        await _until_online(env, sink, task)
        env.apply({"set": {"temp": 18.25}, "emit": "reading"})
        await sink.wait_for(has("temperature", 18.25))
    assert (
        Reading("line.env", "humidity", 40.0, "%RH", sink.of_type("humidity")[-1].ts)
        in sink.readings
    )


async def _until_online(
    device: SimSerialDevice, sink: CollectingSink, task: asyncio.Task[None]
) -> None:
    """Emit readings until the source has the port open (a line sent earlier may be lost)."""

    async def poke() -> None:
        while not sink.of_type("temperature"):
            device.apply({"emit": "reading"})
            with contextlib.suppress(TimeoutError):
                await sink.wait_for(has("temperature"), timeout=0.2)

    await asyncio.wait_for(poke(), 10)
    assert not task.done()


async def test_line_garbage_counted_not_fatal(devices: Callable[..., SimSerialDevice]) -> None:
    """Garbage, framing errors, partial and over-long lines are counted; readings continue."""
    env = devices("line", "env", interval_s=0)
    sink = CollectingSink()
    source = source_for(env, max_line=256)
    async with running(source, sink) as task:
        await _until_online(env, sink, task)
        for what in ("garbage", "framing", "partial", "long"):
            env.apply({"emit": what, "count": 2})
        env.apply({"set": {"temp": 30.5}, "emit": "reading"})
        await sink.wait_for(has("temperature", 30.5))
        assert not task.done()
    # garbage (seeded) and framing lines are not text; a kv half-line run into the next line
    # ("temp=21.5temp=21.5 hum=40.0") is malformed, never a reading
    assert source.health.errors == {"framing": 4, "overlong": 2, "malformed": 2}
    assert all(isinstance(r.value, float) for r in sink.readings if r.type == "temperature")


@pytest.mark.parametrize(
    ("kind", "params", "reading"),
    [
        ("ups", {}, "ups.input_voltage"),
        ("modbus", {}, "voltage"),
        ("line", {"interval_s": 0.05}, "temperature"),
    ],
)
async def test_unplug_offline_replug_online(
    devices: Callable[..., SimSerialDevice], kind: str, params: Mapping[str, Any], reading: str
) -> None:
    """Unplug -> one source.offline; replug -> source.online and readings resume, same task."""
    device = devices(kind, "x", **params)
    source = source_for(device)
    sink = CollectingSink()
    async with running(source, sink) as task:
        await sink.wait_for(has(reading))
        device.apply({"unplug": True})
        await sink.wait_for(has("source.offline"))
        assert state_of(source) is SourceState.OFFLINE
        device.apply({"replug": True})
        await sink.wait_for(after("source.online", reading))
        assert state_of(source) is SourceState.ONLINE
        assert not task.done()
    states = [(r.type, r.priority) for r in sink.readings if r.type.startswith("source.")]
    assert states == [("source.offline", ALERT), ("source.online", ALERT)]


async def test_device_absent_at_start_then_plugged(tmp_path: Path) -> None:
    """A port that does not exist yet is offline (once) until the device appears."""
    ups = create_device("ups", "late", {}, tmp_path)
    source = source_for(ups)
    sink = CollectingSink()
    try:
        async with running(source, sink):
            await sink.wait_for(has("source.offline"))
            ups.start()
            await sink.wait_for(after("source.online", "ups.input_voltage"))
    finally:
        ups.stop()
    assert len(sink.of_type("source.offline")) == 1
    assert source.health.errors["unavailable"] >= 1


def test_sim_agent_configs_validate_as_one_serial_config(tmp_path: Path) -> None:
    """Every simulated device's agent_config is a valid entry of the driver's SerialConfig."""
    devs = [
        create_device("ups", "main", {}, tmp_path),
        create_device("modbus", "meter", {}, tmp_path),
        create_device("line", "env", {"format": "csv"}, tmp_path),
    ]
    table: dict[str, list[dict[str, Any]]] = {}
    for dev in devs:
        table.setdefault(dev.kind, []).append(dev.agent_config())
    cfg = SerialConfig.model_validate(table)
    assert [c.name for c in (*cfg.ups, *cfg.modbus, *cfg.line)] == ["main", "meter", "env"]
    assert cfg.line[0].columns == ["temp", "hum"]


def test_sim_rejects_bad_params_and_steps(tmp_path: Path) -> None:
    """Scenario mistakes are ValueErrors that name the key."""
    with pytest.raises(ValueError, match="unknown serial device kind 'fax'"):
        create_device("fax", "x", {}, tmp_path)
    with pytest.raises(ValueError, match="voltag"):
        create_device("modbus", "m", {"values": {"voltag": 1.0}}, tmp_path)
    ups = create_device("ups", "u", {}, tmp_path)
    with pytest.raises(ValueError, match="load"):
        ups.apply({"set": {"load": "lots"}})
    with pytest.raises(ValueError, match="emit"):
        create_device("line", "l", {}, tmp_path).apply({"emit": "smoke"})
