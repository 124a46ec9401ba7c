"""`branch-sim` as a real subprocess: list, run (paths + a config snippet that parses), stop."""

from __future__ import annotations

import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import SourcesConfig
from agent.core.types import ALARM
from branchsim.broker import get_free_port
from branchsim.cli import CONFIG_BEGIN, CONFIG_END
from branchsim.nutserver import find_nut
from branchsim.snmpagent import find_snmpd
from drivers.gpio.config import GpioConfig
from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until

CLI = [sys.executable, "-m", "branchsim.cli"]


def branch_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def snippet(stdout: str) -> dict[str, Any]:
    """The TOML the CLI printed between its markers."""
    lines = stdout.splitlines()
    begin, end = lines.index(CONFIG_BEGIN), lines.index(CONFIG_END)
    return tomllib.loads("\n".join(lines[begin + 1 : end]))


@pytest.fixture
def running_sim(
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str | None]]]:
    """`branch-sim run quiet-day` at real speed (a 2-minute timeline), its stdout as a queue
    of lines ending with None at EOF."""
    proc = subprocess.Popen(
        [*CLI, "run", "quiet-day", "--workdir", str(tmp_path / "w")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)


def test_list_prints_every_shipped_scenario() -> None:
    """`branch-sim list` names every shipped scenario."""
    result = branch_sim("list")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["door-propped-open", "facility-over-ip", "flaky-devices",
                     "late-night-vault", "night-intrusion", "power-failure", "quiet-day",
                     "sensor-dies"]


def test_run_gpio_scenario_prints_a_config_that_parses(tmp_path: Path) -> None:
    """`run night-intrusion --speed 0` plays to the end and prints a valid [sources] table."""
    result = branch_sim("run", "night-intrusion", "--speed", "0", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "branch-sim: timeline done" in result.stdout
    gpio = GpioConfig.model_validate(snippet(result.stdout)["sources"]["gpio"])
    assert [i.name for i in gpio.inputs] == [
        "front_door",
        "hall_motion",
        "vault_door",
        "tamper_loop",
        "panic_teller",
    ]


def test_run_serial_scenario_prints_device_paths_in_workdir(tmp_path: Path) -> None:
    """Serial devices' paths are printed, live in the workdir and match the config snippet."""
    pytest.importorskip("branchsim.serialdev")
    result = branch_sim("run", "power-failure", "--speed", "0", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    serial = snippet(result.stdout)["sources"]["serial"]
    (ups,) = serial["ups"]
    assert Path(ups["port"]).parent == tmp_path
    assert f"  main  {ups['port']}" in result.stdout


@pytest.mark.skipif(find_nut() is None or find_snmpd() is None,
                    reason="needs Debian's nut-server (upsd, dummy-ups) and snmpd")
def test_run_ip_scenario_prints_the_ip_sources(tmp_path: Path) -> None:
    """`run facility-over-ip --speed 0` prints each IP device's address and its
    [[sources.nut]] / [[sources.snmp]] / [[sources.modbus_tcp]] entry, named as in the
    scenario, which the agent's config accepts; the daemons' files stay in the workdir."""
    result = branch_sim("run", "facility-over-ip", "--speed", "0", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    sources = SourcesConfig.model_validate(snippet(result.stdout)["sources"])
    (nut,), (snmp,), (meter,) = sources.nut, sources.snmp, sources.modbus_tcp
    assert (nut.name, nut.ups, snmp.name, snmp.profile, meter.name) == (
        "ups", "rack-ups", "pdu", "pdu-outlets", "meter")
    assert snmp.version == "2c" and snmp.community is not None
    for name, kind, port in (("ups", "nut", nut.port), ("pdu", "snmp", snmp.port),
                             ("meter", "modbus_tcp", meter.port)):
        assert f"  {name}  {kind} 127.0.0.1:{port}" in result.stdout
    assert (tmp_path / next(p.name for p in tmp_path.glob("ups-*")) / "upsd.log").exists()
    assert (tmp_path / next(p.name for p in tmp_path.glob("pdu-*")) / "snmpd.log").exists()


def test_run_bad_scenario_exits_2_naming_the_key(tmp_path: Path) -> None:
    """A scenario with an unknown key is refused with exit code 2 and the key path."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "bad"\nduration = 5\n[[gpio]]\nname = "d"\npin = 17\n'
        '[[steps]]\nat = 1\ndevice = "d"\nset = true\nbounse = 3\n'
    )
    result = branch_sim("run", str(bad), "--speed", "0")
    assert result.returncode == 2
    assert "steps[0].bounse: unknown key" in result.stderr
    assert CONFIG_BEGIN not in result.stdout


def test_ctrl_c_stops_a_running_simulator(
    running_sim: tuple[subprocess.Popen[str], queue.Queue[str | None]],
) -> None:
    """SIGINT during the timeline stops the devices and exits 130."""
    proc, lines = running_sim
    seen: list[str | None] = []
    while CONFIG_END not in seen:
        seen.append(lines.get(timeout=30))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    while seen[-1] is not None:
        seen.append(lines.get(timeout=10))
    assert "branch-sim: stopped" in seen


def test_agent_runs_on_the_simulated_branch(tmp_path: Path) -> None:
    """`branch-sim agent night-intrusion --config FILE`: the agent's real runtime, its GPIO and
    serial sources replaced by the scenario's devices, commits the scenario's alarms to its
    outbox (no uplink reachable: they wait there) and stops cleanly on SIGTERM."""
    gw = AgentProcess(tmp_path / "gw", uplink={"order": ["mqtt"],
                                               "mqtt": mqtt_uplink(get_free_port(), None)})
    gw.start("--speed", "20", command=(*CLI, "agent", "night-intrusion"))
    try:
        wait_until(lambda: alarms(gw) >= 3, 60, "no alarms from the simulated branch", gw)
    finally:
        assert gw.stop() == 0, gw.log_text()[-3000:]


def alarms(gw: AgentProcess) -> int:
    db = gw.state / "outbox.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            row = c.execute("SELECT COUNT(*) FROM events WHERE prio = ?", (ALARM,)).fetchone()
            return int(row[0])
    except sqlite3.OperationalError:
        return 0
