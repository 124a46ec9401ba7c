"""The facility devices over IP wired into the agent: `[[sources.nut]]`, `[[sources.snmp]]` and
`[[sources.modbus_tcp]]` in the config, run by the real runtime against Debian's upsd
(dummy-ups), Debian's snmpd and pymodbus's TCP server, judged by what reaches the outbox; the
doctor's reachability checks; the egress allowlist. Each driver's own behaviour is in
test_nut.py, test_snmp.py and test_modbus_tcp.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from agent.config import parse_config
from agent.core.types import ALERT
from agent.ops.doctor import Status, check_ip_devices, run_checks
from agent.ops.provision.egress import egress_allowlist
from agent.runtime.root import Runtime
from branchsim.modbustcp import ModbusTcpDevice
from branchsim.nutserver import NutServer, find_nut
from branchsim.snmpagent import SNMPD, SnmpAgentSim
from tests.support.broker import get_free_port
from tests.support.offline import Events, offline_gateway, outbox_events

pytestmark = [
    pytest.mark.skipif(find_nut() is None, reason="nut-server is not installed (make sysdeps)"),
    pytest.mark.skipif(not Path(SNMPD).exists(), reason="snmpd is not installed (make sysdeps)"),
]

FAST = {"poll_interval_s": 0.2, "timeout_s": 1.0, "backoff_base_s": 0.05, "backoff_cap_s": 0.2}


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[tuple[NutServer, SnmpAgentSim, ModbusTcpDevice]]:
    """One of each, started on 127.0.0.1 and free ports, stopped at the end."""
    nut = NutServer(tmp_path / "nut")
    snmp = SnmpAgentSim(tmp_path / "snmpd")
    meter = ModbusTcpDevice("meter")
    try:
        nut.start()
        snmp.start()
        meter.start()
        yield nut, snmp, meter
    finally:
        meter.stop()
        snmp.stop()
        nut.stop()


def sources_table(nut: NutServer, snmp: SnmpAgentSim, meter: ModbusTcpDevice) -> dict[str, Any]:
    return {
        "nut": [nut.agent_config(name="main", **FAST)],
        "snmp": [{"name": "ups", "profile": "ups-mib", **snmp.agent_config("2c"), **FAST}],
        "modbus_tcp": [{**meter.agent_config(), "poll_interval_s": 0.2}],
    }


def agent_doc(tmp_path: Path, sources: dict[str, Any]) -> dict[str, Any]:
    return offline_gateway(tmp_path, "gw-ip", sources=sources)


async def until(state: Path, cond: Callable[[Events], bool], timeout: float = 20.0) -> Events:
    async with asyncio.timeout(timeout):
        while not cond(evs := outbox_events(state)):
            await asyncio.sleep(0.05)  # polling interval of a condition wait
    return evs


def srcs(evs: Events) -> set[str]:
    return {e["src"] for e in evs}


async def test_the_runtime_runs_each_ip_source_from_the_config(
        tmp_path: Path, devices: tuple[NutServer, SnmpAgentSim, ModbusTcpDevice]) -> None:
    """Readings from the NUT server, the SNMP agent and the Modbus TCP meter reach the outbox
    under their source ids; the UPS going on battery on the NUT server is an alert there."""
    nut, snmp, meter = devices
    cfg = parse_config(agent_doc(tmp_path, sources_table(nut, snmp, meter)))
    rt = Runtime(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(rt.run(stop))
    try:
        await asyncio.wait_for(rt.ready.wait(), 15)
        want = {"nut.main", "snmp.ups", f"modbus_tcp.{meter.name}"}
        await until(cfg.gateway.state_dir, lambda evs: want <= srcs(evs))
        nut.set({"ups.status": "OB DISCHRG"})
        evs = await until(cfg.gateway.state_dir, lambda evs: any(
            e["type"] == "ups.on_battery" and e["v"] is True for e in evs))
        [on_battery] = [e for e in evs if e["type"] == "ups.on_battery" and e["v"] is True]
        assert on_battery["src"] == "nut.main" and on_battery["prio"] == ALERT
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_doctor_checks_each_ip_device(
        tmp_path: Path, devices: tuple[NutServer, SnmpAgentSim, ModbusTcpDevice]) -> None:
    """Every device that answers passes; each that does not fails with a fix, and one dead
    device does not hold the others' checks up."""
    nut, snmp, meter = devices
    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps(agent_doc(tmp_path, sources_table(nut, snmp, meter))))
    checks = {c.name: c for c in await run_checks(path, limit=3.0)
              if c.name.split()[0] in ("nut", "snmp", "modbus_tcp")}
    assert set(checks) == {"nut main", "snmp ups", f"modbus_tcp {meter.name}"}
    assert {c.status for c in checks.values()} == {Status.PASS}, checks

    dead = get_free_port()
    table = sources_table(nut, snmp, meter)
    table["nut"][0]["port"] = dead
    table["modbus_tcp"][0]["port"] = dead
    table["snmp"][0]["community"] = "not-the-community"
    cfg = parse_config(agent_doc(tmp_path / "dead", table))
    checks = {c.name: c for c in await check_ip_devices(cfg, limit=3.0)}
    for name, c in checks.items():
        assert c.status is Status.FAIL, (name, c)
        assert c.fix, (name, c)
    assert "not-the-community" not in repr(checks)  # a secret is never shown

    cfg = parse_config(agent_doc(tmp_path / "none", {}))
    [skip] = await check_ip_devices(cfg)
    assert skip.status is Status.SKIP


def test_egress_allows_each_ip_device(tmp_path: Path) -> None:
    """The devices' hosts are allowed (resolved at provisioning), each with its reason; a name
    that does not resolve is reported, never allowed."""
    doc = agent_doc(tmp_path, {
        "nut": [{"name": "main", "host": "192.0.2.5", "ups": "ups"}],
        "snmp": [{"name": "pdu", "host": "pdu.branch.example", "profile": "pdu-outlets",
                  "community": "public"}],
        "modbus_tcp": [{"name": "hvac", "host": "192.0.2.7", "registers": [
            {"name": "temp", "address": 0, "function": "holding", "type": "int16"}]}],
    })
    cfg = parse_config(doc)
    names = {"127.0.0.1": ["127.0.0.1"], "192.0.2.5": ["192.0.2.5"], "192.0.2.7": ["192.0.2.7"]}
    allow, unresolved = egress_allowlist(cfg, resolve=lambda h: names.get(h, []))
    why = dict(allow)
    assert why["192.0.2.5"] == "nut main 192.0.2.5:3493"
    assert why["192.0.2.7"] == "modbus_tcp hvac 192.0.2.7:502"
    assert unresolved == ["pdu.branch.example (snmp pdu pdu.branch.example:161)"]
