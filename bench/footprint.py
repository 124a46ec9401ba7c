"""The agent's footprint as a real `branch-agent run` process: start-up, idle CPU, memory
(idle and over a soak), and the bytes it writes to storage (its write budget), each beside its
baseline from the same run.

    .venv/bin/python bench/footprint.py [--idle-s 60] [--soak-s S] [--wamp-s 30] [--runs 5]
                                        [--budget-s 60] [--attribute-s 20] [--writes-only]
                                        [--state-root DIR] [--loop-mib N]
                                        [--agent-python PATH] [--quick] [--json PATH]
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
* write budget (issue 16): bytes the agent process caused to be written to storage
  (/proc/PID/io ``write_bytes``: SQLite's WAL and checkpoints, status.json, chain.json, its log)
  per accepted event and per day, at four loads: 1 sensor at 1 Hz; 20 sensors at 1 Hz (a
  branch's load; the synthetic sensors start together, so their readings arrive in step); the
  same 20 at 0.975-1.025 Hz, whose phases drift apart as independent sensors' do (each reading
  then commits on its own); 1,000 events/s (20 sensors at 50 Hz: the `write amplification`
  figure, median of 10 s intervals, as before). Each window (`--budget-s`, `--wamp-s` at 1,000
  events/s) starts and ends at a status.json update, whose `accepted` counter is exact then.
  Baselines: the mean encoded size of those events (their canonical CBOR as signed in the
  batches, re-encoded from the platform's store), and raw SQLite: the same events inserted
  into a one-table store (WAL, ``synchronous=FULL``) in the agent's commit groups, its own
  write_bytes. Targets: at 20 events/s at most 3x the encoded bytes; at 1 event/s at most
  50 MB a day.
* where the bytes go: after each window, `strace` follows the process for `--attribute-s`
  (bench/_writes.py: the agent then runs with each SQLite statement announced on /dev/null;
  write_bytes does not count those) and the bytes are attributed per file and per cause (event
  insert, batch claim, ack, checkpoint, status.json, chain.json), with fsyncs and WAL frames
  per transaction. Skipped when strace is not installed.

The state directories must be on a block-device filesystem (tmpfs writes nothing to storage):
the temporary directory is refused if it is tmpfs (`--state-root` chooses another). As root,
`--loop-mib N` puts them on a fresh ext4 image of N MiB, loop-mounted, and adds what reached
that device (/sys/block/loopN/stat: data, ext4 journal and metadata), synced at each window end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import Row, add_common_args, machine, print_table, summarise, write_json
from _rig import (
    Platform,
    agent_doc,
    cpu_seconds,
    import_rss_mb,
    io_counters,
    new_gateway,
    proc_status_kb,
    tmpfs_runtime_dir,
)
from _writes import INSERT, STRACE_ARGS, Attribution, attribute

from agent import protocol
from tests.support.agentproc import to_toml
from tests.support.broker import Mosquitto
from tests.support.pki import Pki, make_pki

# The interpreter of the agent process (--agent-python); the platform and broker run here.
AGENT_PYTHON = [sys.executable]
CHECKOUT = Path(__file__).resolve().parent.parent
WRITES = Path(__file__).resolve().parent / "_writes.py"

STARTUP_TARGET_S = 1.5
IDLE_CPU_TARGET = 0.01
IDLE_RSS_TARGET_MB = 60.0
WAMP_TARGET = 3.0  # bytes written per event, x the encoded size (1,000 and 20 events/s)
DAY_1HZ_TARGET_MB = 50.0  # bytes written a day at 1 event/s
SENSORS = 20
DAY = 86400.0
NOT_STORAGE = {"tmpfs", "ramfs", "devtmpfs", "proc", "sysfs"}


def sensors(rate_hz: float | list[float]) -> dict[str, Any]:
    rates = rate_hz if isinstance(rate_hz, list) else [rate_hz] * SENSORS
    return {"synthetic": [{"name": f"s{i:02d}", "rate_hz": r, "unit": "Cel",
                           "type": "temperature"} for i, r in enumerate(rates)]}


def spread_rates(n: int, width: float = 0.05) -> list[float]:
    """n rates within 1 Hz +- width/2, their offsets from 1 Hz well spread (golden-ratio
    sequence, centred): the sensors' phases drift apart within seconds and keep mixing."""
    frac = [(i * 0.6180339887498949) % 1.0 for i in range(n)]
    mean = sum(frac) / n
    return [round(1.0 + width * (f - mean), 6) for f in frac]


class Agent:
    """One `branch-agent run` process with its own gateway id, key, state dir and config."""

    def __init__(self, dir: Path, gw: str, rate_hz: float | list[float], broker: Mosquitto,
                 pki: Pki, platform_db: Path, state: Path | None = None,
                 announce_sql: bool = False, compression: str = "none",
                 window_ms: float | None = None) -> None:
        self.dir = dir
        self.gw = gw
        key = new_gateway(dir / "keys", gw, platform_db)
        self.state = state or dir / "state"
        self.config = dir / "agent.toml"
        self.config.write_text(to_toml(agent_doc(gw, self.state, key, broker.port, pki,
                                                 tmpfs_runtime_dir(self.state),
                                                 sources=sensors(rate_hz),
                                                 forwarder={"compression": compression},
                                                 **({"outbox": {"telemetry_window_ms": window_ms}}
                                                    if window_ms is not None else {}))))
        # bench/_writes.py as the main: statements announced on /dev/null for strace
        self.main = [str(WRITES), "-m"] if announce_sql else ["-m"]
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
                    [AGENT_PYTHON[0], *self.main, "agent.ops.cli", "run", "--config",
                     str(self.config)],
                    # in the checkout: `-m` puts the working directory first on sys.path, so
                    # this tree's agent runs whatever --agent-python has installed; what that
                    # interpreter brings is the set of packages beside it
                    cwd=CHECKOUT, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env=env)
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
            doc: dict[str, Any] = json.loads((tmpfs_runtime_dir(self.state) / "status.json")
                                              .read_text())
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
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        shutil.rmtree(tmpfs_runtime_dir(self.state), ignore_errors=True)  # under /dev/shm


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


def first_start_peak_kb(agent: Agent) -> int:
    """VmHWM of the agent's first start, up to READY: it makes its store (a gateway's first
    boot), which the starts after it do not."""
    with agent.running():
        return proc_status_kb(agent.pid, "VmHWM")


def idle(agent: Agent, warmup: float, window: float, interval: float,
         first_kb: int | None = None) -> dict[str, Any]:
    """CPU share per interval, peak RSS and RSS growth over the window, after READY (of a start
    on the store a first start made: a gateway's every boot after its first)."""
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
            "growth_kb": rss_series[-1] - rss0, "rss_max_kb": max(rss_series), "wall": wall,
            "first_kb": first_kb}


@dataclass(frozen=True, slots=True)
class Load:
    key: str  # its directory and gateway id
    label: str  # in the figures
    rates: list[float]  # one per synthetic sensor, Hz
    window: float  # seconds measured
    warmup: float  # seconds after READY before the window
    attribute: float  # seconds of strace after the window (0: none)

    @property
    def rate(self) -> float:
        return sum(self.rates)


@dataclass(slots=True)
class Writes:
    """What one load wrote over its window, and where it went."""

    load: Load
    seconds: float
    accepted: int
    written: int  # /proc/PID/io write_bytes
    cancelled: int  # cancelled_write_bytes (dirty pages truncated before they were written)
    per_event: list[float]  # write_bytes per accepted event, per interval
    device: int | None  # bytes that reached the loop device (--loop-mib)
    encoded: list[int]
    traced: Attribution | None = None
    traced_accepted: int = 0
    traced_written: int = 0
    raw_per_event: float | None = None  # the raw SQLite baseline
    raw_group: float = 0.0

    @property
    def per_event_mean(self) -> float:
        return self.written / max(1, self.accepted)

    @property
    def per_day(self) -> float:
        return self.written / self.seconds * DAY

    @property
    def encoded_mean(self) -> float:
        return statistics.mean(self.encoded) if self.encoded else float("nan")


def fs_type(path: Path) -> str:
    """The filesystem holding `path`, e.g. "ext4 on /dev/vda" (/proc/self/mountinfo)."""
    real = str(path.resolve())
    best, what = "", "?"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        mnt = left.split()[4].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, what = mnt, "{} on {}".format(*right.split()[:2])
    return what


def state_root(asked: Path | None) -> Path:
    """Where the temporary directory goes: `asked`, else the usual temporary directory, else
    /var/tmp; never a filesystem that writes nothing to storage (tmpfs)."""
    for root in ([asked] if asked else [Path(tempfile.gettempdir()), Path("/var/tmp")]):
        if fs_type(root).split()[0] not in NOT_STORAGE:
            return root
    raise SystemExit(f"{asked or tempfile.gettempdir()} is {fs_type(asked or Path('/tmp'))}: "
                     "writes there reach no storage; choose another with --state-root")


class LoopFs:
    """A fresh ext4 image, loop-mounted (root only), whose device counts what reaches it:
    data, the ext4 journal and metadata (/sys/block/loopN/stat, sectors written)."""

    def __init__(self, image: Path, mib: int) -> None:
        self.image = image
        self.mib = mib
        self.mnt = image.with_suffix(".mnt")
        self.dev = ""

    def __enter__(self) -> LoopFs:
        with self.image.open("wb") as f:
            f.truncate(self.mib * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True)
        self.mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mnt)], check=True)
        self.dev = subprocess.run(["findmnt", "-no", "SOURCE", str(self.mnt)], check=True,
                                  capture_output=True, text=True).stdout.strip()
        return self

    def written(self) -> int:
        subprocess.run(["sync", "-f", str(self.mnt)], check=True)  # syncfs: dirty data, journal
        fields = Path(f"/sys/block/{Path(self.dev).name}/stat").read_text().split()
        return int(fields[6]) * 512

    def __exit__(self, *exc: object) -> None:
        for _ in range(20):
            if subprocess.run(["umount", str(self.mnt)], check=False,
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.5)  # an agent still closing its files
        with contextlib.suppress(OSError):
            self.mnt.rmdir()
            self.image.unlink()


def window(agent: Agent, load: Load, every: float,
           loop: LoopFs | None) -> tuple[float, int, int, int, list[float], int | None]:
    """Bytes written over `load.window` seconds in intervals of about `every`, each from one
    status.json update to another (its `accepted` counter is exact then; write_bytes is read
    within 10 ms of it): (seconds, accepted, write_bytes, cancelled, per event per interval,
    device bytes)."""
    dev0, dev_t0 = (loop.written(), time.monotonic()) if loop else (0, 0.0)
    doc = agent.next_status(time.time())
    t0, acc0 = float(doc["updated"]), int(doc["accepted"])
    wb0, cw0 = io_counters(agent.pid)
    t, acc, wb, cw2 = t0, acc0, wb0, cw0
    per_event: list[float] = []
    while t - t0 < load.window - 1.0:
        time.sleep(max(0.0, min(every, load.window - (t - t0)) - 2.5))  # to near the interval
        doc = agent.next_status(time.time())  # its end: the next status.json written
        wb2, cw2 = io_counters(agent.pid)
        t2, acc2 = float(doc["updated"]), int(doc["accepted"])
        per_event.append((wb2 - wb) / max(1, acc2 - acc))
        t, acc, wb = t2, acc2, wb2
    dev = None
    if loop:  # synced at both ends, so its own span: scaled to the window's
        dev = round((loop.written() - dev0) / (time.monotonic() - dev_t0) * (t - t0))
    return t - t0, acc - acc0, wb - wb0, cw2 - cw0, per_event, dev


def traced(agent: Agent, seconds: float, out: Path) -> tuple[Attribution, int, int]:
    """strace the running agent for about `seconds` (from one status.json update to another):
    (where the bytes went, events accepted, write_bytes in the same window)."""
    st = subprocess.Popen(["strace", *STRACE_ARGS, "-o", str(out), "-p", str(agent.pid)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached to every thread
        doc0 = agent.next_status(time.time())
        wb0, _ = io_counters(agent.pid)
        time.sleep(max(0.0, seconds - 2.5))
        doc1 = agent.next_status(time.time())
        wb1, _ = io_counters(agent.pid)
        owners = page_owners(agent.state / "outbox.db")
    finally:
        st.send_signal(signal.SIGINT)
        st.wait(15)
    t0, t1 = float(doc0["updated"]), float(doc1["updated"])

    def inside() -> Iterator[str]:
        with out.open(errors="replace") as f:
            for line in f:
                parts = line.split(None, 2)
                with contextlib.suppress(IndexError, ValueError):
                    if t0 < float(parts[1]) <= t1:
                        yield line

    a = attribute(inside(), t1 - t0)
    a.owners = owners
    return a, int(doc1["accepted"]) - int(doc0["accepted"]), wb1 - wb0


def page_owners(db: Path) -> dict[int, str]:
    """Which table or index each page of the store belongs to now (SQLite's dbstat); a page
    freed and reused during the window is named by its last owner."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {int(p): str(n) for n, p in conn.execute("SELECT name, pageno FROM dbstat")}
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


RAW_SQLITE = """
import os, sqlite3, sys
path, sizes, group, commits = sys.argv[1], [int(x) for x in sys.argv[2].split(',')], \\
    int(sys.argv[3]), int(sys.argv[4])
def written():
    for line in open('/proc/self/io'):
        if line.startswith('write_bytes:'):
            return int(line.split()[1])
c = sqlite3.connect(path, isolation_level=None)
for p in ('journal_mode=WAL', 'synchronous=FULL', 'wal_autocheckpoint=256',
          'journal_size_limit=1048576'):
    c.execute('PRAGMA ' + p)
c.execute('CREATE TABLE events(id INTEGER PRIMARY KEY, body BLOB NOT NULL)')
def run(n, k):
    for _ in range(n):
        c.execute('BEGIN IMMEDIATE')
        c.executemany('INSERT INTO events(body) VALUES (?)',
                      [(os.urandom(sizes[(k + j) % len(sizes)]),) for j in range(group)])
        c.execute('COMMIT')
        k += group
    return k
k = run(20, 0)
w = written()
run(commits, k)
print((written() - w) / (commits * group))
"""


def raw_sqlite(dir: Path, sizes: list[int], group: int) -> float:
    """Bytes written per event by a one-table store (WAL, synchronous=FULL, the agent's
    checkpoint settings) inserting events of `sizes` in commits of `group`, no deletes."""
    dir.mkdir(parents=True, exist_ok=True)
    commits = max(300, 3000 // group)
    out = subprocess.run([sys.executable, "-c", RAW_SQLITE, str(dir / "raw.db"),
                          ",".join(map(str, sizes[:500] or [80])), str(group), str(commits)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout)


def write_budget(agent: Agent, load: Load, every: float, loop: LoopFs | None,
                 platform_db: Path) -> Writes:
    with agent.running():
        time.sleep(load.warmup)  # past start-up: the outbox file and WAL exist and are warm
        secs, acc, wb, cw, per_event, dev = window(agent, load, every, loop)
        w = Writes(load, secs, acc, wb, cw, per_event, dev, [])
        if load.attribute > 0 and shutil.which("strace"):
            w.traced, w.traced_accepted, w.traced_written = traced(
                agent, load.attribute, agent.dir / "strace.txt")
    w.encoded = encoded_sizes(platform_db, agent.gw)
    inserts = w.traced.by_cause.get(INSERT) if w.traced else None
    if inserts is not None and inserts.txns:
        w.raw_group = w.traced_accepted / inserts.txns
        w.raw_per_event = raw_sqlite(agent.dir / "raw", w.encoded,
                                     max(1, round(w.raw_group)))
    return w


def encoded_sizes(platform_db: Path, gw: str, limit: int = 5000) -> list[int]:
    """Wire sizes of the gateway's last events, re-encoded as the agent encodes them (from the
    platform's columns by name: the store's other columns are not the event's)."""
    conn = sqlite3.connect(f"file:{platform_db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT id, t, tq, src, type, v, u, prio, attrs FROM events WHERE gw = ? "
            "ORDER BY id DESC LIMIT ?", (gw, limit)).fetchall()
    finally:
        conn.close()
    return [len(protocol.encode_event(id=id_, t=t, tq=tq, src=src, type=type_, v=json.loads(v),
                                      u=u, prio=prio,
                                      attrs=None if attrs is None else json.loads(attrs)))
            for id_, t, tq, src, type_, v, u, prio, attrs in rows]


def loads(args: argparse.Namespace) -> list[Load]:
    q = args.quick
    win = 2.0 if q else args.budget_s
    warm = 1.0 if q else 5.0
    attr = 0.0 if args.attribute_s <= 0 else (3.0 if q else args.attribute_s)
    out = [
        Load("1x1hz", "1 sensor at 1 Hz", [1.0], win, warm, 0.0 if q else attr),
        Load("20x1hz", "20 sensors at 1 Hz", [1.0] * SENSORS, win, warm, attr),
    ]
    if not q:
        # 10 s of drift spreads the phases over about half a second (25 ms apart, against
        # the 5 ms commit interval).
        out.append(Load("20x1hz-spread", "20 sensors at ~1 Hz, unsynchronised",
                        spread_rates(SENSORS), win, 10.0, attr))
    out.append(Load("1k", "1,000 ev/s", [50.0] * SENSORS, 2.0 if q else args.wamp_s, warm,
                    0.0 if q else min(attr, 10.0)))
    return out


def measure(args: argparse.Namespace, tmp: Path, loop: LoopFs | None) -> list[Row]:
    q = args.quick
    runs = args.runs or (1 if q else 5)
    idle_s = max(args.idle_s, args.soak_s or 0) if not q else 2.0
    interval = 1.0 if q else 10.0
    warmup = 1.0 if q else 5.0
    pki = make_pki(tmp / "pki")
    broker = Mosquitto(tmp / "broker", tls=pki).start()
    out: list[Row] = []
    try:
        pdb = tmp / "platform.db"
        new_gateway(tmp / "nobody", "bench-none", pdb)  # creates the platform's database
        platform = Platform(pdb, broker.port, pki, tmp / "platform.log").wait_ready()
        try:
            if not args.writes_only:
                bare_rss = [import_rss_mb(AGENT_PYTHON[0]) for _ in range(3)]
                starter = Agent(tmp / "start", "bench-start", 1.0, broker, pki, pdb)
                ready, bare = startup(starter, runs)
                print(f"start-up: READY after {[round(x, 3) for x in ready]} s; python -c pass "
                      f"{[round(x, 3) for x in bare]} s", flush=True)
                idler = Agent(tmp / "idle", "bench-idle", 1.0, broker, pki, pdb)
                quiet = idle(idler, warmup, idle_s, interval,
                             first_kb=first_start_peak_kb(idler))
                print(f"idle: CPU {quiet['share_total']:.2%} over {quiet['wall']:.0f} s, peak "
                      f"RSS {quiet['peak_kb'] / 1024:.1f} MB, growth {quiet['growth_kb']} kB",
                      flush=True)
                out += rows(ready, bare, quiet, bare_rss, args)
            budgets: list[Writes] = []
            for load in loads(args):
                state = loop.mnt / load.key / "state" if loop else None
                agent = Agent(tmp / load.key, f"bench-{load.key}", load.rates, broker, pki, pdb,
                              state=state, announce_sql=load.attribute > 0,
                              compression=args.compression, window_ms=args.telemetry_window_ms)
                w = write_budget(agent, load, 2.0 if q else 10.0, loop, pdb)
                print(f"writes, {load.label}: {w.per_event_mean:,.0f} B/event over "
                      f"{w.seconds:.0f} s ({w.accepted} events), {w.per_day / 1e6:,.0f} MB/day; "
                      f"encoded {w.encoded_mean:.1f} B", flush=True)
                budgets.append(w)
        finally:
            platform.stop()
    finally:
        broker.stop()
    out += write_rows(budgets, args.compression, args.telemetry_window_ms)
    for w in budgets:
        if w.traced is not None:
            print_attribution(w)
    return out


def rows(ready: list[float], bare: list[float], quiet: dict[str, Any], bare_rss: list[float],
         args: argparse.Namespace) -> list[Row]:
    r_med, r_spread = summarise(ready)
    b_med, _ = summarise(bare)
    shares = [s * 100 for s in quiet["shares"]]
    _, c_spread = summarise(shares)
    c_val = quiet["share_total"] * 100
    rss = quiet["peak_kb"] / 1024
    base_rss, _ = summarise(bare_rss)
    growth = quiet["growth_kb"] / 1024
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
            note="VmHWM of the agent process, start-up included, started on its store"
                 + (f"; its first start (store made) {quiet['first_kb'] / 1024:.1f} MB"
                    if quiet.get("first_kb") else "")),
        Row(figure=f"memory, RSS growth over {window} idle", value=growth, unit="MB",
            target="no growth (<= 1 MB)", met=growth <= 1.0,
            note="VmRSS end - start; `--soak-s 600` for a 10-minute soak"
                 + (" (this run)" if (args.soak_s or 0) >= 600 else "")),
    ]


def _spread(values: list[float]) -> str:
    return summarise(values)[1] if len(values) > 1 else ""


def write_rows(budgets: list[Writes], compression: str = "none",
               window_ms: float | None = None) -> list[Row]:
    out: list[Row] = []
    window = f"; telemetry window {window_ms:.0f} ms" if window_ms is not None else ""
    for w in budgets:
        load, enc = w.load, w.encoded_mean
        rate = w.accepted / w.seconds
        how = (f"/proc/PID/io write_bytes over {w.seconds:.0f} s, {w.accepted} events "
               f"({rate:,.1f} ev/s); cancelled_write_bytes {w.cancelled:,} B; "
               f"compression {compression}{window}")
        if load.key == "1k":
            med, spread = summarise(w.per_event)
            out.append(Row(
                figure="write amplification at 1k ev/s", value=med, unit="B/event",
                spread=spread, baseline=enc, baseline_what="B encoded event",
                target=f"<= {WAMP_TARGET:.0f}x encoded", met=med <= WAMP_TARGET * enc,
                note=f"bytes written to disk per accepted event, median of "
                     f"{len(w.per_event)} intervals; {how}"))
        else:
            twenty = rate >= 10
            out.append(Row(
                figure=f"bytes written per event, {load.label}", value=w.per_event_mean,
                unit="B/event", spread=_spread(w.per_event), baseline=enc,
                baseline_what="B encoded event",
                target=f"<= {WAMP_TARGET:.0f}x encoded" if twenty else "",
                met=w.per_event_mean <= WAMP_TARGET * enc if twenty else None,
                note=how + "; spread over 10 s intervals"))
        day_target = (WAMP_TARGET * enc * rate * DAY / 1e6 if rate >= 10 and load.key != "1k"
                      else DAY_1HZ_TARGET_MB if rate < 2 else None)
        per_day = w.per_day / 1e6
        raw_day = (w.raw_per_event * rate * DAY / 1e6) if w.raw_per_event else None
        out.append(Row(
            figure=f"bytes written per day, {load.label}", value=per_day, unit="MB/day",
            baseline=raw_day, baseline_what="MB/day raw SQLite" if raw_day else "",
            target=f"<= {day_target:,.0f} MB/day" if day_target else "",
            met=per_day <= day_target if day_target else None,
            note=f"{w.per_day / 2**30:.2f} GiB/day; encoded {enc * rate * DAY / 1e6:,.1f} MB/day"
                 + (f"; raw SQLite: one table (id, body), the same events in commits of "
                    f"{max(1, round(w.raw_group))} (the agent's mean {w.raw_group:.1f}), WAL, "
                    f"synchronous=FULL: {w.raw_per_event:,.0f} B/event"
                    if w.raw_per_event else "")))
        if w.device is not None:
            out.append(Row(
                figure=f"device bytes per event, {load.label}",
                value=w.device / max(1, w.accepted), unit="B/event", baseline=enc,
                baseline_what="B encoded event",
                note=f"what reached the loop device (data, ext4 journal, metadata): "
                     f"{w.device / w.seconds * DAY / 1e6:,.0f} MB/day"))
    return out


def print_attribution(w: Writes) -> None:
    """Where the bytes went while strace followed the process, per file and per cause."""
    a = w.traced
    assert a is not None
    secs, n = a.seconds, max(1, w.traced_accepted)
    total = a.total
    print(f"\nwhere the bytes go, {w.load.label}: strace over {secs:.1f} s, {w.traced_accepted} "
          f"events; write_bytes {w.traced_written:,} B, pages the syscalls dirtied "
          f"{total.page_bytes:,} B ({total.page_bytes / max(1, w.traced_written):.0%} of it; "
          f"not seen: the -shm file, written through mmap)")

    def head(what: str) -> str:
        return (f"  {what:52} {'written B/s':>11} {'pages B/s':>10} {'B/event':>8} "
                f"{'share':>6} {'MB/day':>8} {'fsync/s':>7}")

    def line(name: str, t: Any, extra: str = "") -> str:
        return (f"  {name[:52]:52} {t.syscall_bytes / secs:11,.0f} {t.page_bytes / secs:10,.0f} "
                f"{t.page_bytes / n:8,.0f} {t.page_bytes / max(1, total.page_bytes):6.1%} "
                f"{t.page_bytes / secs * DAY / 1e6:8,.1f} {t.fsyncs / secs:7.2f}{extra}")

    print(head("per file"))
    for name, t in sorted(a.by_file.items(), key=lambda kv: -kv[1].page_bytes):
        print(line(name, t))
    print(head("per cause") + "   txn/s  frames/txn")
    for name, t in sorted(a.by_cause.items(), key=lambda kv: -kv[1].page_bytes):
        frames = a.frames_per_txn.get(name, [])
        extra = (f" {t.txns / secs:7.2f}  {statistics.mean(frames):5.1f}" if frames else "")
        print(line(name, t, extra))
    print(line("total", total))
    print("  WAL frames per transaction, by the table or index of their page (dbstat at the "
          "window's end):")
    for name, per_page in a.frame_pages.items():
        txns = max(1, len(a.frames_per_txn.get(name, [])))
        owners: dict[str, int] = {}
        for page, n in per_page.items():
            owner = "page 1 (header)" if page == 1 else a.owners.get(page, "free page")
            owners[owner] = owners.get(owner, 0) + n
        print(f"    {name}: " + ", ".join(
            f"{o} {n / txns:.2f}" for o, n in sorted(owners.items(), key=lambda kv: -kv[1])))


def tree_state() -> str:
    """The commit measured, and how many files of the agent's code differ from it (the figures
    are of the working tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                  "agent", "drivers"], capture_output=True, text=True,
                                 check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{head}" + (f" + {len(changed)} changed files under agent/, drivers/" if changed
                        else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--soak-s", type=float, default=None, help="idle window of at least S")
    ap.add_argument("--wamp-s", type=float, default=30.0,
                    help="window of the 1,000 events/s write figures")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="window of the write figures at the 1 Hz loads")
    ap.add_argument("--attribute-s", type=float, default=20.0,
                    help="strace after each window, to attribute the bytes (0: none; 10 s at "
                         "most at 1,000 events/s)")
    ap.add_argument("--writes-only", action="store_true",
                    help="only the write figures (no start-up, idle and memory)")
    ap.add_argument("--state-root", type=Path, default=None, metavar="DIR",
                    help="where the temporary directory (state dirs) goes; not tmpfs")
    ap.add_argument("--loop-mib", type=int, default=0, metavar="N",
                    help="as root: state dirs on a fresh N MiB ext4 image, loop-mounted; adds "
                         "the bytes that reached that device")
    ap.add_argument("--compression", choices=("none", "zstd"), default="none",
                    help="[forwarder] compression of the agents of the write figures (a batch "
                    "signed at commit is stored as sent: zstd stores a fifth of the bytes)")
    ap.add_argument("--telemetry-window-ms", type=float, default=None, metavar="MS",
                    help="[outbox] telemetry_window_ms of the agents of the write figures "
                    "(default: the product's, 10000)")
    ap.add_argument("--agent-python", default=sys.executable, metavar="PATH",
                    help="the interpreter that runs the agent, e.g. .venv-dist/bin/python: only "
                         "the packages a gateway installs (make bench builds it), not the "
                         "simulator's (rich), which .venv has")
    args = ap.parse_args()
    AGENT_PYTHON[0] = args.agent_python
    root = state_root(args.state_root)
    print(f"# bench/footprint.py; {machine()}; tree {tree_state()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-footprint-", dir=root) as d:
        tmp = Path(d)
        with contextlib.ExitStack() as stack:
            loop = stack.enter_context(LoopFs(tmp / "ext4.img", args.loop_mib)) \
                if args.loop_mib else None
            where = loop.mnt if loop else tmp
            print(f"# state directories under {where}: {fs_type(where)}", flush=True)
            result = measure(args, tmp, loop)
    print()
    print_table(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
