"""`branch-agent status` (table, --json, --watch) and `branch-agent metrics`, against a real agent
process that cannot reach its broker (so its events stay in the outbox)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until
from tests.support.broker import get_free_port

AGENT = [sys.executable, "-m", "agent.ops.cli"]
N = 7


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """An agent whose broker port has nobody listening, with a source of N telemetry events."""
    a = AgentProcess(
        tmp_path / "gw",
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(get_free_port(), None)},
        sources={"synthetic": [{"name": "load", "rate_hz": 200.0, "count": N}]},
    )
    a.start()
    try:
        yield a
    finally:
        a.kill()


def status(agent: AgentProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, "status", "--config", str(agent.config_path), *extra],
                          capture_output=True, text=True, timeout=60, check=False)


def status_json(agent: AgentProcess) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(status(agent, "--json").stdout)
    return doc


def running_with_all_events(agent: AgentProcess) -> bool:
    doc = status_json(agent)
    return bool(doc["running"]) and doc["outbox"].get("depth", {}).get("telemetry") == N


def test_status_of_a_running_agent(agent: AgentProcess) -> None:
    """While the agent runs, status shows it running, the outbox depth per priority, the uplink
    (not connected), and the source with its readings; the table says the same."""
    wait_until(lambda: running_with_all_events(agent), 20,
               "status --json shows the running agent's outbox depth", agent)
    doc = status_json(agent)
    assert doc["running"] is True and doc["figures_from"] == "agent"
    [uplink] = doc["uplinks"]
    assert uplink["name"].startswith("mqtt") and uplink["connected"] is False
    src = {s["name"]: s for s in doc["sources"]}["synthetic.load"]
    assert src["readings"] == N
    assert doc["outbox"]["oldest_unsent_age_s"] >= 0
    assert doc["outbox"]["last_acked_seq"] == 0
    table = status(agent)
    assert table.returncode == 0, table.stderr
    assert "running" in table.stdout and "synthetic.load" in table.stdout
    assert "never" in table.stdout  # no batch acked yet


def test_status_when_agent_is_not_running(agent: AgentProcess) -> None:
    """After the agent stops, status says clearly that it is not running (exit 3) and still
    shows the outbox depth per priority, read from the database read-only."""
    wait_until(lambda: running_with_all_events(agent), 20, "events committed", agent)
    assert agent.stop() == 0
    db = agent.state / "outbox.db"
    before = db.stat().st_mtime_ns
    res = status(agent, "--json")
    assert res.returncode == 3
    doc = json.loads(res.stdout)
    assert doc["running"] is False and "is gone" in doc["reason"]
    assert doc["figures_from"] == "database"
    # N readings, plus the audit record of the loaded config (an alert) that every start makes
    assert doc["outbox"]["depth"] == {"telemetry": N, "alert": 1}
    table = status(agent)
    assert table.returncode == 3
    assert "NOT RUNNING" in table.stdout
    assert db.stat().st_mtime_ns == before, "status must not write the outbox"


def test_status_watch_refreshes_until_interrupted(agent: AgentProcess, tmp_path: Path) -> None:
    """--watch prints a fresh frame every interval and ends cleanly on Ctrl-C (SIGINT)."""
    wait_until(lambda: bool(agent.status()), 20, "status.json written", agent)
    out = tmp_path / "watch.out"
    with out.open("wb") as f:
        p = subprocess.Popen([*AGENT, "status", "--config", str(agent.config_path), "--watch",
                              "--interval", "0.1"], stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: out.read_text(errors="replace").count("synthetic.load") >= 3, 20,
                   "three frames")
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_metrics_endpoint_serves_the_status_figures(agent: AgentProcess) -> None:
    """`branch-agent metrics` serves the outbox depth, uplink and source figures on localhost."""
    wait_until(lambda: running_with_all_events(agent), 20, "events in the outbox", agent)
    port = get_free_port()
    p = subprocess.Popen([*AGENT, "metrics", "--config", str(agent.config_path), "--port",
                          str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert p.stdout is not None
        assert "serving metrics" in p.stdout.readline().decode()
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        assert "branch_agent_up 1.0" in text
        assert f'branch_agent_outbox_events{{priority="telemetry"}} {float(N)}' in text
        assert 'branch_agent_uplink_connected{active="false",uplink="mqtt:' in text
        assert f'branch_agent_source_readings_total{{source="synthetic.load"}} {float(N)}' in text
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_a_damaged_status_file_is_said_so(agent: AgentProcess) -> None:
    """A status.json that is not a status document (damaged, truncated) is reported as
    unreadable, not as missing; the figures then come from the database."""
    wait_until(lambda: running_with_all_events(agent), 20, "events committed", agent)
    assert agent.stop() == 0
    (agent.run / "status.json").write_text('{"pid": 12')
    res = status(agent, "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == 3 and doc["running"] is False
    assert "is unreadable (not valid JSON)" in doc["reason"], doc["reason"]
    assert doc["outbox"]["depth"]["telemetry"] == N
