"""NUT, SNMP and Modbus TCP devices as scenario devices: their tables and steps are validated
with the key path, the simulator runs Debian's real upsd/dummy-ups and snmpd and pymodbus's TCP
server for them, and facility-over-ip reaches the outbox through the agent's real runtime."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.core.types import ALERT, TELEMETRY
from agent.runtime.root import Runtime
from branchsim import cli, nutserver, snmpagent
from branchsim.agentrun import merge_sim_sources
from branchsim.scenario import (
    NutDeviceSpec,
    NutStep,
    ScenarioError,
    SnmpStep,
    SnmpUpsSet,
    load_scenario,
    parse_scenario,
)
from branchsim.sim import Simulator, SimUnavailable
from tests.support.offline import Events, offline_gateway, outbox_events
from tests.test_sim_agent import float32, play, readings

HAVE_NUT = nutserver.find_nut() is not None
HAVE_SNMPD = snmpagent.find_snmpd() is not None
needs_daemons = pytest.mark.skipif(
    not (HAVE_NUT and HAVE_SNMPD),
    reason="needs Debian's nut-server (upsd, dummy-ups) and snmpd")


def ip_branch(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "duration": 10,
        "gpio": [{"name": "door", "pin": 17}],
        "nut": [{"name": "ups", "params": {"ups": "rack", "values": {"battery.charge": 80}}}],
        "snmp": [{"name": "pdu", "params": {"profile": "pdu-outlets",
                                            "outlets": {"8": {"on": False}}}}],
        "modbus_tcp": [{"name": "meter", "params": {"unit_id": 3}}],
        "steps": [],
    }
    return data | extra


# --- the scenario file -------------------------------------------------------------------------


def test_ip_tables_and_steps_parse_into_what_the_devices_take() -> None:
    """The three tables load with their params; each step's payload is what the simulated
    device's `apply` takes (NUT values as the text upsd serves)."""
    scenario = parse_scenario(ip_branch(steps=[
        {"at": 1, "device": "ups", "set": {"ups.status": "OB LB", "battery.charge": 40,
                                           "battery.voltage": 24.5}, "driver": "freeze"},
        {"at": 2, "device": "pdu", "set": {"output_source": 5, "alarms": ["on_battery"]},
         "outlets": {"3": {"on": False}}},
        {"at": 3, "device": "pdu", "snmpd": "stop"},
        {"at": 4, "device": "meter", "set": {"voltage": 0}, "mute": True},
        {"at": 5, "device": "meter", "unplug": True},
        {"at": 6, "device": "ups", "upsd": "stop"},
    ]), origin="test")
    (nut,), (snmp,), (meter,) = (scenario.ip[k] for k in ("nut", "snmp", "modbus_tcp"))
    assert (nut.name, snmp.name, meter.name) == ("ups", "pdu", "meter")
    assert isinstance(nut, NutDeviceSpec)
    assert nut.params.ups == "rack" and nut.params.values == {"battery.charge": "80"}
    assert [(s.device, s.kind, s.step.payload()) for s in scenario.steps] == [
        ("ups", "nut", {"set": {"ups.status": "OB LB", "battery.charge": "40",
                                "battery.voltage": "24.5"}, "driver": "freeze"}),
        ("pdu", "snmp", {"set": {"output_source": 5, "alarms": ["on_battery"]},
                         "outlets": {"3": {"on": False}}}),
        ("pdu", "snmp", {"snmpd": "stop"}),
        ("meter", "modbus_tcp", {"set": {"voltage": 0.0}, "mute": True}),
        ("meter", "modbus_tcp", {}),  # unplug/replug are the step's own flags
        ("ups", "nut", {"upsd": "stop"}),
    ]
    assert isinstance(scenario.steps[0].step, NutStep)
    assert isinstance(scenario.steps[1].step, SnmpStep)


def test_snmp_step_keys_are_the_simulators_ups_values() -> None:
    """An SNMP `set` takes exactly the keys of branchsim.snmpagent.DEFAULT_UPS."""
    assert set(SnmpUpsSet.model_fields) == set(snmpagent.DEFAULT_UPS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (ip_branch(steps=[{"at": 1, "device": "ups", "sett": {"ups.status": "OB"}}]),
         "test: steps[0].sett: unknown key"),
        (ip_branch(steps=[{"at": 1, "device": "ups", "set": {"ups.status": True}}]),
         "test: steps[0].set.ups.status: Value error, a NUT value is text or a number"),
        (ip_branch(steps=[{"at": 1, "device": "ups", "set": {"UPS": "OB"}}]),
         "test: steps[0].set.UPS.[key]: String should match pattern"),
        (ip_branch(steps=[{"at": 1, "device": "ups", "driver": "pause"}]),
         "test: steps[0].driver: Input should be 'stop', 'start', 'freeze' or 'thaw'"),
        (ip_branch(steps=[{"at": 1, "device": "ups"}]), "test: steps[0]: Value error, the step "
         "does nothing (give one of set, driver, upsd)"),
        (ip_branch(steps=[{"at": 1, "device": "pdu", "set": {"charge_remainig": 40}}]),
         "test: steps[0].set.charge_remainig: unknown key"),
        (ip_branch(steps=[{"at": 1, "device": "pdu", "set": {"alarms": ["on_fire"]}}]),
         "test: steps[0].set.alarms: Value error, unknown alarms ['on_fire']"),
        (ip_branch(steps=[{"at": 1, "device": "pdu", "outlets": {"9": {"on": False}}}]),
         "test: steps[0].outlets: Value error, outlets ['9']: the simulated PDU has outlets 1-8"),
        (ip_branch(steps=[{"at": 1, "device": "pdu", "outlets": {"3": {"of": True}}}]),
         "test: steps[0].outlets.3.of: unknown key"),
        (ip_branch(steps=[{"at": 1, "device": "pdu", "snmpd": "restart"}]),
         "test: steps[0].snmpd: Input should be 'stop' or 'start'"),
        (ip_branch(steps=[{"at": 1, "device": "meter", "set": {"voltag": 0}}]),
         "test: steps[0].set: unknown registers ['voltag']"),
        (ip_branch(steps=[{"at": 1, "device": "meter", "mute": "yes please"}]),
         "test: steps[0].mute: Input should be a valid boolean"),
        (ip_branch(nut=[{"name": "ups", "params": {"maxage": 3}}]),
         "test: nut[0].params.maxage: unknown key"),
        (ip_branch(snmp=[{"name": "pdu", "params": {"profile": "pdu"}}]),
         "test: snmp[0].params.profile: Input should be 'ups-mib' or 'pdu-outlets'"),
        (ip_branch(modbus_tcp=[{"name": "meter", "params": {"unit": 3}}]),
         "test: modbus_tcp[0].params.unit: unknown key"),
        (ip_branch(modbus_tcp=[{"name": "meter", "params": {"values": {"volts": 1}}}]),
         "test: modbus_tcp[0].params.values: unknown registers ['volts']"),
        (ip_branch(nut=[{"name": "Main UPS"}]), "test: nut[0].name: String should match"),
        # names are unique across every kind of device
        (ip_branch(nut=[{"name": "door"}]), "test: nut[0].name: device name 'door' used twice"),
        (ip_branch(modbus_tcp=[{"name": "pdu"}]),
         "test: modbus_tcp[0].name: device name 'pdu' used twice"),
        (ip_branch(ups=[{"name": "meter"}]),
         "test: modbus_tcp[0].name: device name 'meter' used twice"),
    ],
)
def test_bad_ip_device_or_step_names_the_key_path(data: dict[str, Any], message: str) -> None:
    """A bad IP device table or step is a ScenarioError naming the origin and the key path."""
    with pytest.raises(ScenarioError) as err:
        parse_scenario(data, origin="test")
    assert message in str(err.value)


def test_loading_a_scenario_imports_no_device_library() -> None:
    """scenario.py loads facility-over-ip without pymodbus or any daemon's module starting
    anything: a scenario without Modbus TCP devices never imports pymodbus at all."""
    code = ("import sys; from branchsim.scenario import load_scenario; "
            "load_scenario('power-failure'); "
            "assert not [m for m in sys.modules if m.startswith('pymodbus')], 'pymodbus'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


# --- daemons missing, start failing half-way -----------------------------------------------------


@pytest.mark.parametrize(
    ("module", "finder", "package"),
    [(nutserver, "find_nut", "nut-server"), (snmpagent, "find_snmpd", "snmpd")],
)
def test_missing_daemon_is_a_clear_error_naming_the_package(
    module: Any, finder: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without upsd/dummy-ups (or snmpd) facility-over-ip fails at start, before anything
    starts, with SimUnavailable naming the Debian package; `branch-sim run` exits 2 with that
    line and no traceback."""
    monkeypatch.setattr(module, finder, lambda: None)
    sim = Simulator(load_scenario("facility-over-ip"), workdir=tmp_path / "w", speed=0)
    with pytest.raises(SimUnavailable, match=rf"not installed here: apt install {package}$"):
        sim.start()
    assert not (tmp_path / "w").exists()  # nothing was started, not even a temp dir made
    # the CLI in a process of its own (it configures logging for the process), the same
    # lookup answering None there
    code = (f"import sys; from branchsim import {module.__name__.rsplit('.', 1)[1]} as m; "
            f"m.{finder} = lambda: None; from branchsim.cli import main; "
            f"sys.exit(main(['run', 'facility-over-ip', '--speed', '0', "
            f"'--workdir', {str(tmp_path / 'cli')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"apt install {package}" in result.stderr
    assert "facility-over-ip.toml" in result.stderr
    assert "Traceback" not in result.stderr and cli.CONFIG_BEGIN not in result.stdout


@needs_daemons
def test_start_failing_half_way_stops_every_daemon_started(tmp_path: Path) -> None:
    """When the last IP device cannot start (its port is taken), the NUT server and snmpd
    already started are stopped: their ports are free again."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        scenario = parse_scenario(ip_branch(modbus_tcp=[{"name": "meter",
                                                         "params": {"port": port}}]))
        sim = Simulator(scenario, workdir=tmp_path, speed=0)
        with pytest.raises(RuntimeError, match="Could not start listen"):  # pymodbus's words
            sim.start()
    try:
        addresses = sim.device_addresses()
        nut_port = int(addresses["ups"].rsplit(":", 1)[1])
        snmp_port = int(addresses["pdu"].rsplit(":", 1)[1])
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", nut_port)) != 0  # upsd is gone
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", snmp_port))  # snmpd no longer holds it
    finally:
        # when the promise is broken (make mutants), the daemons would outlive the test
        for device in sim._ip.values():
            device.sim.stop()


# --- the agent's real runtime on facility-over-ip -------------------------------------------------


def status(evs: Events, src: str) -> list[tuple[str, Any, int]]:
    """`src`'s source.offline / source.online events: (type, value, priority)."""
    return [(e["type"], e["v"], e["prio"]) for e in evs
            if e["src"] == src and e["type"].startswith("source.")]


def changes(evs: Events, src: str, *types: str) -> list[tuple[str, Any]]:
    """(type, value) of `src`'s readings of `types` whenever the value differs from that type's
    previous one, in outbox order."""
    last: dict[str, Any] = {}
    out = []
    for e in evs:
        if e["src"] == src and e["type"] in types and last.get(e["type"], object()) != e["v"]:
            last[e["type"]] = e["v"]
            out.append((e["type"], e["v"]))
    return out


def first_id(evs: Events, src: str, type_: str, value: Any) -> int:
    return int(next(e["id"] for e in evs if (e["src"], e["type"], e["v"]) == (src, type_, value)))


@needs_daemons
async def test_facility_over_ip_reaches_the_outbox(tmp_path: Path) -> None:
    """facility-over-ip at 5x: the NUT UPS goes on battery, then battery low, then back on
    mains; the PDU's outlet 6 goes off and on; the meter reads 0 V, goes offline while it is
    mute and online again, then reads mains; each as the agent's real sources report it."""
    def done(evs: Events) -> bool:
        return (readings(evs, "nut.ups").get("ups.on_battery", (None, 0, []))[2][-1:] == [False]
                and len(readings(evs, "nut.ups")["ups.on_battery"][2]) > 1
                and readings(evs, "snmp.pdu").get("pdu.outlet.6.on", (None, 0, []))[2]
                == [True, False, True]
                and len(status(evs, "modbus_tcp.meter")) == 2
                and readings(evs, "modbus_tcp.meter")["voltage"][2][-1] == float32(229.8))

    evs = (await play(tmp_path, "facility-over-ip", 5.0, done, timeout=45.0,
                      to_the_end=True)).events

    ups = readings(evs, "nut.ups")
    assert ups["ups.on_battery"] == (None, ALERT, [False, True, False])
    assert ups["ups.battery_low"] == (None, ALERT, [False, True, False])
    assert ups["ups.input_voltage"] == ("V", TELEMETRY, [230.1, 0, 229.8])
    assert ups["ups.battery_charge"][2] == [100, 90, 18, 20]
    # in the order the timeline played them
    assert changes(evs, "nut.ups", "ups.on_battery", "ups.battery_low") == [
        ("ups.on_battery", False), ("ups.battery_low", False),  # the first poll
        ("ups.on_battery", True), ("ups.battery_low", True),
        ("ups.on_battery", False), ("ups.battery_low", False)]

    pdu = readings(evs, "snmp.pdu")
    assert pdu["pdu.outlet.6.on"] == (None, ALERT, [True, False, True])
    assert all(pdu[f"pdu.outlet.{n}.on"][2] == [True] for n in (1, 2, 3, 4, 5, 7, 8))
    off = next(e for e in evs if (e["src"], e["type"], e["v"]) == ("snmp.pdu", "pdu.outlet.6.on",
                                                                   False))
    assert off["attrs"] == {"outlet": 6, "label": "outlet-6"}

    meter = readings(evs, "modbus_tcp.meter")
    assert meter["voltage"] == ("V", TELEMETRY, [float32(230.0), 0.0, float32(229.8)])
    assert meter["active_power"] == ("W", TELEMETRY, [float32(345.0), 0.0, float32(350.0)])
    (offline_reason, online) = status(evs, "modbus_tcp.meter")
    assert offline_reason[0] == "source.offline" and offline_reason[2] == ALERT
    assert "no answer" in offline_reason[1]
    assert online == ("source.online", True, ALERT)
    # mute while on battery (after 0 V was read), back before the mains returned
    assert (first_id(evs, "modbus_tcp.meter", "voltage", 0.0)
            < first_id(evs, "modbus_tcp.meter", "source.offline", offline_reason[1])
            < first_id(evs, "modbus_tcp.meter", "source.online", True)
            < first_id(evs, "modbus_tcp.meter", "voltage", float32(229.8)))
    # the NUT and SNMP devices never went away
    assert status(evs, "nut.ups") == [] and status(evs, "snmp.pdu") == []


@needs_daemons
async def test_nut_and_snmp_daemon_steps_take_the_sources_offline(tmp_path: Path) -> None:
    """NUT steps stop the driver, stop upsd and freeze the driver, SNMP steps stop snmpd: each
    time the source reports source.offline with the reason the daemon gives (not running, the
    connection lost, stale data after MAXAGE), and source.online once it is back."""
    scenario = parse_scenario({
        "name": "daemons", "duration": 28,
        "nut": [{"name": "ups", "params": {"poll_interval_s": 0.2, "maxage_s": 2}}],
        "snmp": [{"name": "card", "params": {"poll_interval_s": 0.2}}],
        # real seconds (speed 1): upsd takes a few to find a restarted driver again, and each
        # episode must be over before the next begins (one offline/online pair each), with
        # room for a loaded CI machine
        "steps": [
            {"at": 1, "device": "ups", "driver": "stop"},
            {"at": 3, "device": "ups", "driver": "start"},
            {"at": 12, "device": "ups", "upsd": "stop"},
            {"at": 14, "device": "ups", "upsd": "start"},
            {"at": 20, "device": "ups", "driver": "freeze"},
            {"at": 27, "device": "ups", "driver": "thaw"},
            {"at": 1, "device": "card", "snmpd": "stop"},
            {"at": 5, "device": "card", "snmpd": "start"},
        ],
    }, origin="daemons")
    cfg = parse_config(offline_gateway(tmp_path, "ip-gw"))
    sim = Simulator(scenario, workdir=tmp_path / "sim", speed=1.0)
    sim.start(paused=True)
    try:
        rt = Runtime(merge_sim_sources(cfg, sim.agent_sources_config()))
        stop = asyncio.Event()
        task = asyncio.create_task(rt.run(stop))
        try:
            await asyncio.wait_for(rt.ready.wait(), 15)
            sim.resume()
            async with asyncio.timeout(50):
                while not (sim.wait_done(0) and len(status(outbox_events(cfg.gateway.state_dir),
                                                           "nut.ups")) == 6
                           and len(status(outbox_events(cfg.gateway.state_dir),
                                          "snmp.card")) == 2):
                    await asyncio.sleep(0.05)  # polling interval of a condition wait
        finally:
            stop.set()
            await task
    finally:
        sim.stop()
    evs = outbox_events(cfg.gateway.state_dir)
    nut = status(evs, "nut.ups")
    assert [(t, p) for t, _, p in nut] == [("source.offline", ALERT), ("source.online", ALERT)] * 3
    assert "driver of UPS 'sim' is not running" in nut[0][1]
    assert "connection to the NUT server" in nut[2][1] and "lost" in nut[2][1]
    assert "is stale" in nut[4][1]
    card = status(evs, "snmp.card")
    assert [(t, p) for t, _, p in card] == [("source.offline", ALERT), ("source.online", ALERT)]
    assert "no answer" in card[0][1]
    assert sim.errors == 0
