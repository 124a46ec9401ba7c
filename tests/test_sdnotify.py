"""`branch-agent run` under a fake systemd: a datagram socket as NOTIFY_SOCKET and a watchdog."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, mqtt_uplink
from tests.support.broker import Mosquitto

WATCHDOG_USEC = 1_000_000  # WatchdogSec=1: the agent pings every 0.5 s


class NotifySocket:
    """What systemd would see: every datagram, with the monotonic time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def lines(self, since: float = 0.0) -> list[str]:
        with self._lock:
            return [ln for t, msg in self.messages if t >= since for ln in msg.split("\n")]

    def pings(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        with self._lock:
            return [t for t, msg in self.messages if since <= t < until and msg == "WATCHDOG=1"]

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {self.lines()[-20:]}")
            time.sleep(0.02)  # polling interval of a condition wait, not a fixed delay

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def agent(tmp_path: Path, broker: Mosquitto, notify: NotifySocket) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path / "gw",
                     uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, None)})
    a.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC),
                 "BRANCH_AGENT_DEBUG_HANG": "3"})
    try:
        yield a
    finally:
        if a.proc is not None and a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)  # in case a test left it stopped
        a.kill()


def test_ready_watchdog_status_stopping(agent: AgentProcess, notify: NotifySocket) -> None:
    """The agent sends READY=1, then WATCHDOG=1 periodically, STATUS= lines, and STOPPING=1."""
    notify.wait(lambda: "READY=1" in notify.lines(), 20, "READY=1")
    notify.wait(lambda: len(notify.pings()) >= 4, 10, "four WATCHDOG=1 pings")
    notify.wait(lambda: any(ln.startswith("STATUS=outbox ") for ln in notify.lines()), 10,
                "a STATUS= summary")
    pings = notify.pings()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"a ping at least once per WatchdogSec: {gaps}"
    assert min(gaps) > 0.2, f"pings are paced at WatchdogSec/2, not a busy loop: {gaps}"
    assert agent.stop() == 0
    assert "STOPPING=1" in notify.lines()
    lines = notify.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")


def test_blocked_loop_stops_the_watchdog_pings(agent: AgentProcess,
                                               notify: NotifySocket) -> None:
    """While the event loop is blocked (a stuck call on the loop, 3 s, through the agent's debug
    hook: the process itself keeps running), no WATCHDOG=1 arrives for longer than WatchdogSec,
    so systemd would kill it; once the loop runs again the pings resume."""
    assert agent.proc is not None
    notify.wait(lambda: len(notify.pings()) >= 3, 20, "watchdog pings")
    os.kill(agent.proc.pid, signal.SIGUSR2)
    agent.wait_log("agent.debug_hang", timeout=10)
    blocked_at = time.monotonic()
    # A silence of two full watchdog periods: what systemd would judge as a hung service.
    window = 2 * WATCHDOG_USEC / 1e6
    notify.wait(lambda: time.monotonic() - blocked_at > window, window + 5, "the window")
    # One ping may already have been in flight (or not yet read by our thread) at the block.
    assert len(notify.pings(since=blocked_at)) <= 1
    notify.wait(lambda: len(notify.pings(since=blocked_at + window)) >= 2, 10,
                "pings once the loop runs again")
    assert agent.stop() == 0
