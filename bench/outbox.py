"""Durable ingest: accepted events/s through the outbox API beside raw sqlite3 in the same run.

    .venv/bin/python bench/outbox.py [--events 100000] [--runs 3] [--quick] [--json PATH]
    taskset -c 0 .venv/bin/python bench/outbox.py          # one core, closer to a Pi

Everything runs in one process on a fresh SQLite file per run (WAL, ``synchronous=FULL``):

* ``append`` path: many concurrent producer tasks, each awaiting ``Outbox.append(event)``
  one event at a time (a driver per sensor); an event counts when its future resolved, i.e.
  after the commit that holds it.
* ``append_many`` path: a few producers awaiting ``Outbox.append_many`` with 100 events each
  (a driver that reads a block, e.g. a Modbus poll or a CoAP SenML pack).
* ``source -> pipeline`` path (issue 8's "durable ingest"): 20 simulated sensors (the synthetic
  driver, unthrottled, 100 readings per hand-over) -> `PipelineSink` (readings become events:
  time quality, rules) -> outbox, exactly as the runtime wires them; a reading counts when its
  sensor's hand-over returned, i.e. after the commit.
* baseline: the same event tuples through a raw ``asyncio.Queue`` into ``sqlite3.executemany``
  in 500-row transactions, same pragmas, same table shape, the body pre-encoded once (so the
  baseline pays neither the wire encoding nor the thread hand-off the outbox pays).

The ratio outbox / raw is the figure; the target is >= 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

from _common import Row, add_common_args, machine, print_table, summarise, write_json

from agent import protocol
from agent.core.clock import make_clock
from agent.core.types import TELEMETRY, Event
from agent.outbox import Outbox
from agent.runtime.pipeline import Pipeline
from agent.runtime.sink import PipelineSink
from drivers.base import SourceContext
from drivers.synthetic import SyntheticConfig, SyntheticSource

TARGET = 0.5
RAW_TXN = 500
MANY_CHUNK = 100
MANY_PRODUCERS = 20


def make_event(i: int, now: float) -> Event:
    return Event(src=f"bench.s{i % 20}", type="temperature", v=20.0 + (i % 100) / 10, t=now,
                 u="Cel", prio=TELEMETRY)


async def raw_baseline(path: Path, n: int) -> float:
    """asyncio.Queue -> executemany, 500 rows per transaction: events/s."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, prio INTEGER NOT NULL, t REAL NOT NULL, "
        "size INTEGER NOT NULL, body BLOB NOT NULL, batch INTEGER)"
    )
    conn.execute("CREATE INDEX events_queue ON events(prio, id) WHERE batch IS NULL")
    now = time.time()
    body = protocol.encode_event(id=1, t=now, tq=0, src="bench.s1", type="temperature",
                                 v=21.5, prio=TELEMETRY, u="Cel")
    queue: asyncio.Queue[tuple[int, int, float, int, bytes] | None] = asyncio.Queue()

    async def producer() -> None:
        for i in range(1, n + 1):
            await queue.put((i, TELEMETRY, now, len(body), body))
        await queue.put(None)

    async def consumer() -> None:
        done = False
        while not done:
            rows = [await queue.get()]
            while len(rows) < RAW_TXN and not queue.empty():
                rows.append(queue.get_nowait())
            if rows[-1] is None:
                rows.pop()
                done = True
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO events(id, prio, t, size, body) VALUES (?,?,?,?,?)",
                             [r for r in rows if r is not None])
            conn.execute("COMMIT")

    start = time.perf_counter()
    await asyncio.gather(producer(), consumer())
    took = time.perf_counter() - start
    count = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    conn.close()
    assert count == n, (count, n)
    return n / took


async def outbox_append(path: Path, n: int, producers: int) -> float:
    """`producers` tasks, each awaiting append() one event at a time: accepted events/s."""
    ob = await Outbox.open(path, quota_bytes=1 << 40)
    per = n // producers
    now = time.time()

    async def producer(p: int) -> None:
        for i in range(per):
            await ob.append(make_event(p * per + i, now))

    start = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as tg:
            for p in range(producers):
                tg.create_task(producer(p))
        took = time.perf_counter() - start
        stats = await ob.stats()
    finally:
        await ob.close()
    assert stats.unclaimed == per * producers
    return per * producers / took


async def outbox_append_many(path: Path, n: int) -> float:
    """MANY_PRODUCERS tasks awaiting append_many() with MANY_CHUNK events: accepted events/s."""
    ob = await Outbox.open(path, quota_bytes=1 << 40)
    chunks = n // MANY_CHUNK // MANY_PRODUCERS
    now = time.time()

    async def producer(p: int) -> None:
        for c in range(chunks):
            base = (p * chunks + c) * MANY_CHUNK
            await ob.append_many([make_event(base + i, now) for i in range(MANY_CHUNK)])

    start = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as tg:
            for p in range(MANY_PRODUCERS):
                tg.create_task(producer(p))
        took = time.perf_counter() - start
        stats = await ob.stats()
    finally:
        await ob.close()
    total = chunks * MANY_CHUNK * MANY_PRODUCERS
    assert stats.unclaimed == total
    return total / took


async def pipeline_ingest(path: Path, n: int) -> float:
    """MANY_PRODUCERS synthetic sensors -> PipelineSink -> outbox: accepted readings/s."""
    ob = await Outbox.open(path, quota_bytes=1 << 40)
    clock = make_clock("synced")
    sink = PipelineSink(Pipeline(wall=clock.time, synchronized=clock.synchronized), ob,
                        clock.monotonic)
    per = n // MANY_PRODUCERS
    ctx = SourceContext(clock=clock)
    sources = [SyntheticSource(SyntheticConfig(name=f"s{i:02d}", rate_hz=100_000,
                                               batch=MANY_CHUNK, count=per, unit="Cel"), ctx)
               for i in range(MANY_PRODUCERS)]
    start = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as tg:
            for src in sources:
                tg.create_task(src.run(sink))
        took = time.perf_counter() - start
        stats = await ob.stats()
    finally:
        await ob.close()
    total = per * MANY_PRODUCERS
    assert stats.unclaimed == total == sink.accepted, (stats.unclaimed, total, sink.accepted)
    return total / took


async def measure(n: int, runs: int, producers: int, tmp: Path) -> list[Row]:
    raw: list[float] = []
    one: list[float] = []
    many: list[float] = []
    piped: list[float] = []
    # Warm-up, not counted: the first runs of a process pay imports, the page cache and the
    # allocator's growth, and would count against whichever path ran first.
    await raw_baseline(tmp / "warm-raw.db", n // 10)
    await outbox_append_many(tmp / "warm-many.db", n // 10)
    for r in range(runs):
        # Interleaved, so that a slow phase of the machine hits all three alike.
        raw.append(await raw_baseline(tmp / f"raw{r}.db", n))
        one.append(await outbox_append(tmp / f"one{r}.db", n, producers))
        many.append(await outbox_append_many(tmp / f"many{r}.db", n))
        piped.append(await pipeline_ingest(tmp / f"pipe{r}.db", n))
    raw_med, raw_spread = summarise(raw)
    rows = []
    paths = (
        (f"durable ingest, append x{producers} producers", one,
         f"raw baseline spread {raw_spread}" if raw_spread else ""),
        ("durable ingest, append_many(100)", many, ""),
        ("durable ingest, sensors -> pipeline", piped,
         f"{MANY_PRODUCERS} synthetic sensors, {MANY_CHUNK} readings per hand-over, PipelineSink"),
    )
    for label, values, note in paths:
        med, spread = summarise(values)
        rows.append(Row(figure=label, value=med, unit="ev/s", spread=spread, baseline=raw_med,
                        baseline_what="raw", target=f">= {TARGET} x raw",
                        met=med / raw_med >= TARGET, note=note))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--producers", type=int, default=1000)
    args = ap.parse_args()
    n = 2_000 if args.quick else args.events
    producers = 50 if args.quick else args.producers
    runs = args.runs or (1 if args.quick else 5)
    print(f"# bench/outbox.py: {n} events per run, {runs} run(s); {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as d:
        rows = asyncio.run(measure(n, runs, producers, Path(d)))
    print_table(rows)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
