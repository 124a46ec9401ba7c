"""The NUT source against Debian's real upsd and dummy-ups (branchsim.nutserver), no mocks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from agent.core.clock import SystemClock
from agent.core.types import ALERT, DIAGNOSTIC, TELEMETRY, Reading
from branchsim.nutserver import NutServer, find_nut
from drivers.base import SourceContext, SourceState
from drivers.nut import NutConfig, NutSource, build_sources, check_reachable
from drivers.nut.protocol import quote, split_words
from drivers.nut.source import parse_number, reading_type, status_readings
from tests.support.broker import get_free_port
from tests.support.sinks import CollectingSink, has, running

pytestmark = pytest.mark.skipif(find_nut() is None, reason="nut-server is not installed")

FAST = {"poll_interval_s": 0.1, "timeout_s": 1.0, "backoff_base_s": 0.05, "backoff_cap_s": 0.2}
ALERT_FLAGS = ("ups.on_battery", "ups.battery_low", "ups.replace_battery")


@pytest.fixture
def nut(tmp_path: Path) -> Iterator[Callable[..., NutServer]]:
    """Factory for started NUT servers; every one is stopped at the end."""
    started: list[NutServer] = []

    def make(**kwargs: Any) -> NutServer:
        server = NutServer(tmp_path / f"nut{len(started)}", **kwargs)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NutServer]:
    """One server for the tests that only read (unknown UPS, refused login, doctor)."""
    server = NutServer(tmp_path_factory.mktemp("nut-shared"), users={"monitor": "s3cret"})
    try:
        yield server.start()
    finally:
        server.stop()


def source_for(server: NutServer, **overrides: Any) -> NutSource:
    cfg = NutConfig.model_validate(server.agent_config(**{**FAST, **overrides}))
    (source,) = build_sources([cfg], SourceContext(clock=SystemClock()))
    assert isinstance(source, NutSource)
    return source


async def until(cond: Callable[[], bool], within: float = 10.0) -> None:
    """Until `cond` holds (health counters change without a reading to wake a sink)."""
    async with asyncio.timeout(within):
        while not cond():
            await asyncio.sleep(0.02)  # polling interval of a condition wait


def count_of(type_: str, n: int) -> Callable[[list[Reading]], bool]:
    return lambda rs: sum(r.type == type_ for r in rs) >= n


# --- against the real server ---------------------------------------------------------------


async def test_readings_units_and_status_alerts_once(nut: Callable[..., NutServer]) -> None:
    """Values arrive with SenML units; OL -> OB -> OB LB -> OL (+RB) gives each ALERT once; a
    non-numeric value where a number belongs is counted and logged, and the rest goes on."""
    server = nut()
    sink = CollectingSink()
    source = source_for(server)
    with structlog.testing.capture_logs() as logs:
        async with running(source, sink):
            await sink.wait_for(has("ups.on_battery", False))
            await sink.wait_for(count_of("ups.load", 3))  # several polls of an unchanged UPS
            steps = [
                {"ups.status": "OB DISCHRG", "input.voltage": "0.0"},
                {"ups.status": "OB DISCHRG LB", "battery.charge": "9", "battery.runtime": "120"},
                {"ups.status": "OL CHRG RB", "input.voltage": "229.5"},
            ]
            for step in steps:
                polls = len(sink.of_type("ups.status"))
                server.set(step)
                await sink.wait_for(count_of("ups.status", polls + 1))
            await sink.wait_for(count_of("ups.load", len(sink.of_type("ups.load")) + 3))
            assert source.health.errors == {}
            server.set({"battery.charge": "n/a", "ups.load": "31"})
            await sink.wait_for(has("ups.load", 31))
    first = sink.readings[:21]  # the first poll: the status and its flags, then the numbers
    assert {r.type: (r.value, r.priority) for r in first if r.unit is None} == {
        "ups.status": ("OL CHRG", TELEMETRY),
        "ups.on_battery": (False, ALERT),
        "ups.battery_low": (False, ALERT),
        "ups.replace_battery": (False, ALERT),
        "ups.overload": (False, ALERT),
        "ups.shutdown_active": (False, ALERT),
        "ups.output_off": (False, ALERT),
        "ups.bypass": (False, ALERT),
        "ups.alarm": (False, ALERT),
        "ups.charging": (True, TELEMETRY),
        "ups.discharging": (False, TELEMETRY),
        "ups.trim": (False, TELEMETRY),
        "ups.boost": (False, TELEMETRY),
        "ups.calibrating": (False, DIAGNOSTIC),
    }
    telemetry = {r.type: (r.value, r.unit) for r in first if r.unit is not None}
    assert telemetry == {
        "ups.battery_charge": (100, "%"),
        "ups.battery_runtime": (1800, "s"),
        "ups.load": (23, "%"),
        "ups.input_voltage": (230.1, "V"),
        "ups.output_voltage": (230.0, "V"),
        "ups.battery_voltage": (27.2, "V"),
        "ups.temperature": (29.5, "Cel"),
    }
    alerts = [(r.type, r.value) for r in sink.readings if r.type in ALERT_FLAGS]
    assert alerts == [
        ("ups.on_battery", False), ("ups.battery_low", False), ("ups.replace_battery", False),
        ("ups.on_battery", True),
        ("ups.battery_low", True),
        ("ups.on_battery", False), ("ups.battery_low", False), ("ups.replace_battery", True),
    ]
    assert all(r.priority == ALERT for r in sink.readings if r.type in ALERT_FLAGS)
    assert [r.value for r in sink.of_type("ups.status")] == [
        "OL CHRG", "OB DISCHRG", "OB DISCHRG LB", "OL CHRG RB"]
    assert {(r.value, r.unit) for r in sink.of_type("ups.input_voltage")} == {
        (230.1, "V"), (0.0, "V"), (229.5, "V")}
    assert sink.of_type("ups.battery_runtime")[-1].value == 120
    assert set(source.health.errors) == {"bad_value"}
    assert {e["variable"] for e in logs if e["event"] == "nut.bad_value"} == {"battery.charge"}
    assert all(isinstance(r.value, int) for r in sink.of_type("ups.battery_charge"))
    assert source.health.stats == {"variables_absent": 0}


async def test_upsd_stopped_offline_then_online(nut: Callable[..., NutServer]) -> None:
    """upsd gone: one source.offline naming the server; upsd back: source.online, readings."""
    server = nut()
    sink = CollectingSink()
    source = source_for(server)
    async with running(source, sink):
        await sink.wait_for(has("ups.load"))
        server.stop_upsd()
        await sink.wait_for(has("source.offline"))
        await until(lambda: source.health.errors.get("unreachable", 0) >= 2)
        assert source.health.state is SourceState.OFFLINE
        server.start_upsd()
        await sink.wait_for(has("source.online"))
        loads = len(sink.of_type("ups.load"))
        await sink.wait_for(count_of("ups.load", loads + 1))
    (offline,) = sink.of_type("source.offline")
    assert offline.priority == ALERT and f"127.0.0.1:{server.port}" in str(offline.value)
    assert source.health.errors["connection_lost"] == 1
    assert len(sink.of_type("source.online")) == 1
    assert len(sink.of_type("ups.on_battery")) == 1  # unchanged across the gap: not repeated


async def test_driver_gone_and_data_stale_offline(nut: Callable[..., NutServer]) -> None:
    """The UPS's driver stopped (DRIVER-NOT-CONNECTED) or silent (DATA-STALE): offline, each
    counted on its own; back when the driver is."""
    server = nut(maxage_s=2)
    sink = CollectingSink()
    source = source_for(server)
    async with running(source, sink):
        await sink.wait_for(has("ups.load"))
        server.stop_driver()
        await sink.wait_for(count_of("source.offline", 1))
        server.start_driver()
        await sink.wait_for(count_of("source.online", 1))
        server.freeze_driver()
        await sink.wait_for(count_of("source.offline", 2))
        server.thaw_driver()
        await sink.wait_for(count_of("source.online", 2))
    reasons = [str(r.value) for r in sink.of_type("source.offline")]
    assert "driver of UPS 'sim' is not running" in reasons[0]
    assert "data of UPS 'sim'" in reasons[1] and "stale" in reasons[1]
    assert source.health.errors["driver_not_connected"] >= 1
    assert source.health.errors["data_stale"] >= 1


async def test_unknown_ups_offline_with_reason(shared: NutServer) -> None:
    """A UPS name the server does not know: offline, the reason says so, counted."""
    sink = CollectingSink()
    source = source_for(shared, ups="nosuch")
    async with running(source, sink):
        await sink.wait_for(has("source.offline"))
    assert "UPS 'nosuch' is not known" in str(sink.of_type("source.offline")[0].value)
    assert source.health.errors["unknown_ups"] >= 1
    assert not [r for r in sink.readings if r.type.startswith("ups.")]


async def test_wrong_password_refused_counted_never_logged(shared: NutServer) -> None:
    """LOGIN with a wrong password is refused: offline, counted; the password is in no log."""
    sink = CollectingSink()
    source = source_for(shared, username="monitor", password="wrong-pw-123")
    with structlog.testing.capture_logs() as logs:
        async with running(source, sink):
            await until(lambda: source.health.errors.get("auth_refused", 0) >= 2)
    assert "login as 'monitor'" in str(sink.of_type("source.offline")[0].value)
    assert not [r for r in sink.readings if r.type.startswith("ups.")]
    assert "wrong-pw-123" not in repr(logs) + repr(source.cfg) + repr(source.health.as_dict())


async def test_login_then_logout_on_forced_shutdown(
    nut: Callable[..., NutServer], tmp_path: Path
) -> None:
    """With credentials (from a file) the gateway is a logged-in client of the UPS; on FSD it
    leaves at once (the primary's upsmon waits for its clients) and keeps reporting."""
    server = nut(users={"gw": "pa ss\"word"})
    secret = tmp_path / "nut.pw"
    secret.write_text('pa ss"word\n')
    sink = CollectingSink()
    source = source_for(server, username="gw", password_file=str(secret),
                        variables=["ups.status", "ups.load", "ups.realpower"])
    async with running(source, sink):
        await sink.wait_for(has("ups.load"))
        assert server.query(f"GET NUMLOGINS {server.ups}") == [f"NUMLOGINS {server.ups} 1"]
        server.set({"ups.status": "OB LB FSD"})
        await sink.wait_for(has("ups.shutdown_active", True))
        loads = len(sink.of_type("ups.load"))
        await sink.wait_for(count_of("ups.load", loads + 2))
        assert server.query(f"GET NUMLOGINS {server.ups}") == [f"NUMLOGINS {server.ups} 0"]
    assert source.health.errors == {}
    assert source.health.stats == {"variables_absent": 1}  # this UPS reports no real power


async def test_doctor_reachability(shared: NutServer) -> None:
    """The doctor's check: ok with the variable count; unknown UPS, wrong password and a closed
    port are problems with advice."""
    ok = await check_reachable(NutConfig.model_validate(shared.agent_config()))
    assert ok.ok and "variables, status OL CHRG" in ok.detail
    login = await check_reachable(NutConfig.model_validate(
        shared.agent_config(username="monitor", password="s3cret")))
    assert login.ok and "logged in as 'monitor'" in login.detail
    unknown = await check_reachable(NutConfig.model_validate(shared.agent_config(ups="x")))
    assert not unknown.ok and "ERR UNKNOWN-UPS" in unknown.detail and "upsc -l" in unknown.fix
    denied = await check_reachable(NutConfig.model_validate(
        shared.agent_config(username="monitor", password="nope")))
    assert not denied.ok and "ERR ACCESS-DENIED" in denied.detail
    closed = await check_reachable(NutConfig.model_validate(
        shared.agent_config(port=get_free_port(), timeout_s=1.0)))
    assert not closed.ok and closed.detail.startswith("cannot reach") and "3493" in closed.fix


# --- pure parts ----------------------------------------------------------------------------


def test_status_readings_only_changes() -> None:
    """Flags are sent at the first status and then only where they changed."""
    first = status_readings("OL", None, "nut.x", 1.0)
    assert ("ups.on_battery", False) in [(r.type, r.value) for r in first]
    assert status_readings("OL", "OL", "nut.x", 2.0) == []
    changed = status_readings("OB  LB", "OL", "nut.x", 3.0)
    assert [(r.type, r.value, r.priority) for r in changed] == [
        ("ups.status", "OB LB", TELEMETRY),
        ("ups.on_battery", True, ALERT),
        ("ups.battery_low", True, ALERT),
    ]
    # neither OL nor OB (a driver starting): on_battery is not guessed
    assert "ups.on_battery" not in [r.type for r in status_readings("WAIT", None, "n", 0)]


def test_reading_types_and_numbers() -> None:
    """NUT names map to the Megatec source's vocabulary and SenML units; numbers are checked."""
    assert reading_type("input.voltage") == ("ups.input_voltage", "V")
    assert reading_type("input.frequency") == ("ups.frequency", "Hz")
    assert reading_type("battery.runtime") == ("ups.battery_runtime", "s")
    assert reading_type("ups.realpower") == ("ups.realpower", "W")
    assert reading_type("outlet.1.status") == ("ups.outlet_1_status", None)
    assert [parse_number(t) for t in ("42", "230.1", "-4.5", "n/a", "nan", "inf", "")] == [
        42, 230.1, -4.5, None, None, None, None]


def test_protocol_words() -> None:
    """Replies are split as NUT quotes them; arguments are quoted back the same way."""
    assert split_words('VAR ups ups.mfr "A \\"B\\" \\\\ C"') == ["VAR", "ups", "ups.mfr",
                                                                 'A "B" \\ C']
    assert split_words('VAR u x ""') == ["VAR", "u", "x", ""]
    with pytest.raises(ValueError):
        split_words('VAR u x "open')
    arg = 'a "b\\ c'
    assert split_words("PASSWORD " + quote(arg)) == ["PASSWORD", arg]


def test_config_credentials_and_variables() -> None:
    """Username and password go together, once; variable names are checked; secret hidden."""
    base = {"name": "main", "host": "10.0.0.5", "ups": "ups"}
    cfg = NutConfig.model_validate(base)
    assert cfg.port == 3493 and cfg.variables[0] == "ups.status" and cfg.where == "10.0.0.5:3493"
    for bad in ({"username": "u"}, {"password": "p"},
                {"username": "u", "password": "p", "password_file": "/x"},
                {"variables": ["Battery Charge"]}, {"variables": ["ups.load", "ups.load"]},
                {"ups": "my ups"}, {"name": "Main"}):
        with pytest.raises(ValidationError):
            NutConfig.model_validate(base | bad)
    secret = NutConfig.model_validate(base | {"username": "u", "password": "hunter2"})
    assert "hunter2" not in repr(secret) and "hunter2" not in secret.model_dump_json()
