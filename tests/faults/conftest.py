"""The whole chain for fault tests: agent process -> fault proxy -> real mosquitto -> reference
platform (Receiver + MqttPlatformServer, connected to the broker directly, not through the
proxy). Plain TCP: the faults are below TLS, and the e2e suite covers mutual TLS.

`chain.check()` runs the checker (tests/faults/checker.py) and adds the figures to the session
summary printed at the end (`make faults`); FAULTS_SUMMARY=path also writes them as JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from branchsim.faultproxy import ProxyThread
from branchsim.platform.mqtt_server import MqttPlatformServer
from branchsim.platform.receiver import Receiver
from tests.faults.checker import SUMMARY, Ledger, Report, check_platform, read_outbox
from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until
from tests.support.broker import Mosquitto


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARY.runs:
        return
    terminalreporter.write_sep("=", "fault suite")
    terminalreporter.write_line(SUMMARY.table())
    out = os.environ.get("FAULTS_SUMMARY")
    if out:
        Path(out).write_text(json.dumps(SUMMARY.as_dict(), indent=2, sort_keys=True) + "\n")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Seeded per test; FAULTS_SEED=n replays a run (the seed is in the test's report)."""
    seed = int(os.environ.get("FAULTS_SEED", random.randrange(1 << 32)))
    request.node.user_properties.append(("seed", seed))
    print(f"FAULTS_SEED={seed}")
    return random.Random(seed)


def counter(name: str, rate_hz: float, prio: int = 2, batch: int = 1,
            type: str = "synthetic") -> dict[str, Any]:
    """A synthetic source numbering its readings 0, 1, 2, ... (the independent oracle)."""
    return {"name": name, "rate_hz": rate_hz, "batch": batch, "priority": prio,
            "waveform": "counter", "type": type}


@dataclass
class Chain:
    dir: Path
    broker: Mosquitto
    proxy: ProxyThread
    rx: Receiver
    server: MqttPlatformServer
    agent: AgentProcess
    ledger: Ledger
    sources_used: list[str] = field(default_factory=list)
    counted: bool = True  # counter sources give the value oracle (off when a run restarts them)

    def start_agent(self, *sources: dict[str, Any], env: dict[str, str] | None = None) -> None:
        """Start the agent with these synthetic sources (each name used by one run only)."""
        for s in sources:
            src = f"synthetic.{s['name']}"
            assert src not in self.sources_used, f"source name {src} reused"
            self.sources_used.append(src)
        self.agent.doc["sources"] = {"synthetic": list(sources)}
        self.agent.start(env=env)

    def move_state(self, state_dir: Path) -> None:
        """Put the agent's state dir (outbox, side files) somewhere else, e.g. a small fs."""
        self.agent.state = state_dir
        self.agent.doc["gateway"]["state_dir"] = str(state_dir)
        self.ledger.db = state_dir / "outbox.db"

    def accepted_now(self) -> int:
        snap = read_outbox(self.ledger.db)
        return 0 if snap is None else snap.next_id - 1

    def delivered(self) -> int:
        return len(self.rx.events(self.agent.gw))

    def wait_accepting(self, more_than: int, timeout: float = 20.0) -> None:
        wait_until(lambda: self.accepted_now() > more_than, timeout,
                   f"agent accepting beyond id {more_than}", self.agent)

    def wait_delivered(self, n: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.delivered() >= n, timeout, f"{n} events at the platform",
                   self.agent)

    def kill(self) -> None:
        self.agent.kill()
        self.ledger.observe(killed=True)
        SUMMARY.faults["agent SIGKILL"] += 1

    def drain(self, timeout: float = 60.0) -> None:
        """Run the agent without sources until the outbox is empty, then stop it (rc 0)."""
        self.proxy.heal()
        if self.agent.running:
            assert self.agent.stop() == 0
        at = len(self.agent.log_text())
        self.start_agent()
        # SIGTERM before the handlers are installed would kill it, and the start's own audit
        # record must be in the outbox before "drained" means anything: wait until READY.
        self.agent.wait_log('"agent.ready"', after=at)

        def drained() -> bool:
            snap = read_outbox(self.ledger.db)
            return snap is not None and snap.drained

        wait_until(drained, timeout, "outbox drained", self.agent)
        assert self.agent.stop() == 0, self.agent.log_text()[-3000:]
        self.ledger.observe()

    def check(self, name: str, latency_clock_ok: bool = True,
              counter_sources: list[str] | None = None) -> Report:
        """Counter sources: all used ones unless a run restarts or evicts them (then name the
        ones whose values must still be complete, e.g. the alarms)."""
        if counter_sources is None:
            counter_sources = self.sources_used if self.counted else []
        rep = check_platform(self.ledger, counter_sources,
                             latency_clock_ok=latency_clock_ok)
        SUMMARY.add(name, rep)
        return rep

    def lose_broker_state(self) -> None:
        """Restart the broker with its persistence removed: every session and queued message
        is gone (a broker rebuilt from scratch)."""
        self.broker.kill()
        data = self.broker.dir / "data"
        shutil.rmtree(data)
        data.mkdir()
        self.broker.start()
        SUMMARY.faults["broker lost its session state"] += 1


@pytest.fixture
def chain(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Chain]:
    broker = Mosquitto(tmp_path / "broker").start()
    proxy: ProxyThread | None = None
    server: MqttPlatformServer | None = None
    rx = Receiver(tmp_path / "platform.db")
    agent: AgentProcess | None = None
    try:
        proxy = ProxyThread("127.0.0.1", broker.port).start()
        server = MqttPlatformServer(rx, "127.0.0.1", broker.port,
                                    client_id=f"platform-{tmp_path.name}")
        server.start()
        assert server.ready.wait(10), "platform never subscribed"
        agent = AgentProcess(
            tmp_path / "gw",
            uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(proxy.port, None,
                                                           connect_timeout=2.0)},
            forwarder={"ack_timeout_s": 2.0, "status_interval_s": 1.0, "batch_max_events": 50},
        )
        rx.register(agent.gw, agent.pubkey.read_bytes())
        ledger = Ledger(agent.state / "outbox.db", rx.store_path, agent.gw)
        c = Chain(tmp_path, broker, proxy, rx, server, agent, ledger)
        yield c
    finally:
        if agent is not None:
            agent.kill()
        if server is not None:
            server.stop()
        if proxy is not None:
            for kind, n in proxy.injected.items():
                SUMMARY.faults[f"proxy {kind}"] += n
            proxy.stop()
        broker.stop()
        rx.close()


def run_quiet(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (we run as root in CI); skipped with the reason if it cannot be mounted.
    This is the check on a real filesystem; without root, what a full disk does to the outbox
    is still checked on a fake disk behind its storage seam, in tests/test_outbox.py:
    test_full_disk_releases_the_reserve_and_keeps_alarms."""
    mnt = tmp_path / "smallfs"
    mnt.mkdir()
    res = run_quiet("mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        run_quiet("mount", "-o", "remount,rw", str(mnt))
        if run_quiet("umount", str(mnt)).returncode != 0:
            run_quiet("umount", "-l", str(mnt))  # a killed agent's files may still be open
