"""The agent's real runtime on the simulated branch (`branch-sim agent`): scenarios end up in the
outbox as the expected events, through the real seams (MockFactory pins, pty serial ports)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.runtime.root import Runtime
from branchsim.agentrun import merge_sim_sources, started_sim
from drivers.base import SourceHealth
from tests.support.offline import Events, offline_gateway, outbox_events


def agent_cfg(tmp_path: Path) -> dict[str, Any]:
    return offline_gateway(tmp_path, "sim-gw")


@dataclass(frozen=True, slots=True)
class Played:
    """What a played scenario left: the outbox, and each source's health by source name."""

    events: Events
    health: dict[str, SourceHealth]


async def play(tmp_path: Path, scenario: str, speed: float, until: Callable[[Events], bool],
               timeout: float = 30.0, *, to_the_end: bool = False) -> Played:
    """Run the runtime with the simulator until `until(events)` holds (and, with `to_the_end`,
    the timeline has played its last step); return the outbox and the sources' health."""
    cfg = parse_config(agent_cfg(tmp_path))
    state = cfg.gateway.state_dir
    with started_sim(scenario, tmp_path / "sim", speed) as sim:
        rt = Runtime(merge_sim_sources(cfg, sim.agent_sources_config()),
                     pin_factory=sim.pin_factory)
        stop = asyncio.Event()
        task = asyncio.create_task(rt.run(stop))
        try:
            await asyncio.wait_for(rt.ready.wait(), 15)
            sim.resume()
            async with asyncio.timeout(timeout):
                while not (until(outbox_events(state)) and (sim.wait_done(0) or not to_the_end)):
                    await asyncio.sleep(0.05)  # polling interval of a condition wait
        finally:
            stop.set()
            await task
    return Played(outbox_events(state), {s.name: s.health for s in rt.sources})


def gpio_changes(evs: Events) -> list[tuple[str, str, Any, int]]:
    """The contacts' debounced changes (initial states left out), in outbox order."""
    return [(e["src"], e["type"], e["v"], e["prio"]) for e in evs
            if e["src"].startswith("gpio.") and not (e.get("attrs") or {}).get("initial")]


def gpio_initial(evs: Events) -> dict[str, tuple[Any, int]]:
    """Each contact's state reported at start, with its priority."""
    return {e["src"]: (e["v"], e["prio"]) for e in evs if (e.get("attrs") or {}).get("initial")}


def readings(evs: Events, src: str) -> dict[str, tuple[str | None, int, list[Any]]]:
    """`src`'s reading types -> (unit, priority, values in outbox order with consecutive
    repeats collapsed: a value that holds over many polls is one entry). Status events
    (source.offline/online) are left out; every reading of a type has one unit and priority."""
    out: dict[str, tuple[str | None, int, list[Any]]] = {}
    for e in evs:
        if e["src"] != src or e["type"].startswith("source."):
            continue
        unit, prio, values = out.setdefault(e["type"], (e.get("u"), e["prio"], []))
        assert (e.get("u"), e["prio"]) == (unit, prio), e
        if not values or values[-1] != e["v"]:
            values.append(e["v"])
    return out


def counts(evs: Events, src: str) -> Counter[str]:
    """How many events of each type `src` produced."""
    return Counter(e["type"] for e in evs if e["src"] == src)


def first(evs: Events, src: str, type_: str, value: Any) -> int:
    """The id of the first event of `src` and `type_` with `value`."""
    return int(next(e["id"] for e in evs if (e["src"], e["type"], e["v"]) == (src, type_, value)))


# Megatec/Q1 status flags: reported on the first poll, then only when they change.
UPS_FLAGS = {"ups.on_battery": 1, "ups.battery_low": 1, "ups.bypass": 2, "ups.fault": 1,
             "ups.shutdown_active": 1, "ups.test": 3}
UPS_UNITS = {"ups.input_voltage": "V", "ups.output_voltage": "V", "ups.load": "%",
             "ups.frequency": "Hz", "ups.battery_voltage": "V", "ups.temperature": "Cel"}
METER_UNITS = {"voltage": "V", "current": "A", "active_power": "W", "energy": "Wh",
               "frequency": "Hz", "temperature": "Cel", "humidity": "%RH"}


def float32(value: float) -> Any:
    """A value as a float32 register carries it (about 7 significant digits)."""
    return pytest.approx(value, rel=1e-7)


def telemetry(units: dict[str, str], values: dict[str, list[Any]]
              ) -> dict[str, tuple[str | None, int, list[Any]]]:
    """The expected `readings` of a device: every measurement as telemetry in its unit."""
    return {type_: (unit, 2, values[type_]) for type_, unit in units.items()}


def ups_expected(values: dict[str, list[Any]]) -> dict[str, tuple[str | None, int, list[Any]]]:
    """`readings` of a UPS whose flags never change (all clear) and whose measurements take
    `values` in turn."""
    flags = {type_: (None, prio, [False]) for type_, prio in UPS_FLAGS.items()}
    return telemetry(UPS_UNITS, values) | flags


async def test_night_intrusion_sequence_in_the_outbox(tmp_path: Path) -> None:
    """night-intrusion, compressed 10x: the outbox holds the contact changes in order with
    their priorities; 6- and 8-edge contact bounce each give one event; a short panic tap none."""
    evs = (await play(tmp_path, "night-intrusion", 10.0,
                      lambda evs: ("gpio.panic_teller", "panic", "released", 0)
                      in gpio_changes(evs))).events
    assert gpio_changes(evs) == [
        ("gpio.front_door", "contact", "open", 1),
        ("gpio.hall_motion", "motion", True, 1),
        ("gpio.front_door", "contact", "closed", 1),
        ("gpio.vault_door", "contact", "open", 0),
        ("gpio.tamper_loop", "tamper", "tampered", 0),
        ("gpio.hall_motion", "motion", False, 1),
        ("gpio.vault_door", "contact", "closed", 0),
        ("gpio.panic_teller", "panic", "pressed", 0),
        ("gpio.panic_teller", "panic", "released", 0),
    ]
    initial = {e["src"] for e in evs if (e.get("attrs") or {}).get("initial")}
    assert initial == {"gpio.front_door", "gpio.hall_motion", "gpio.vault_door",
                       "gpio.tamper_loop", "gpio.panic_teller"}
    ids = [e["id"] for e in evs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_power_failure_alerts_and_voltages(tmp_path: Path) -> None:
    """power-failure: the Megatec poller raises on-battery, then battery-low, as alerts, and
    the voltages arrive as telemetry."""
    def flags(evs: Events, kind: str) -> list[Any]:
        return [e["v"] for e in evs if e["type"] == kind]

    evs = (await play(tmp_path, "power-failure", 10.0,
                      lambda evs: True in flags(evs, "ups.battery_low"))).events
    on_batt = [e for e in evs if e["type"] == "ups.on_battery" and e["v"] is True]
    low = [e for e in evs if e["type"] == "ups.battery_low" and e["v"] is True]
    assert on_batt and low and on_batt[0]["id"] < low[0]["id"]
    assert on_batt[0]["prio"] == 1 and low[0]["prio"] == 1
    volts = [e for e in evs if e["type"] == "ups.battery_voltage"]
    assert volts and all(e["u"] == "V" and e["prio"] == 2 for e in volts)
    assert any(e["type"] == "ups.input_voltage" for e in evs)


FLAKY_SERIAL = ("ups.main", "modbus.meter", "line.climate")


@pytest.fixture(scope="module")
def flaky(tmp_path_factory: pytest.TempPathFactory) -> Played:
    """flaky-devices, compressed 10x, played once to the end of its timeline and until every
    unplugged device is back and reading again (two tests judge the outcome)."""
    def back(evs: Events) -> bool:
        for src in FLAKY_SERIAL:
            online = [e["id"] for e in evs if (e["src"], e["type"]) == (src, "source.online")]
            if not online or not any(e["src"] == src and e["id"] > online[0] for e in evs):
                return False
        return True

    return asyncio.run(play(tmp_path_factory.mktemp("flaky"), "flaky-devices", 10.0, back,
                            to_the_end=True))


def test_flaky_devices_chatter_unplugs_and_bad_lines(flaky: Played) -> None:
    """flaky-devices: chatter is counted, not reported; each serial device goes offline and
    online once, reads nothing between, its power-on values around; bad lines are counted."""
    evs, health = flaky.events, flaky.health
    assert gpio_initial(evs) == {"gpio.front_door": ("closed", 1), "gpio.side_door": ("closed", 1)}
    assert gpio_changes(evs) == [("gpio.front_door", "contact", "open", 1),
                                 ("gpio.front_door", "contact", "closed", 1)]
    # Front door: 2 moves with 20 bounces each, the last bounce on the new level: 2 x 21 edges.
    # Side door: 5 bursts of 9 bounces on a closed contact, then back to closed: 5 x 10 edges.
    # Every edge but the front door's two settled moves is suppressed.
    assert health["gpio"].errors == {"edges": 92, "bounces_suppressed": 90}

    for src in FLAKY_SERIAL:
        status = [e for e in evs if e["src"] == src and e["type"].startswith("source.")]
        assert [(e["type"], e["prio"]) for e in status] == [
            ("source.offline", 1), ("source.online", 1)], src
        offline, online = status
        assert isinstance(offline["v"], str) and offline["v"] and online["v"] is True
        data = [e["id"] for e in evs if e["src"] == src and not e["type"].startswith("source.")]
        assert data[0] < offline["id"] < online["id"] < data[-1], src
        assert not [i for i in data if offline["id"] < i < online["id"]], src
    # Each loss, and each failed reopen while unplugged, counts as unavailable (how many
    # reopens fail depends on the backoff's jitter); the meter's one lost poll as no_answer.
    assert set(health["ups.main"].errors) == {"unavailable"}
    assert set(health["modbus.meter"].errors) == {"no_answer", "unavailable"}
    assert health["modbus.meter"].errors["no_answer"] == 1

    # Nothing but the plug changes for the UPS and the meter: their power-on state throughout,
    # and the UPS's flags reported once (a replug is not a change).
    assert readings(evs, "ups.main") == ups_expected({
        "ups.input_voltage": [230.0], "ups.output_voltage": [230.0], "ups.load": [25],
        "ups.frequency": [50.0], "ups.battery_voltage": [27.2], "ups.temperature": [30.0]})
    ups = counts(evs, "ups.main")
    assert {ups[t] for t in UPS_FLAGS} == {1} and len({ups[t] for t in UPS_UNITS}) == 1
    assert readings(evs, "modbus.meter") == telemetry(METER_UNITS, {
        "voltage": [230.0], "current": [1.5], "active_power": [345.0], "energy": [123456],
        "frequency": [50.0], "temperature": [21.5], "humidity": [45.0]})
    assert len({counts(evs, "modbus.meter")[t] for t in METER_UNITS}) == 1

    # The climate sensor: 3 garbage lines and 2 with framing errors are counted and read as
    # nothing; every line it reads gives one temperature and one humidity.
    climate = counts(evs, "line.climate")
    assert climate["temperature"] == climate["humidity"] > 0
    assert readings(evs, "line.climate")["humidity"] == ("%RH", 2, [40.0])
    assert health["line.climate"].errors["framing"] == 5
    # (the partial line should count as malformed: see the next test)
    assert set(health["line.climate"].errors) - {"malformed"} == {"framing", "unavailable"}
    assert {e["src"] for e in evs} - {"agent.audit"} == {
        "gpio.front_door", "gpio.side_door", *FLAKY_SERIAL}


def test_flaky_devices_broken_line_is_counted_not_read(flaky: Played) -> None:
    """flaky-devices' partial line (half a line run into a whole one) is counted as malformed
    and becomes no reading: every temperature the climate sensor reports is 21.5 Cel."""
    assert readings(flaky.events, "line.climate")["temperature"] == ("Cel", 2, [21.5])
    assert flaky.health["line.climate"].errors.get("malformed") == 1


QUIET_CUSTOMER = [("gpio.front_door", "contact", "open", 1),
                  ("gpio.hall_motion", "motion", True, 1),
                  ("gpio.hall_motion", "motion", False, 1),
                  ("gpio.front_door", "contact", "closed", 1)]


async def test_quiet_day_customers_and_steady_telemetry(tmp_path: Path) -> None:
    """quiet-day, 6x: six customers, each a door opening around a motion pulse; UPS, meter and
    climate report the timeline's values in its order, with no outage and no error."""
    def settled(evs: Events) -> bool:
        last = {src: v for src, _, v, _ in gpio_changes(evs)}
        return last.get("gpio.front_door") == "closed" and last.get("gpio.hall_motion") is False

    # The door is held open 3 s and motion 1.5 s of real time (pulses are physical), so a
    # customer every 20 s of scenario time stays apart only below 6.6x.
    played = await play(tmp_path, "quiet-day", 6.0, settled, timeout=45.0, to_the_end=True)
    evs, health = played.events, played.health
    assert gpio_initial(evs) == {"gpio.front_door": ("closed", 1),
                                 "gpio.hall_motion": (False, 1), "gpio.vault_door": ("closed", 0)}
    assert gpio_changes(evs) == QUIET_CUSTOMER * 6
    # Per customer: the door moves twice, each 1 edge + 2 bounce edges (suppressed), and the
    # motion relay twice without bounce: 6 x 8 edges, 6 x 4 suppressed.
    assert health["gpio"].errors == {"edges": 48, "bounces_suppressed": 24}
    assert {src: h.errors for src, h in health.items() if src != "gpio"} == {
        "ups.main": {}, "modbus.meter": {}, "line.climate": {}}

    # The UPS answers its power-on state (params = {}: 25 % load, 30.0 Cel) to the polls made
    # before the timeline starts; `at = 0` then sets 22 % and 31.0 Cel.
    assert readings(evs, "ups.main") == ups_expected({
        "ups.input_voltage": [230.0, 228.5, 231.0], "ups.output_voltage": [230.0],
        "ups.load": [25, 22, 27, 24], "ups.frequency": [50.0], "ups.battery_voltage": [27.2],
        "ups.temperature": [30.0, 31.0]})
    ups = counts(evs, "ups.main")
    assert {ups[t] for t in UPS_FLAGS} == {1} and len({ups[t] for t in UPS_UNITS}) == 1
    assert readings(evs, "modbus.meter") == telemetry(METER_UNITS, {
        "voltage": [230.0], "current": [1.5, float32(5.4), float32(1.7)],
        "active_power": [345.0, 1250.0, 380.0], "energy": [123456], "frequency": [50.0],
        "temperature": [21.5], "humidity": [45.0]})
    assert len({counts(evs, "modbus.meter")[t] for t in METER_UNITS}) == 1
    climate = readings(evs, "line.climate")
    assert climate["temperature"] == ("Cel", 2, [21.5, 22.1])
    # A line printed before the timeline starts carries the sensor's power-on 40.0 %RH.
    assert climate["humidity"] in (("%RH", 2, [44.0, 46.5]), ("%RH", 2, [40.0, 44.0, 46.5]))
    assert len(climate) == 2 and len(set(counts(evs, "line.climate").values())) == 1

    # The changes reach the outbox in the timeline's order (at 30, 40, 60, 80, 90).
    changes = [first(evs, "modbus.meter", "active_power", 1250.0),
               first(evs, "ups.main", "ups.load", 27),
               first(evs, "line.climate", "humidity", 46.5),
               first(evs, "ups.main", "ups.load", 24),
               first(evs, "modbus.meter", "active_power", 380.0)]
    assert changes == sorted(changes)
    assert {e["src"] for e in evs} - {"agent.audit"} == {
        "gpio.front_door", "gpio.hall_motion", "gpio.vault_door",
        "ups.main", "modbus.meter", "line.climate"}
