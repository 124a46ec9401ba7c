"""The agent's footprint as a real `branch-agent run` process: start-up, idle CPU, memory
(idle and over a soak), and write amplification, each beside its baseline from the same run.

    .venv/bin/python bench/footprint.py [--idle-s 60] [--soak-s S] [--wamp-s 30] [--runs 5]
                                        [--quick] [--json PATH]
    taskset -c 0 .venv/bin/python bench/footprint.py      # everything on one core

Each agent is `python -m agent.ops.cli run --config F` with a production config (defaults
everywhere; mutual TLS to a real mosquitto; the reference platform as a subprocess verifying
and acking every batch), so what is measured includes forwarding what the sensors produce.

* start-up: process start -> READY=1 on a NOTIFY_SOCKET datagram socket this script binds
  (20 synthetic sensors configured), `--runs` times; baseline `python -c pass`, same count.
* idle: 20 synthetic sensors at 1 Hz. After READY and a warm-up, CPU seconds (utime + stime,
  /proc/PID/stat) over wall seconds for `--idle-s` (at least `--soak-s`), median and spread over
  10 s intervals; peak RSS (VmHWM) of the process; RSS growth from the start to the end of the
  window (the soak: `--soak-s 600` for the issue's 10 minutes). Baseline RSS: the peak of bare
  `python -c "import agent"`.
* write amplification: 20 synthetic sensors at 50 Hz (1 000 events/s). Bytes the process caused
  to be written to storage (/proc/PID/io write_bytes: SQLite WAL and checkpoints, status.json,
  its log) per accepted event, over intervals that start and end at a status.json update (whose
  `accepted` counter is exact at that moment); baseline: the mean encoded size of those events
  (their canonical CBOR as signed in the batches, re-encoded from the platform's store).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import Row, add_common_args, machine, print_table, summarise, write_json
from _rig import (
    Platform,
    agent_doc,
    cpu_seconds,
    import_rss_mb,
    new_gateway,
    proc_status_kb,
    write_bytes,
)

from agent import protocol
from branchsim.platform.store import row_event
from tests.support.agentproc import to_toml
from tests.support.broker import Mosquitto
from tests.support.pki import Pki, make_pki

# The interpreter of the agent process (--agent-python); the platform and broker run here.
AGENT_PYTHON = [sys.executable]

STARTUP_TARGET_S = 1.5
IDLE_CPU_TARGET = 0.01
IDLE_RSS_TARGET_MB = 60.0
WAMP_TARGET = 3.0
SENSORS = 20


def sensors(rate_hz: float) -> dict[str, Any]:
    return {"synthetic": [{"name": f"s{i:02d}", "rate_hz": rate_hz, "unit": "Cel",
                           "type": "temperature"} for i in range(SENSORS)]}


class Agent:
    """One `branch-agent run` process with its own gateway id, key, state dir and config."""

    def __init__(self, dir: Path, gw: str, rate_hz: float, broker: Mosquitto, pki: Pki,
                 platform_db: Path) -> None:
        self.dir = dir
        self.gw = gw
        key = new_gateway(dir / "keys", gw, platform_db)
        self.state = dir / "state"
        self.config = dir / "agent.toml"
        self.config.write_text(to_toml(agent_doc(gw, self.state, key, broker.port, pki,
                                                 sources=sensors(rate_hz))))
        self.proc: subprocess.Popen[bytes] | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[float]:
        """Start the process; yields seconds from spawn to READY=1; stops it (SIGTERM) after."""
        sock_path = self.dir / "notify.sock"
        sock_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(sock_path))
            env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
            with (self.dir / "agent.log").open("ab") as log:
                start = time.perf_counter()
                self.proc = subprocess.Popen(
                    [AGENT_PYTHON[0], "-m", "agent.ops.cli", "run", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                took = self._wait_ready(sock, start)
                yield took
            finally:
                self.stop()

    def _wait_ready(self, sock: socket.socket, start: float, timeout: float = 30.0) -> float:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_tail()}")
            sock.settimeout(0.2)
            try:
                msg = sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in msg.split(b"\n"):
                return time.perf_counter() - start
        raise RuntimeError(f"no READY=1 within {timeout} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return (self.dir / "agent.log").read_text(errors="replace")[-3000:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.state / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return doc

    def next_status(self, after: float, timeout: float = 30.0) -> dict[str, Any]:
        """The first status.json written after `after` (its `updated` time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.status()
            if doc.get("updated", 0) > after:
                return doc
            time.sleep(0.01)  # polling interval of a condition wait
        raise RuntimeError(f"status.json not updated within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def spawn_seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def startup(agent: Agent, runs: int) -> tuple[list[float], list[float]]:
    """(agent spawn -> READY, `python -c pass`) seconds, `runs` of each, interleaved."""
    ready: list[float] = []
    bare: list[float] = []
    for _ in range(runs):
        bare.append(spawn_seconds([sys.executable, "-c", "pass"]))
        with agent.running() as took:
            ready.append(took)
    return ready, bare


def idle(agent: Agent, warmup: float, window: float, interval: float) -> dict[str, Any]:
    """CPU share per interval, peak RSS and RSS growth over the window, after READY."""
    with agent.running():
        time.sleep(warmup)  # start-up work (imports, TLS connect, first batches) is not idle
        pid = agent.pid
        rss0 = proc_status_kb(pid, "VmRSS")
        shares: list[float] = []
        cpu_total = 0.0
        t_start = time.perf_counter()
        t, c = t_start, cpu_seconds(pid)
        rss_series = [rss0]
        while time.perf_counter() - t_start < window - 1e-6:
            time.sleep(interval)  # a sampling period: the figure is CPU over wall time
            t2, c2 = time.perf_counter(), cpu_seconds(pid)
            shares.append((c2 - c) / (t2 - t))
            cpu_total += c2 - c
            t, c = t2, c2
            rss_series.append(proc_status_kb(pid, "VmRSS"))
        wall = t - t_start
        hwm = proc_status_kb(pid, "VmHWM")
    return {"shares": shares, "share_total": cpu_total / wall, "peak_kb": hwm,
            "growth_kb": rss_series[-1] - rss0, "rss_max_kb": max(rss_series), "wall": wall}


def write_amplification(agent: Agent, warmup: float, intervals: int,
                        every: float) -> list[float]:
    """Bytes written per accepted event for each interval (status.json to status.json)."""
    per_event: list[float] = []
    with agent.running():
        time.sleep(warmup)  # past start-up: the outbox file and WAL exist and are warm
        doc = agent.next_status(time.time() - 0.01)
        wb, acc = write_bytes(agent.pid), int(doc["accepted"])
        for _ in range(intervals):
            time.sleep(every)  # the interval's length; its ends are the status writes below
            doc = agent.next_status(doc["updated"])
            wb2, acc2 = write_bytes(agent.pid), int(doc["accepted"])
            per_event.append((wb2 - wb) / max(1, acc2 - acc))
            wb, acc = wb2, acc2
    return per_event


def encoded_sizes(platform_db: Path, gw: str, limit: int = 5000) -> list[int]:
    """Wire sizes of the gateway's last events, re-encoded as the agent encodes them."""
    conn = sqlite3.connect(f"file:{platform_db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT gw, id, t, tq, src, type, v, u, prio, attrs, seq FROM events WHERE gw = ? "
            "ORDER BY id DESC LIMIT ?", (gw, limit)).fetchall()
    finally:
        conn.close()
    sizes = []
    for row in rows:
        ev = row_event(row)
        ev.pop("gw")
        ev.pop("seq")
        sizes.append(len(protocol.encode_event(**ev)))
    return sizes


def measure(args: argparse.Namespace, tmp: Path) -> list[Row]:
    q = args.quick
    runs = args.runs or (1 if q else 5)
    idle_s = max(args.idle_s, args.soak_s or 0) if not q else 2.0
    interval = 1.0 if q else 10.0
    warmup = 1.0 if q else 5.0
    wamp_intervals = 1 if q else max(1, round(args.wamp_s / 10))
    pki = make_pki(tmp / "pki")
    bare_rss = [import_rss_mb(AGENT_PYTHON[0]) for _ in range(3)]
    broker = Mosquitto(tmp / "broker", tls=pki).start()
    try:
        pdb = tmp / "platform.db"
        new_gateway(tmp / "nobody", "bench-none", pdb)  # creates the platform's database
        platform = Platform(pdb, broker.port, pki, tmp / "platform.log").wait_ready()
        try:
            starter = Agent(tmp / "start", "bench-start", 1.0, broker, pki, pdb)
            ready, bare = startup(starter, runs)
            print(f"start-up: READY after {[round(x, 3) for x in ready]} s; python -c pass "
                  f"{[round(x, 3) for x in bare]} s", flush=True)
            quiet = idle(Agent(tmp / "idle", "bench-idle", 1.0, broker, pki, pdb),
                         warmup, idle_s, interval)
            print(f"idle: CPU {quiet['share_total']:.2%} over {quiet['wall']:.0f} s, peak RSS "
                  f"{quiet['peak_kb'] / 1024:.1f} MB, growth {quiet['growth_kb']} kB", flush=True)
            busy = Agent(tmp / "wamp", "bench-wamp", 50.0, broker, pki, pdb)
            wamp = write_amplification(busy, warmup, wamp_intervals, 2.0 if q else 10.0)
            sizes = encoded_sizes(pdb, "bench-wamp")
            print(f"write amplification: {[round(x) for x in wamp]} B/event; encoded "
                  f"{statistics.mean(sizes):.1f} B", flush=True)
        finally:
            platform.stop()
    finally:
        broker.stop()
    return rows(ready, bare, quiet, bare_rss, wamp, sizes, args)


def rows(ready: list[float], bare: list[float], quiet: dict[str, Any], bare_rss: list[float],
         wamp: list[float], sizes: list[int], args: argparse.Namespace) -> list[Row]:
    r_med, r_spread = summarise(ready)
    b_med, _ = summarise(bare)
    shares = [s * 100 for s in quiet["shares"]]
    _, c_spread = summarise(shares)
    c_val = quiet["share_total"] * 100
    rss = quiet["peak_kb"] / 1024
    base_rss, _ = summarise(bare_rss)
    growth = quiet["growth_kb"] / 1024
    enc = statistics.mean(sizes)
    w_med, w_spread = summarise(wamp)
    window = f"{quiet['wall']:.0f} s"
    return [
        Row(figure="start-up, spawn -> READY=1", value=r_med, unit="s", spread=r_spread,
            baseline=b_med, baseline_what="s python -c pass",
            target=f"<= {STARTUP_TARGET_S} s", met=r_med <= STARTUP_TARGET_S,
            note=f"{len(ready)} runs; 20 synthetic sensors, MQTT uplink configured"),
        Row(figure="idle CPU, 20 sensors at 1 Hz", value=c_val, unit="% of a core",
            spread=c_spread, target=f"<= {IDLE_CPU_TARGET * 100:.0f} %",
            met=c_val <= IDLE_CPU_TARGET * 100,
            note=f"over {window} after READY; spread over {len(shares)} intervals"),
        Row(figure="memory, peak RSS idle (20 sensors)", value=rss, unit="MB",
            baseline=base_rss, baseline_what="MB import agent",
            target=f"<= {IDLE_RSS_TARGET_MB:.0f} MB", met=rss <= IDLE_RSS_TARGET_MB,
            note="VmHWM of the agent process, start-up included"),
        Row(figure=f"memory, RSS growth over {window} idle", value=growth, unit="MB",
            target="no growth (<= 1 MB)", met=growth <= 1.0,
            note="VmRSS end - start; `--soak-s 600` for a 10-minute soak"
                 + (" (this run)" if (args.soak_s or 0) >= 600 else "")),
        Row(figure="write amplification at 1k ev/s", value=w_med, unit="B/event",
            spread=w_spread, baseline=enc, baseline_what="B encoded event",
            target=f"<= {WAMP_TARGET:.0f}x encoded", met=w_med <= WAMP_TARGET * enc,
            note=f"bytes written to disk per accepted event, median of {len(wamp)} intervals"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--soak-s", type=float, default=None, help="idle window of at least S")
    ap.add_argument("--wamp-s", type=float, default=30.0)
    ap.add_argument("--agent-python", default=sys.executable, metavar="PATH",
                    help="the interpreter that runs the agent, e.g. .venv-dist/bin/python: the "
                         "product as a gateway installs it (make test-dist), without the "
                         "simulator's packages (rich), which .venv has")
    args = ap.parse_args()
    AGENT_PYTHON[0] = args.agent_python
    print(f"# bench/footprint.py; {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as d:
        result = measure(args, Path(d))
    print_table(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
