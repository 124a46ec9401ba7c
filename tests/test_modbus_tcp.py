"""Modbus TCP source against pymodbus's own TCP server (branchsim.modbustcp), started per test
on 127.0.0.1 and a free port, and stopped after; the RTU comparison runs the simulated RTU
meter on a real pty."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from pydantic import TypeAdapter, ValidationError

from agent.core.clock import SystemClock
from agent.core.types import ALERT, TELEMETRY, Reading
from branchsim.modbustcp import ModbusTcpDevice
from branchsim.serialdev import SimSerialDevice
from drivers.base import Source, SourceContext, SourceState
from drivers.modbus_tcp.config import ModbusTcpConfig, ModbusTcpConfigs
from drivers.modbus_tcp.source import build_sources, check_reachable
from drivers.serial import SerialConfig
from drivers.serial import build_sources as build_serial
from tests import test_serial_drivers as _serial
from tests.support.sinks import CollectingSink, has, running
from tests.test_serial_drivers import FAST, after, state_of

devices = _serial.devices  # simulated serial devices on real ptys (the RTU meter)

GHOST = {"name": "ghost", "address": 500, "function": "holding", "type": "uint16"}


@pytest.fixture
def meters() -> Iterator[Callable[..., ModbusTcpDevice]]:
    """Factory for started simulated Modbus TCP meters; every one is stopped at the end."""
    started: list[ModbusTcpDevice] = []

    def make(name: str = "meter", **params: Any) -> ModbusTcpDevice:
        meter = ModbusTcpDevice(name, params)
        started.append(meter)
        return meter.start()

    try:
        yield make
    finally:
        for meter in started:
            meter.stop()


def config_for(meter: ModbusTcpDevice, **overrides: Any) -> ModbusTcpConfig:
    return ModbusTcpConfig.model_validate({**meter.agent_config(), **FAST, **overrides})


def source_for(meter: ModbusTcpDevice, **overrides: Any) -> Source:
    """The driver source, configured from the simulated meter's own agent_config."""
    (source,) = build_sources([config_for(meter, **overrides)], SourceContext(SystemClock()))
    return source


def latest(readings: list[Reading]) -> dict[str, tuple[Any, str | None, int]]:
    return {r.type: (r.value, r.unit, r.priority) for r in readings}


async def until(cond: Callable[[], bool], within: float = 10.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)  # the polling step of a bounded condition wait

    await asyncio.wait_for(poll(), within)


@pytest.mark.parametrize("word_order", ["big", "little"])
async def test_values_units_word_orders_and_scale(
    meters: Callable[..., ModbusTcpDevice], word_order: str
) -> None:
    """float32/uint32/int32 in either word order, scaled int16/uint16, each with its SenML unit;
    a value the device changes is read on the next poll."""
    net = {"name": "net_energy", "function": "input", "address": 20, "type": "int32",
           "unit": "Wh", "initial": -70000}
    meter = meters(word_order=word_order, values={"energy": 70000, "temperature": -4.5},
                   extra_registers=[net])
    sink = CollectingSink()
    async with running(source_for(meter), sink):
        await sink.wait_for(has("net_energy"))
        first = latest(sink.readings)
        meter.apply({"set": {"voltage": 198.5, "net_energy": 123456}})
        await sink.wait_for(has("voltage", 198.5))
        await sink.wait_for(has("net_energy", 123456))
    assert first == {
        "voltage": (230.0, "V", TELEMETRY),
        "current": (1.5, "A", TELEMETRY),
        "active_power": (345.0, "W", TELEMETRY),
        "energy": (70000, "Wh", TELEMETRY),
        "frequency": (50.0, "Hz", TELEMETRY),
        "temperature": (-4.5, "Cel", TELEMETRY),
        "humidity": (45.0, "%RH", TELEMETRY),
        "net_energy": (-70000, "Wh", TELEMETRY),
    }
    assert {r.source for r in sink.readings} == {"modbus_tcp.meter"}
    assert type(first["energy"][0]) is int and type(first["voltage"][0]) is float


async def test_rtu_register_map_reads_the_same_over_tcp(
    meters: Callable[..., ModbusTcpDevice], devices: Callable[..., SimSerialDevice]
) -> None:
    """The RTU meter's register map, unchanged, gives equal readings (type, value and its
    Python type, unit, priority) from the same values served over TCP and over RTU."""
    values = {"voltage": 231.7, "energy": 4_000_000_000, "temperature": -12.3,
              "frequency": 49.98, "humidity": 61.2}
    rtu_dev = devices("modbus", "meter", word_order="little", values=values)
    tcp_dev = meters(word_order="little", values=values)
    rtu_map = rtu_dev.agent_config()["registers"]
    (rtu,) = build_serial(
        SerialConfig.model_validate({"modbus": [{**rtu_dev.agent_config(), **FAST}]}),
        SourceContext(SystemClock()),
    )
    tcp = source_for(tcp_dev, registers=rtu_map)
    got: list[dict[str, tuple[Any, str, str | None, int]]] = []
    for source in (rtu, tcp):
        sink = CollectingSink()
        async with running(source, sink):
            await sink.wait_for(lambda rs: len(rs) >= len(rtu_map))
        got.append({r.type: (r.value, type(r.value).__name__, r.unit, r.priority)
                    for r in sink.readings[: len(rtu_map)]})
    assert got[0] == got[1]
    assert got[1]["energy"] == (4_000_000_000, "int", "Wh", TELEMETRY)
    assert got[1]["temperature"] == (-12.3, "float", "Cel", TELEMETRY)


async def test_server_down_offline_back_on_same_port_online(
    meters: Callable[..., ModbusTcpDevice],
) -> None:
    """Server stopped -> one source.offline (refused reconnects counted); restarted on the same
    port -> source.online and readings resume, in the same task."""
    meter = meters()
    source = source_for(meter)
    sink = CollectingSink()
    async with running(source, sink) as task:
        await sink.wait_for(has("voltage"))
        await asyncio.to_thread(meter.unplug)
        await sink.wait_for(has("source.offline"))
        assert state_of(source) is SourceState.OFFLINE
        await until(lambda: source.health.errors.get("connect_failed", 0) >= 2)
        await asyncio.to_thread(meter.replug)
        await sink.wait_for(after("source.online", "voltage"))
        assert state_of(source) is SourceState.ONLINE
        assert not task.done()
    states = [(r.type, r.priority) for r in sink.readings if r.type.startswith("source.")]
    assert states == [("source.offline", ALERT), ("source.online", ALERT)]
    assert sink.of_type("source.offline")[0].value == "connection closed by the device"
    assert source.health.errors["connection_lost"] == 1
    assert source.health.errors["unavailable"] == 1 + source.health.errors["connect_failed"]


async def test_connection_dropped_between_polls_is_reported_not_silently_reopened(
    meters: Callable[..., ModbusTcpDevice],
) -> None:
    """A device that drops the connection and is back before the next poll (a quick reboot)
    is still reported offline then online: pymodbus never reconnects behind the source's back."""
    meter = meters()
    source = source_for(meter, poll_interval_s=1.0)
    sink = CollectingSink()
    async with running(source, sink):
        await sink.wait_for(has("voltage"))  # emitted just before the source's 1 s sleep
        await asyncio.to_thread(meter.unplug)
        await asyncio.to_thread(meter.replug)
        await sink.wait_for(after("source.online", "voltage"))
    assert source.health.errors == {"connection_lost": 1, "unavailable": 1}
    assert source.health.detail == ""


async def test_illegal_address_counted_logged_once_source_stays_online(
    meters: Callable[..., ModbusTcpDevice],
) -> None:
    """A register the device does not have: its exception reply is counted on every poll and
    logged once per interval; the other registers keep coming and the source stays online."""
    meter = meters()
    regs = [*meter.agent_config()["registers"], GHOST]
    source = source_for(meter, registers=regs)
    sink = CollectingSink()
    with structlog.testing.capture_logs() as logs:
        async with running(source, sink):
            await until(lambda: source.health.errors.get("exception_reply", 0) >= 3)
            meter.apply({"set": {"humidity": 50.0}})
            await sink.wait_for(has("humidity", 50.0))
            assert state_of(source) is SourceState.ONLINE
    assert not sink.of_type("source.offline") and not sink.of_type("ghost")
    assert set(source.health.errors) == {"exception_reply"}
    refusals = [e for e in logs if e["event"] == "modbus_tcp.exception_reply"]
    assert len(refusals) == 1
    assert refusals[0]["address"] == 500 and refusals[0]["registers"] == ["ghost"]
    assert "illegal data address" in refusals[0]["reply"]


async def test_unanswered_requests_count_as_timeouts(
    meters: Callable[..., ModbusTcpDevice],
) -> None:
    """A device that accepts the connection but answers nothing: timeouts counted, offline;
    answering again -> online."""
    meter = meters()
    source = source_for(meter)
    sink = CollectingSink()
    async with running(source, sink):
        await sink.wait_for(has("voltage"))
        meter.apply({"mute": True})
        await sink.wait_for(has("source.offline"))
        await until(lambda: source.health.errors.get("timeout", 0) >= 2)
        assert "no answer within 0.3 s" in source.health.detail
        meter.apply({"mute": False})
        await sink.wait_for(after("source.online", "voltage"))
    assert "connect_failed" not in source.health.errors


async def test_doctor_check_reachable(meters: Callable[..., ModbusTcpDevice]) -> None:
    """The doctor reads the first planned block once: ok, refused, silent, unreachable."""
    meter = meters()
    ok = await check_reachable(config_for(meter))
    assert (ok.ok, ok.detail) == (True, f"127.0.0.1:{meter.port} unit 1 answers (holding 100 +2)")

    refused = await check_reachable(config_for(meter, registers=[GHOST]))
    assert not refused.ok and "illegal data address" in refused.detail
    assert "register map" in refused.fix

    meter.apply({"mute": True})
    silent = await check_reachable(config_for(meter))
    assert not silent.ok and "no answer within 0.3 s" in silent.detail
    assert "unit_id" in silent.fix

    await asyncio.to_thread(meter.unplug)
    down = await check_reachable(config_for(meter))
    assert not down.ok and down.detail.endswith(f"cannot connect to 127.0.0.1:{meter.port}")
    assert "firewall" in down.fix


def test_config_reuses_the_rtu_register_map_and_validates(
    devices: Callable[..., SimSerialDevice],
) -> None:
    """An RTU meter's register list is a valid TCP config unchanged; duplicates and bad hosts
    are errors that name the problem; defaults are the Modbus TCP ones."""
    rtu_map = devices("modbus", "rtu").agent_config()["registers"]
    cfg = ModbusTcpConfig.model_validate({"name": "m", "host": "10.0.0.7", "registers": rtu_map})
    assert (cfg.port, cfg.unit_id, cfg.where) == (502, 1, "10.0.0.7:502")
    assert ModbusTcpConfig(name="m", host="fd00::7", registers=cfg.registers).where == (
        "[fd00::7]:502")
    with pytest.raises(ValidationError, match="duplicate register names: voltage"):
        ModbusTcpConfig.model_validate(
            {"name": "m", "host": "h", "registers": [rtu_map[0], rtu_map[0]]})
    with pytest.raises(ValidationError, match="host"):
        ModbusTcpConfig.model_validate({"name": "m", "host": "h/x", "registers": rtu_map})
    with pytest.raises(ValidationError, match="duplicate modbus_tcp names: m"):
        TypeAdapter(ModbusTcpConfigs).validate_python([cfg.model_dump()] * 2)


def test_sim_rejects_bad_params_and_steps() -> None:
    """Scenario mistakes are ValueErrors that name the key."""
    with pytest.raises(ValueError, match="voltag"):
        ModbusTcpDevice("m", {"values": {"voltag": 1.0}})
    with pytest.raises(ValueError, match="past 127"):
        ModbusTcpDevice("m", {"extra_registers": [{**GHOST, "address": 127, "type": "int32"}]})
    meter = ModbusTcpDevice("m")
    with pytest.raises(ValueError, match="explode"):
        meter.apply({"explode": True})
    with pytest.raises(ValueError, match="voltag"):
        meter.apply({"set": {"voltag": 1.0}})


def test_config_and_source_modules_import_no_pymodbus() -> None:
    """pymodbus is imported when a device is polled, not when the driver is loaded."""
    code = ("import sys, drivers.modbus_tcp.config, drivers.modbus_tcp.source; "
            "print('pymodbus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "False"
