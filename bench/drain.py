"""Backlog drain, alarm latency under load and RSS while draining, from one drain per run.

    .venv/bin/python bench/drain.py [--events 1000000] [--runs 1] [--every 0.1]
                                    [--idle-alarms 100] [--quick] [--json PATH]
    taskset -c 0 .venv/bin/python bench/drain.py          # everything on one core

Per run, on a fresh real mosquitto (mutual TLS, persistence on with mosquitto's default save
schedule) and a fresh reference platform
(`branch-platform serve --no-coap` as a subprocess: verify, chain check, SQLite WAL FULL, ack):

* idle alarms (baseline): the agent (bench/_drain_agent.py: a real `Runtime` from a production
  config, GPIO on the simulator's pin factory) starts with an empty outbox; the simulator's
  thread toggles a vault contact (ALARM) `--idle-alarms` times.
* backlog drain: the outbox already holds `--events` events (filled once with `append_many`
  before any clock starts, then copied per run); the uplink is up when the agent starts, the
  drain rate limit is off (the default). Time from `Runtime.run` (it includes opening the
  outbox and the TLS connect) to an empty outbox. Meanwhile the contact toggles every `--every`
  seconds: alarm latency under load. The agent's peak RSS (VmHWM) is the draining memory figure.
* raw baseline: a bare paho client publishes the same number of signed batches of the same size
  (QoS 1, 8 in flight, same TLS) to a topic nobody reads; the clock stops at the last PUBACK.

Alarm latency = the platform's `received_at` for the batch that holds the alarm (stamped in its
store transaction, after verification) minus the wall time the simulator moved the pin. The
contact has `debounce_ms = 0`: a configured debounce adds its own fixed delay on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import Row, add_common_args, machine, print_table, summarise, write_json
from _drain_agent import vault_input
from _rig import Platform, agent_doc, import_rss_mb, new_gateway
from forward import BATCH, GW, events_for, raw_publish, sample_batches

from agent.core.log import configure_logging
from agent.outbox import Outbox
from agent.protocol import decode_batch
from agent.security.keys import load_private_key
from tests.support.agentproc import to_toml
from tests.support.broker import Mosquitto
from tests.support.pki import Pki, make_pki

HERE = Path(__file__).resolve().parent
DRAIN_TARGET_S = 60.0
LATENCY_TARGET_MS = 50.0
RSS_TARGET_MB = 80.0
# A day of a busy branch does not fit the default 256 MiB quota at 1M events of this size on
# every file system; the drain is about time, not eviction, so the quota is set out of the way.
QUOTA = 2 << 30
CHUNK = 5000


async def fill(path: Path, n: int) -> None:
    """n telemetry events into a fresh outbox, as fast as append_many takes them."""
    ob = await Outbox.open(path, quota_bytes=QUOTA)
    try:
        now = time.time()
        for i in range(0, n, CHUNK):
            await ob.append_many(events_for(min(CHUNK, n - i), now))
    finally:
        await ob.close()


@dataclass(frozen=True)
class AgentResult:
    """What bench/_drain_agent.py wrote."""

    edges: list[float]
    drain_s: float
    drained_wall: float
    peak_rss_kb: int
    events_acked: int


def run_agent(work: Path, gw: str, key: Path, broker: Mosquitto, pki: Pki, *,
              backlog: int, every: float, alarms: int) -> AgentResult:
    """The agent process (bench/_drain_agent.py) until its outbox is empty; its result."""
    doc = agent_doc(gw, work / "state", key, broker.port, pki,
                    outbox={"quota_bytes": QUOTA},
                    sources={"gpio": {"inputs": [
                        vault_input().driver_config().model_dump(mode="json", exclude_none=True)]}})
    cfg = work / "agent.toml"
    cfg.write_text(to_toml(doc))
    out = work / "result.json"
    cmd = [sys.executable, str(HERE / "_drain_agent.py"), str(cfg), str(out),
           "--backlog", str(backlog), "--every", str(every), "--alarms", str(alarms)]
    with (work / "agent.log").open("wb") as log:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              timeout=900, check=False)
    if proc.returncode != 0 or not out.exists():
        tail = (work / "agent.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"agent exited {proc.returncode}:\n{tail}")
    return AgentResult(**json.loads(out.read_text()))


def latencies_ms(platform_db: Path, gw: str, edges: list[float], before: float,
                 split: list[tuple[float, float]] | None = None) -> list[float]:
    """Edge -> stored at the platform, for each toggle of the vault contact before `before`.
    `split` gets, per alarm, (edge -> signed at the agent, signed -> stored at the platform):
    the batch's `created` is the agent's wall clock when it signed the batch."""
    conn = sqlite3.connect(f"file:{platform_db}?mode=ro", uri=True)
    try:
        stored = [(r[0], bytes(r[1])) for r in conn.execute(
            "SELECT b.received_at, b.raw FROM events e JOIN batches b ON b.gw = e.gw "
            "AND b.epoch = e.epoch AND b.lane = e.lane AND b.seq = e.seq "
            "WHERE e.gw = ? AND e.src = 'gpio.vault' AND e.attrs IS NULL ORDER BY e.id", (gw,))]
    finally:
        conn.close()
    if len(stored) != len(edges):
        raise RuntimeError(f"{len(edges)} edges but {len(stored)} alarms at the platform")
    out = []
    for (at, raw), edge in zip(stored, edges, strict=True):
        if edge >= before:
            continue
        out.append((at - edge) * 1000)
        if split is not None:
            signed = decode_batch(raw)[0].created
            split.append(((signed - edge) * 1000, (at - signed) * 1000))
    return out


def print_split(what: str, split: list[tuple[float, float]]) -> None:
    """Where an alarm's time went: at the agent (edge -> signed) and after it."""
    if not split:
        return
    agent_part, wire_part = [s[0] for s in split], [s[1] for s in split]
    total = sorted(a + w for a, w in split)
    print(f"  alarms {what}: p50/p99 edge -> signed (agent) {pct(agent_part, 50):.1f}/"
          f"{pct(agent_part, 99):.1f} ms, signed -> stored (uplink, broker, platform) "
          f"{pct(wire_part, 50):.1f}/{pct(wire_part, 99):.1f} ms; slowest "
          f"{', '.join(f'{x:.1f}' for x in total[-3:])} ms", flush=True)


def platform_events(platform_db: Path) -> int:
    conn = sqlite3.connect(f"file:{platform_db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank: a value that was measured)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def measure(n: int, runs: int, every: float, idle_alarms: int, tmp: Path) -> list[Row]:
    pki = make_pki(tmp / "pki")
    template = tmp / "template"
    template.mkdir()
    t0 = time.perf_counter()
    asyncio.run(fill(template / "outbox.db", n))
    print(f"filled {n:,} events in {time.perf_counter() - t0:.1f} s "
          f"({(template / 'outbox.db').stat().st_size / 1e6:.0f} MB)", flush=True)
    drains: list[float] = []
    raws: list[float] = []
    rss_mb: list[float] = []
    loaded: list[float] = []
    idle: list[float] = []
    batches: list[bytes] = []
    for r in range(runs):
        work = tmp / f"run{r}"
        for phase in ("idle", "drain"):
            (work / phase).mkdir(parents=True)
        # mosquitto's own save schedule, not the tests' 1 s: its save fsyncs the persistence
        # file and stalls every delivery for as long, 100 ms and more under a drain's disk load
        # (bench/README.md, alarm latency under load).
        broker = Mosquitto(work / "broker", tls=pki, autosave_s=None).start()
        try:
            # Baseline: alarms with an empty outbox.
            pdb = work / "idle" / "platform.db"
            key = new_gateway(work / "idle" / "keys", "bench-idle", pdb)
            platform = Platform(pdb, broker.port, pki, work / "idle" / "platform.log").wait_ready()
            try:
                res = run_agent(work / "idle", "bench-idle", key, broker, pki, backlog=0,
                                every=every, alarms=idle_alarms)
            finally:
                platform.stop()
            idle_split: list[tuple[float, float]] = []
            idle += latencies_ms(pdb, "bench-idle", res.edges, float("inf"), idle_split)
            print_split("idle", idle_split)

            # The drain: raw paho first, then the agent, on the same broker and platform.
            pdb = work / "drain" / "platform.db"
            key = new_gateway(work / "drain" / "keys", GW, pdb)
            if not batches:
                batches = sample_batches(n, load_private_key(key))
            shutil.copytree(template, work / "drain" / "state")
            platform = Platform(pdb, broker.port, pki, work / "drain" / "platform.log")
            platform.wait_ready()
            try:
                raws.append(len(batches) * BATCH / raw_publish(batches, broker, pki))
                res = run_agent(work / "drain", GW, key, broker, pki, backlog=n,
                                every=every, alarms=0)
            finally:
                platform.stop()
            drains.append(res.drain_s)
            rss_mb.append(res.peak_rss_kb / 1024)
            split: list[tuple[float, float]] = []
            lat = latencies_ms(pdb, GW, res.edges, res.drained_wall - 0.1, split)
            loaded += lat
            got = platform_events(pdb)
            if got < n:
                raise RuntimeError(f"platform holds {got} of {n} events")
            print(f"run {r + 1}: drain {drains[-1]:.1f} s ({n / drains[-1]:,.0f} ev/s), raw paho "
                  f"{raws[-1]:.1f} s, peak RSS {rss_mb[-1]:.1f} MB, {len(lat)} alarms under "
                  f"load p99 {pct(lat, 99) if lat else float('nan'):.1f} ms", flush=True)
            print_split("under load", split)
        finally:
            broker.stop()
    return rows(n, drains, raws, rss_mb, loaded, idle, import_rss_mb())


def rows(n: int, drains: list[float], raws: list[float], rss_mb: list[float],
         loaded: list[float], idle: list[float], base_rss: float) -> list[Row]:
    med, spread = summarise(drains)
    raw_med, _ = summarise(raws)
    rss, rss_spread = summarise(rss_mb)
    idle_p99 = pct(idle, 99)
    out = [
        Row(figure=f"backlog drain, {n:,} events", value=med, unit="s", spread=spread,
            baseline=raw_med, baseline_what="s raw paho", target=f"< {DRAIN_TARGET_S:.0f} s",
            met=med < DRAIN_TARGET_S, note=f"{n / med:,.0f} ev/s; drain rate limit off"),
        Row(figure="memory, peak RSS draining", value=rss, unit="MB", spread=rss_spread,
            baseline=base_rss, baseline_what="MB import agent",
            target=f"<= {RSS_TARGET_MB:.0f} MB", met=rss <= RSS_TARGET_MB,
            note="VmHWM of the agent process (GPIO on the simulator's pins in it)"),
    ]
    if not loaded:
        raise RuntimeError("no alarm fell inside the drain: give more --events")
    p50, p99 = pct(loaded, 50), pct(loaded, 99)
    return [
        *out,
        Row(figure="alarm latency under load, p50", value=p50, unit="ms",
            spread=f"{min(loaded):.1f}..{max(loaded):.1f}", baseline=pct(idle, 50),
            baseline_what="ms idle p50", note=f"{len(loaded)} alarms while draining"),
        Row(figure="alarm latency under load, p99", value=p99, unit="ms",
            baseline=idle_p99, baseline_what="ms idle p99",
            target=f"<= {LATENCY_TARGET_MS:.0f} ms, <= 2x idle",
            met=p99 <= LATENCY_TARGET_MS and p99 <= 2 * idle_p99,
            note=f"idle: {len(idle)} alarms, median {statistics.median(idle):.1f} ms; "
                 "GPIO edge -> platform stored, debounce 0"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--events", type=int, default=1_000_000)
    # 10 edges a second: some 170 alarms per 1M drain, so that a p99 is not just the slowest
    # of 60 (as with 0.25 s); 100 idle alarms for the same reason.
    ap.add_argument("--every", type=float, default=0.1, help="seconds between alarm edges")
    ap.add_argument("--idle-alarms", type=int, default=100)
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="keep each run's logs and stores under DIR (default: removed)")
    args = ap.parse_args()
    n = 20 * BATCH if args.quick else max(BATCH, args.events // BATCH * BATCH)
    every = 0.05 if args.quick else args.every
    idle_alarms = 4 if args.quick else args.idle_alarms
    runs = args.runs or 1
    configure_logging("warning")
    print(f"# bench/drain.py: {n:,} events, {runs} run(s); {machine()}", flush=True)
    if args.keep is not None:  # the logs and stores stay for a look afterwards
        args.keep.mkdir(parents=True, exist_ok=True)
        result = measure(n, runs, every, idle_alarms, Path(tempfile.mkdtemp(dir=args.keep)))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-drain-") as d:
            result = measure(n, runs, every, idle_alarms, Path(d))
    print_table(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
