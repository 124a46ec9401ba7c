"""The SNMP source against a real snmpd (Debian's net-snmp, started per test on a free UDP port
by branchsim.snmpagent): UPS-MIB and APC PDU outlet readings over v2c and v3 authPriv, outages,
authentication failures, and secrets that never reach a log."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from agent.core.clock import SystemClock
from agent.core.types import ALERT, DIAGNOSTIC, TELEMETRY, Reading
from branchsim.snmpagent import SNMPD, SnmpAgentSim
from drivers.base import SourceContext, SourceState
from drivers.snmp import SnmpConfig, SnmpList, SnmpSource, build_sources, check_reachable
from tests.support.sinks import CollectingSink, has, running

pytestmark = pytest.mark.skipif(not Path(SNMPD).exists(), reason="needs Debian's snmpd")

FAST = {"poll_interval_s": 0.05, "timeout_s": 0.2, "retries": 0, "backoff_base_s": 0.05,
        "backoff_cap_s": 0.2}
UPS_BATTERY_STATUS = "1.3.6.1.2.1.33.1.2.1.0"
UPS_INPUT_VOLTAGE = "1.3.6.1.2.1.33.1.3.3.1.3.1"
OUTLET_STATE_2 = "1.3.6.1.4.1.318.1.1.12.3.5.1.1.4.2"


@pytest.fixture(autouse=True)
def no_loop_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test when the event loop logged an error (an exception in a callback, a task
    that died unseen): pysnmp's callbacks run outside our tasks, where nothing else sees them."""
    yield
    errors = [r for r in caplog.get_records("call") if r.name == "asyncio"
              and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def snmpd(tmp_path: Path) -> Iterator[SnmpAgentSim]:
    """A running snmpd serving the simulated UPS and PDU; stopped at the end."""
    sim = SnmpAgentSim(tmp_path / "snmpd")
    try:
        yield sim.start()
    finally:
        sim.stop()


def source_for(sim: SnmpAgentSim, version: str = "2c", /, **overrides: Any) -> SnmpSource:
    """A source on `sim` with the `FAST` timings; `overrides` replace keys of the entry (an
    entry built from ``sim.agent_config`` carries its own ``version``, hence positional-only)."""
    entry = {"name": "ups", "profile": "ups-mib", **sim.agent_config(version), **FAST,
             **overrides}
    (source,) = build_sources([SnmpConfig.model_validate(entry)],
                              SourceContext(clock=SystemClock()))
    assert isinstance(source, SnmpSource)
    return source


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `condition()` holds (checked every 10 ms), failing after `timeout`: for state
    that changes without a new reading (health counters while a source stays offline)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def count(type_: str, n: int) -> Callable[[list[Reading]], bool]:
    return lambda rs: sum(r.type == type_ for r in rs) >= n


def first_of(sink: CollectingSink) -> dict[str, tuple[Any, str | None, int]]:
    """Reading type -> (value, unit, priority) of its first reading."""
    first: dict[str, tuple[Any, str | None, int]] = {}
    for r in sink.readings:
        first.setdefault(r.type, (r.value, r.unit, r.priority))
    return first


def states(sink: CollectingSink, type_: str) -> list[tuple[Any, int]]:
    return [(r.value, r.priority) for r in sink.of_type(type_)]


async def test_v2c_ups_readings_with_units_and_one_vocabulary(snmpd: SnmpAgentSim) -> None:
    """UPS-MIB over v2c: measurements as telemetry with SenML units (scaled from the MIB's
    0.1 V / 0.1 Hz / minutes), states at the first poll as ALERT, in the Megatec vocabulary."""
    sink = CollectingSink()
    source = source_for(snmpd)
    async with running(source, sink):
        await sink.wait_for(count("ups.input_voltage", 2))
    first = first_of(sink)
    assert first["ups.input_voltage"] == (230, "V", TELEMETRY)
    assert first["ups.output_voltage"] == (230, "V", TELEMETRY)
    assert first["ups.load"] == (35, "%", TELEMETRY)
    assert first["ups.battery_voltage"] == (27.2, "V", TELEMETRY)
    assert first["ups.frequency"] == (50.0, "Hz", TELEMETRY)
    assert first["ups.temperature"] == (31, "Cel", TELEMETRY)
    assert first["ups.battery_charge"] == (100, "%", TELEMETRY)
    assert first["ups.runtime"] == (42 * 60, "s", TELEMETRY)
    assert first["ups.seconds_on_battery"] == (0, "s", TELEMETRY)
    assert first["ups.on_battery"] == (False, None, ALERT)
    assert first["ups.battery_low"] == (False, None, ALERT)
    assert first["ups.alarms"] == (0, None, ALERT)
    assert first["ups.replace_battery"] == (False, None, ALERT)
    assert first["ups.test"] == (False, None, DIAGNOSTIC)
    # states once (no change), measurements every poll
    assert len(sink.of_type("ups.on_battery")) == 1
    assert source.health.state is SourceState.STOPPED and source.health.errors == {}
    assert all(r.source == "snmp.ups" for r in sink.readings)


async def test_ups_on_battery_alerts_once_then_battery_low_and_replace(
    snmpd: SnmpAgentSim,
) -> None:
    """The UPS goes on battery: one ALERT (not one per poll); then battery low, and a
    upsAlarmBatteryBad in the alarm table becomes ups.replace_battery."""
    sink = CollectingSink()
    async with running(source_for(snmpd), sink):
        await sink.wait_for(has("ups.on_battery", False))
        snmpd.set_ups(output_source=5, seconds_on_battery=12, input_voltage=0,
                      alarms=["on_battery"])
        await sink.wait_for(has("ups.on_battery", True))
        n = len(sink.of_type("ups.input_voltage"))
        await sink.wait_for(count("ups.input_voltage", n + 3))  # three more polls
        snmpd.set_ups(battery_status=3, alarms=["on_battery", "low_battery", "battery_bad"])
        await sink.wait_for(has("ups.replace_battery", True))
        await sink.wait_for(has("ups.battery_low", True))
    assert states(sink, "ups.on_battery") == [(False, ALERT), (True, ALERT)]
    assert states(sink, "ups.battery_low") == [(False, ALERT), (True, ALERT)]
    assert states(sink, "ups.replace_battery") == [(False, ALERT), (True, ALERT)]
    assert [v for v, _ in states(sink, "ups.alarms")] == [0, 1, 3]
    assert (0, "V") in {(r.value, r.unit) for r in sink.of_type("ups.input_voltage")}
    assert (12, "s") in {(r.value, r.unit) for r in sink.of_type("ups.seconds_on_battery")}


async def test_v3_authpriv_pdu_outlets_and_outlet_off(snmpd: SnmpAgentSim) -> None:
    """SNMPv3 authPriv (SHA-256/AES) reads the PDU: totals and per-outlet current as telemetry,
    outlet states at the first poll; an outlet switched off is one ALERT reading naming it."""
    sink = CollectingSink()
    source = source_for(snmpd, "3", name="pdu", profile="pdu-outlets")
    async with running(source, sink):
        await sink.wait_for(has("pdu.outlet.8.on", True))
        snmpd.set_outlet(3, on=False)
        await sink.wait_for(has("pdu.outlet.3.on", False))
        n = len(sink.of_type("pdu.power"))
        await sink.wait_for(count("pdu.power", n + 2))
    first = first_of(sink)
    assert first["pdu.power"] == (8 * 5 * 23, "W", TELEMETRY)
    assert first["pdu.current"] == (4.0, "A", TELEMETRY)
    assert first["pdu.outlet.1.current"] == (0.5, "A", TELEMETRY)
    assert states(sink, "pdu.outlet.3.on") == [(True, ALERT), (False, ALERT)]
    assert states(sink, "pdu.outlet.4.on") == [(True, ALERT)]
    off = sink.of_type("pdu.outlet.3.on")[-1]
    assert off.attrs == {"outlet": 3, "label": "outlet-3"}
    assert sink.of_type("pdu.outlet.3.current")[-1].value == 0.0
    assert source.health.errors == {}


async def test_v3_wrong_key_is_an_auth_failure_and_no_secret_is_logged(
    snmpd: SnmpAgentSim, tmp_path: Path,
) -> None:
    """A wrong v3 auth key: offline with the USM report as the reason, counted as
    auth_failed; neither key appears in any log line, reading, health or repr."""
    wrong = "Wr0ng-auth-key-5f1e"
    priv_file = tmp_path / "priv.key"
    priv_file.write_text(snmpd.priv_key + "\n")
    sink = CollectingSink()
    cfg_entry = {**snmpd.agent_config("3"), "auth_key": wrong, "priv_key": None,
                 "priv_key_file": str(priv_file)}
    source = source_for(snmpd, "3", **cfg_entry)
    with structlog.testing.capture_logs() as logs:
        async with running(source, sink):
            await sink.wait_for(has("source.offline"))
            # later failures keep it offline without a new reading: watch the counter
            await eventually(lambda: source.health.errors.get("auth_failed", 0) >= 2)
        doctor = await check_reachable(source.cfg, limit=2.0)
    (offline,) = sink.of_type("source.offline")
    assert "usmStatsWrongDigests" in str(offline.value)
    assert offline.priority == ALERT
    assert source.health.state is SourceState.STOPPED
    assert "timeout" not in source.health.errors
    assert not doctor.ok and "usmStatsWrongDigests" in doctor.detail
    assert any(e["event"] == "snmp.offline" for e in logs)
    everything = repr(logs) + repr(sink.readings) + repr(source.health) + repr(source.cfg) \
        + repr(doctor)
    for secret in (wrong, snmpd.priv_key, snmpd.auth_key):
        assert secret not in everything


async def test_wrong_community_times_out_and_stopped_agent_goes_offline_then_online(
    snmpd: SnmpAgentSim,
) -> None:
    """A wrong v2c community is silence (offline, "no answer"); snmpd stopped -> one
    source.offline; started again -> source.online and readings resume."""
    wrong = source_for(snmpd, community="not-the-community")
    bad_sink = CollectingSink()
    async with running(wrong, bad_sink):
        await bad_sink.wait_for(has("source.offline"))
    assert "no answer" in str(bad_sink.of_type("source.offline")[0].value)
    assert wrong.health.errors.get("timeout", 0) >= 1
    assert "not-the-community" not in repr(bad_sink.readings) + repr(wrong.health)

    sink = CollectingSink()
    async with running(source_for(snmpd, "3"), sink):
        await sink.wait_for(has("ups.on_battery"))
        snmpd.stop()
        await sink.wait_for(has("source.offline"))
        snmpd.start()
        await sink.wait_for(has("source.online"))
        mark = len(sink.readings)
        await sink.wait_for(lambda rs: any(r.type == "ups.load" for r in rs[mark:]))
    assert len(sink.of_type("source.offline")) == 1
    assert [r.priority for r in sink.of_type("source.online")] == [ALERT]
    # the states did not change across the outage: not reported again
    assert len(sink.of_type("ups.on_battery")) == 1


async def test_missing_object_is_counted_and_logged_once_not_offline(
    snmpd: SnmpAgentSim,
) -> None:
    """An object the device lacks (noSuchInstance) is counted on every poll, logged once,
    and the source stays online with the other readings."""
    snmpd.hide(UPS_BATTERY_STATUS)
    sink = CollectingSink()
    source = source_for(snmpd)
    with structlog.testing.capture_logs() as logs:
        async with running(source, sink):
            await sink.wait_for(count("ups.load", 4))
            assert source.health.state is SourceState.ONLINE
    assert source.health.errors["no_such_object"] >= 4
    warned = [e for e in logs if e["event"] == "snmp.no_such_object"]
    assert [e["oid"] for e in warned] == [UPS_BATTERY_STATUS]
    assert not sink.of_type("ups.battery_low")
    assert not sink.of_type("source.offline")
    assert has("ups.on_battery", False)(sink.readings)


async def test_doctor_reports_reachable_and_unreachable(snmpd: SnmpAgentSim) -> None:
    """The doctor's probe: one GET of sysDescr/sysUpTime, ok with the device's description;
    a dead port is a problem with a fix, within the limit."""
    good = source_for(snmpd, "3").cfg
    ok = await check_reachable(good)
    assert ok.ok and "branchsim UPS/PDU" in ok.detail
    snmpd.stop()
    down = await check_reachable(good, limit=2.0)
    assert not down.ok and "no answer" in down.detail and down.fix


async def test_explicit_oids_and_key_files(snmpd: SnmpAgentSim, tmp_path: Path) -> None:
    """An `oids` list without a profile, keys from files: numbers scaled with their unit."""
    (tmp_path / "auth").write_text(snmpd.auth_key + "\n")
    (tmp_path / "priv").write_text(snmpd.priv_key)
    entry = {**snmpd.agent_config("3"), "auth_key": None, "priv_key": None,
             "auth_key_file": str(tmp_path / "auth"), "priv_key_file": str(tmp_path / "priv"),
             "profile": None, "oids": [
                 {"name": "battery.voltage", "oid": ".1.3.6.1.2.1.33.1.2.5.0", "scale": 0.1,
                  "unit": "V"},
                 {"name": "model", "oid": "1.3.6.1.2.1.33.1.1.2.0"}]}
    sink = CollectingSink()
    async with running(source_for(snmpd, "3", **entry), sink):
        await sink.wait_for(has("model"))
    assert {(r.type, r.value, r.unit) for r in sink.readings} >= {
        ("battery.voltage", 27.2, "V"), ("model", "SP-1500", None)}


async def test_bad_values_from_the_agent_are_counted_and_logged_not_a_crash(
    snmpd: SnmpAgentSim,
) -> None:
    """Values the MIB does not allow (a string for upsInputVoltage, upsBatteryStatus 9, outlet
    state 7) are counted as bad_value and logged per OID; their readings are left out, the
    rest of the poll goes on and the source stays online."""
    snmpd.serve(UPS_INPUT_VOLTAGE, "string", "230V")
    snmpd.serve(UPS_BATTERY_STATUS, "integer", 9)
    snmpd.serve(OUTLET_STATE_2, "integer", 7)
    ups, pdu = source_for(snmpd), source_for(snmpd, "3", name="pdu", profile="pdu-outlets")
    sink, pdu_sink = CollectingSink(), CollectingSink()
    with structlog.testing.capture_logs() as logs:
        async with running(ups, sink), running(pdu, pdu_sink):
            await sink.wait_for(count("ups.load", 3))
            await pdu_sink.wait_for(count("pdu.power", 3))
            assert ups.health.state is pdu.health.state is SourceState.ONLINE
    assert ups.health.errors["bad_value"] >= 2 * 3  # two objects, every poll
    assert pdu.health.errors["bad_value"] >= 3
    assert "internal" not in ups.health.errors | pdu.health.errors
    bad = {(e["source"], e["oid"], e["value"]) for e in logs if e["event"] == "snmp.bad_value"}
    assert bad == {("snmp.ups", UPS_INPUT_VOLTAGE, "'230V'"),
                   ("snmp.ups", UPS_BATTERY_STATUS, "9"), ("snmp.pdu", OUTLET_STATE_2, "7")}
    assert not sink.of_type("ups.input_voltage") and not sink.of_type("ups.battery_low")
    assert has("ups.output_voltage", 230)(sink.readings)
    assert not pdu_sink.of_type("pdu.outlet.2.on") and has("pdu.outlet.3.on", True)(
        pdu_sink.readings)
    assert not sink.of_type("source.offline") and not pdu_sink.of_type("source.offline")


class DuplicatingRelay(asyncio.DatagramProtocol):
    """A UDP hop that sends every answer from the agent twice, as an agent answering both a
    request and its retry does."""

    def __init__(self, agent: tuple[str, int]) -> None:
        self.agent = agent
        self.client: tuple[str, int] | None = None
        self.transport: Any = None  # asyncio's selector datagram transport (not a subclass)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == self.agent:
            if self.client is not None:
                self.transport.sendto(data, self.client)
                self.transport.sendto(data, self.client)
        else:
            self.client = addr
            self.transport.sendto(data, self.agent)


async def test_duplicated_answers_are_dropped_quietly(snmpd: SnmpAgentSim) -> None:
    """An answer that arrives twice (read in the loop turn the client closes in) is dropped
    without an error in the event loop; the doctor's one-shot probe is where that happens."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: DuplicatingRelay(("127.0.0.1", snmpd.port)), local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        for version in ("2c", "3", "3"):
            cfg = source_for(snmpd, version, port=port).cfg
            found = await check_reachable(cfg, limit=2.0)
            assert found.ok, found
    finally:
        transport.close()


def test_config_errors_name_keys_never_secrets() -> None:
    """Config mistakes around credentials are reported by key; the values never appear."""
    base = {"name": "ups", "host": "192.0.2.1", "profile": "ups-mib"}
    cases = [
        {**base, "version": "3", "user": "u", "auth_key": "s3cret-auth-key"},  # no priv key
        {**base, "version": "3", "auth_key": "s3cret-auth-key", "priv_key": "s3cret-priv"},
        {**base, "community": "s3cret-community", "auth_key": "s3cret-auth-key"},
        {**base, "version": "2c", "community": "s3cret-community",
         "community_file": "/etc/x"},
        {**base, "version": "3", "user": "u", "auth_key": "s3cret-auth-key",
         "priv_key": "s3cret-priv", "profile": None},
    ]
    for entry in cases:
        with pytest.raises(ValidationError) as err:
            SnmpConfig.model_validate(entry)
        text = str(err.value) + repr(err.value.errors())
        assert "s3cret" not in text, text
    with pytest.raises(ValidationError, match="duplicate snmp names: ups"):
        from pydantic import TypeAdapter

        TypeAdapter(SnmpList).validate_python(
            [{**base, "community": "c"}, {**base, "community": "c"}])
    cfg = SnmpConfig.model_validate({**base, "community": "s3cret-community"})
    assert "s3cret" not in repr(cfg) + str(cfg)


def test_config_imports_no_pysnmp() -> None:
    """Loading the SNMP config (and the package) imports no pysnmp: that waits for a poll."""
    code = "import sys, drivers.snmp; print(any(m.startswith('pysnmp') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "False"
