"""The outbox keeps its promise: accepted means committed, ids never reused, nothing lost."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cbor2
import pytest

from agent import protocol
from agent.core.errors import RefusedError
from agent.core.types import Event
from agent.outbox import SCHEMA_VERSION, OsStorage, Outbox, id_ranges
from agent.outbox.db import DbThread
from agent.outbox.diskfull import RECHECK_INTERVAL

WORKER = Path(__file__).parent / "support" / "outbox_worker.py"
sys.path.insert(0, str(WORKER.parent))
from outbox_worker import build  # noqa: E402 - the worker is a script, imported for its signer


def ev(v: object = 1.0, prio: int = 2, src: str = "s") -> Event:
    return Event(src=src, type="t", v=v, t=time.time(), prio=prio)  # type: ignore[arg-type]


def rows(db: Path) -> list[tuple[int, int, int | None]]:
    with sqlite3.connect(db) as c:
        return [(int(a), int(b), c_) for a, b, c_ in
                c.execute("SELECT id, prio, batch FROM events ORDER BY id")]


async def test_ids_increase_and_survive_reopen_and_deletes(tmp_path: Path) -> None:
    """Ids are strictly increasing and never reused, across deletes (acks) and restarts."""
    db = tmp_path / "outbox.db"
    ob = await Outbox.open(db)
    first = await ob.append_many([ev() for _ in range(10)])
    assert first == list(range(1, 11))
    b = await ob.claim_batch(100, 1 << 20, build)
    assert b is not None and b.count == 10
    assert await ob.ack_batch(b.seq, b.hash)
    await ob.close()
    ob = await Outbox.open(db)
    again = await ob.append_many([ev() for _ in range(3)])
    assert again == [11, 12, 13]
    b2 = await ob.claim_batch(100, 1 << 20, build)
    assert b2 is not None and b2.seq == 2
    assert protocol.decode_batch(b2.data)[0].prev == b.hash  # the chain continues
    await ob.close()


async def test_claim_orders_alarms_first_and_ack_needs_matching_hash(tmp_path: Path) -> None:
    """A batch takes alarms first; an ack with the wrong hash deletes nothing."""
    ob = await Outbox.open(tmp_path / "o.db")
    await ob.append_many([ev(prio=3), ev(prio=2), ev(prio=0), ev(prio=1)])
    b = await ob.claim_batch(2, 1 << 20, build)
    assert b is not None
    events = protocol.decode_batch(b.data)[0].events
    assert [(e["id"], e["prio"]) for e in events] == [(3, 0), (4, 1)]
    assert not await ob.ack_batch(b.seq, bytes(32))
    assert len(rows(tmp_path / "o.db")) == 4
    assert await ob.ack_batch(b.seq, b.hash)
    assert [r[0] for r in rows(tmp_path / "o.db")] == [1, 2]
    await ob.close()


async def test_batch_respects_byte_limit(tmp_path: Path) -> None:
    """A batch stays within max_bytes, but always carries at least one event."""
    ob = await Outbox.open(tmp_path / "o.db")
    await ob.append_many([ev(v="x" * 300) for _ in range(10)])
    b = await ob.claim_batch(100, 1300, build)
    assert b is not None and b.count == 3 and len(b.data) <= 1300
    b = await ob.claim_batch(100, 10, build)
    assert b is not None and b.count == 1
    await ob.close()


async def test_group_commit_shares_transactions(tmp_path: Path) -> None:
    """Concurrent producers are committed together: far fewer transactions than appends."""
    ob = await Outbox.open(tmp_path / "o.db", commit_interval=0.01)
    commits = 0

    def count() -> None:
        nonlocal commits
        commits += 1

    ob.on_commit(count)
    ids = await asyncio.gather(*(ob.append(ev()) for _ in range(200)))
    assert sorted(ids) == list(range(1, 201))
    assert commits < 20
    await ob.close()


async def test_alarm_commits_without_waiting_for_the_window(tmp_path: Path) -> None:
    """An alarm is committed at once even with a long group-commit window."""
    ob = await Outbox.open(tmp_path / "o.db", commit_interval=30.0)
    slow = asyncio.ensure_future(ob.append(ev(prio=2)))
    await asyncio.wait_for(ob.append(ev(prio=0)), timeout=5)  # would take 30 s if it waited
    assert slow.done()  # it rode along in the alarm's transaction
    await ob.close()


async def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    """Closing (SIGTERM) commits the queued appends before the file is closed."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=30.0)
    pending = [asyncio.ensure_future(ob.append(ev())) for _ in range(5)]
    await asyncio.sleep(0)
    await ob.close()
    assert sorted([await p for p in pending]) == [1, 2, 3, 4, 5]
    assert len(rows(db)) == 5


async def test_quota_evicts_low_priority_oldest_first_and_records_every_id(
    tmp_path: Path,
) -> None:
    """Past the quota, diagnostics go first, then telemetry, each oldest first; alarms and
    alerts are never evicted; drop records name every evicted id. The diagnostics are the
    newest events, so an eviction by age alone (ignoring priorities) would take the older
    telemetry first, and fail here."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, quota_bytes=64 * 1024, commit_interval=0)
    accepted: dict[int, int] = {}

    async def add(n: int, prio: int) -> None:
        for i in range(n):
            [eid] = await ob.append_many([ev(v=f"{i:040d}", prio=prio)])
            accepted[eid] = prio

    async def evicted_of(prio: int) -> list[int]:
        stored = {r[0] for r in rows(db)}
        return sorted(i for i, p in accepted.items() if p == prio and i not in stored)

    # about 132 bytes each against the quota (encoded event + row overhead)
    await add(150, 2)  # the oldest: telemetry,
    await add(30, 1)   # alerts,
    await add(200, 3)  # then diagnostics, the newest: about 50 KB so far
    await add(150, 0)  # alarms push past the 64 KB quota
    assert await evicted_of(3), "the quota was passed: something must have been evicted"
    assert await evicted_of(2) == [], "telemetry was evicted while diagnostics remained"
    await add(200, 0)  # far past it: the diagnostics are gone, telemetry goes oldest first
    ev3, ev2 = await evicted_of(3), await evicted_of(2)
    assert len(ev3) == 200 and 0 < len(ev2) < 150
    assert ev2 == sorted(i for i, p in accepted.items() if p == 2)[:len(ev2)]
    assert await evicted_of(0) == [] and await evicted_of(1) == []
    st = await ob.stats()
    assert st.bytes <= 64 * 1024
    evicted = set(ev3) | set(ev2)
    # the drop records account for every evicted id, exactly once
    with sqlite3.connect(db) as c:
        bodies = [bytes(b) for (b,) in c.execute("SELECT body FROM events")]
    named: list[int] = []
    for body in bodies:
        e = cbor2.loads(body)
        if e["type"] == "gateway.dropped":
            assert e["prio"] == 1 and e["v"]["reason"] == "quota"
            for a, b in e["v"]["ids"]:
                named.extend(range(a, b + 1))
            assert e["v"]["count"] == sum(b - a + 1 for a, b in e["v"]["ids"])
    assert sorted(named) == sorted(evicted)
    assert st.dropped["quota"] == len(evicted)
    await ob.close()


async def test_quota_refuses_lower_priority_rather_than_evict_more_urgent(
    tmp_path: Path,
) -> None:
    """When only alarms fill the quota, telemetry is refused (RefusedError); alarms and alerts
    are still accepted."""
    ob = await Outbox.open(tmp_path / "o.db", quota_bytes=64 * 1024, commit_interval=0)
    for i in range(800):
        await ob.append(ev(v=f"{i:060d}", prio=0))
    with pytest.raises(RefusedError) as info:
        await ob.append(ev(prio=3))
    assert info.value.priority == 3
    assert await ob.append(ev(prio=0)) > 800
    assert await ob.append(ev(prio=1)) > 801
    assert (await ob.stats()).refused == 1
    await ob.close()


async def test_corrupt_store_is_quarantined_and_reset_recorded(tmp_path: Path) -> None:
    """Garbage in the pages: the file is renamed aside, a fresh store starts, ids continue
    above anything used before, and a gateway.store_reset alert is recorded."""
    db = tmp_path / "outbox.db"
    ob = await Outbox.open(db)
    await ob.append_many([ev(v="y" * 200) for _ in range(500)])
    await ob.close()
    size = db.stat().st_size
    with db.open("r+b") as f:  # garbage over the b-tree pages, past the header page
        rng = random.Random(7)
        for off in range(4096, size, 4096):
            f.seek(off)
            f.write(rng.randbytes(512))
    ob = await Outbox.open(db)
    assert ob.reset_info is not None
    quarantined = Path(ob.reset_info["quarantined"])
    assert quarantined.exists() and quarantined.name.startswith("outbox.db.corrupt-")
    b = await ob.claim_batch(10, 1 << 20, build)
    assert b is not None
    [reset] = protocol.decode_batch(b.data)[0].events
    assert reset["type"] == "gateway.store_reset" and reset["prio"] == 1
    assert reset["id"] > 500  # never reuses an id the platform may already hold
    await ob.close()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_id_ranges() -> None:
    """Drop records name ids compactly as inclusive ranges."""
    assert id_ranges([9, 1, 2, 3, 7, 10]) == [[1, 3], [7, 7], [9, 10]]
    assert id_ranges([]) == []


def _read_lines(p: subprocess.Popen[bytes], buf: bytearray, until: float) -> list[str]:
    """Complete lines available on p.stdout before `until` (monotonic)."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    lines: list[str] = []
    while time.monotonic() < until:
        r, _, _ = select.select([fd], [], [], max(0.0, until - time.monotonic()))
        if not r:
            break
        chunk = __import__("os").read(fd, 65536)
        if not chunk:
            break
        buf.extend(chunk)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            lines.append(line.decode())
        if lines:
            return lines
    return lines


def test_sigkill_never_loses_an_accepted_event(tmp_path: Path, procs: list) -> None:  # type: ignore[type-arg]
    """A writer appending as fast as it can is SIGKILLed at 20 random moments; every id it was
    told was accepted is in the store, ids are unique and increasing, integrity holds."""
    db = tmp_path / "outbox.db"
    rng = random.Random(2026)
    all_reported: set[int] = set()
    previous_max = 0
    for round_ in range(20):
        p = subprocess.Popen(
            [sys.executable, str(WORKER), "append", str(db), str(round_)],
            stdout=subprocess.PIPE,
        )
        procs.append(p)
        target = rng.randint(1, 400)  # appends to see before the kill: a different moment each
        buf = bytearray()
        reported: list[int] = []
        seen = 0
        deadline = time.monotonic() + 60
        while seen < target and time.monotonic() < deadline:
            for line in _read_lines(p, buf, deadline):
                seen += 1
                reported.extend(int(x) for x in line.split()[1:])
        assert seen >= target, "the writer stopped reporting"
        p.kill()
        p.wait(timeout=10)
        # lines flushed before the kill are promises too
        assert p.stdout is not None
        rest = p.stdout.read()
        buf.extend(rest)
        for line in bytes(buf).split(b"\n")[:-1]:
            reported.extend(int(x) for x in line.decode().split()[1:])
        with sqlite3.connect(db) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {int(i) for (i,) in c.execute("SELECT id FROM events")}
            next_id = int(c.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()[0])
        missing = set(reported) - stored
        assert not missing, f"round {round_}: accepted ids lost: {sorted(missing)[:10]}"
        assert len(reported) == len(set(reported)), "an id was handed out twice"
        assert not (set(reported) & all_reported), "an id was reused across restarts"
        assert min(reported) > previous_max, "ids must increase across restarts"
        assert next_id > max(stored)
        all_reported |= set(reported)
        previous_max = max(stored)
    assert all_reported <= stored_ids(db)


def stored_ids(db: Path) -> set[int]:
    with sqlite3.connect(db) as c:
        return {int(i) for (i,) in c.execute("SELECT id FROM events")}


def test_kill_between_claim_and_ack_reoffers_exactly_the_unacked(
    tmp_path: Path, procs: list  # type: ignore[type-arg]
) -> None:
    """Killed after three claims and one ack: the two unacked batches come back byte for byte,
    holding exactly their events; the acked batch's events are gone; the rest stays unclaimed."""
    db = tmp_path / "outbox.db"
    p = subprocess.Popen([sys.executable, str(WORKER), "claim", str(db), "500"],
                         stdout=subprocess.PIPE)
    procs.append(p)
    buf = bytearray()
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while not any(line.startswith("K ") for line in lines) and time.monotonic() < deadline:
        lines += _read_lines(p, buf, deadline)
    p.kill()
    p.wait(timeout=10)
    claims = [line.split() for line in lines if line.startswith("C ")]
    assert len(claims) == 3
    batch_ids = {int(c[1]): [int(x) for x in c[3:]] for c in claims}
    hashes = {int(c[1]): bytes.fromhex(c[2]) for c in claims}

    async def check() -> None:
        ob = await Outbox.open(db)
        pending = await ob.pending_batches()
        assert [b.seq for b in pending] == [2, 3]
        for b in pending:
            assert b.hash == hashes[b.seq] == protocol.batch_hash(b.data)
            got = [e["id"] for e in protocol.decode_batch(b.data)[0].events]
            assert got == batch_ids[b.seq]
        held = {r[0]: r[2] for r in rows(db)}
        assert not set(batch_ids[1]) & set(held), "acked events must be gone"
        for seq in (2, 3):
            assert all(held[i] == seq for i in batch_ids[seq])
        unclaimed = [i for i, b in held.items() if b is None]
        assert len(unclaimed) == 200
        nxt = await ob.claim_batch(1000, 1 << 22, build)
        assert nxt is not None and nxt.seq == 4 and nxt.count == 200
        await ob.close()

    asyncio.run(check())


async def test_stats_counters_match_the_table(tmp_path: Path) -> None:
    """The in-memory figures of stats() (kept so it never scans the table) agree with the
    table after appends, claims, acks, evictions and a reopen."""
    db = tmp_path / "o.db"

    def table_depth() -> dict[int, int]:
        with sqlite3.connect(db) as c:
            return {int(p): int(n) for p, n in
                    c.execute("SELECT prio, COUNT(*) FROM events GROUP BY prio")}

    ob = await Outbox.open(db, quota_bytes=64 * 1024, commit_interval=0)
    refused = 0
    for i in range(900):
        try:
            await ob.append(ev(v=f"{i:040d}", prio=(3, 2, 1, 0)[i % 4]))
        except RefusedError:
            refused += 1
    assert (await ob.stats()).dropped.get("quota"), "the quota must have evicted something"
    b1 = await ob.claim_batch(50, 1 << 20, build)
    b2 = await ob.claim_batch(50, 1 << 20, build)
    assert b1 is not None and b2 is not None
    assert await ob.ack_batch(b1.seq, b1.hash)
    st = await ob.stats()
    assert st.depth == table_depth()
    assert st.in_flight_batches == 1
    with sqlite3.connect(db) as c:
        assert st.unclaimed == c.execute(
            "SELECT COUNT(*) FROM events WHERE batch IS NULL").fetchone()[0]
    await ob.close()
    ob = await Outbox.open(db, quota_bytes=64 * 1024)
    again = await ob.stats()
    assert (again.depth, again.unclaimed, again.in_flight_batches) == (
        st.depth, st.unclaimed, st.in_flight_batches)
    await ob.close()


async def test_keyed_append_is_idempotent_across_a_restart(tmp_path: Path) -> None:
    """An append under a key already committed (a CoAP retransmission reaching a restarted
    agent) stores nothing new and answers with the first commit's ids; other keys commit."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db)
    first = await ob.append_many([ev(1), ev(2)], key="coap:atm1:10.0.0.5:4711:ab")
    await ob.close()
    ob = await Outbox.open(db)
    again = await ob.append_many([ev(1), ev(2)], key="coap:atm1:10.0.0.5:4711:ab")
    other = await ob.append_many([ev(3)], key="coap:atm1:10.0.0.5:4712:ac")
    assert again == first
    assert other == [first[-1] + 1]
    assert [r[0] for r in rows(db)] == [*first, *other]
    await ob.close()


async def test_store_reset_alert_carries_the_clocks_time_quality(tmp_path: Path) -> None:
    """The outbox's own alert of a quarantined store says what the clock was: tq 1 when it is
    not synchronised (a Pi without RTC at boot), not a hard-coded 0 (CR 2.11).

    Mutation: `tq=TQ_SYNCED` back in `Outbox._open_sync`: this test fails."""
    db = tmp_path / "outbox.db"
    db.write_bytes(b"\xff" * 8192)  # not a database: quarantined at open
    ob = await Outbox.open(db, clock_synchronized=lambda: False)
    try:
        assert ob.reset_info is not None
        b = await ob.claim_batch(10, 1 << 20, build)
        assert b is not None
        [reset] = protocol.decode_batch(b.data)[0].events
        assert (reset["type"], reset["tq"]) == ("gateway.store_reset", 1)
    finally:
        await ob.close()


async def test_v1_store_is_migrated(tmp_path: Path) -> None:
    """A store written with schema 1 opens under schema 5 with its events intact; its chain,
    begun before epochs, goes on without one (epoch '': batches without the key)."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db)
    ids = await ob.append_many([ev(i) for i in range(5)])
    await ob.close()
    with sqlite3.connect(db) as c:  # make it a v1 file again
        c.execute("DROP TABLE ingest_keys")
        c.execute("DROP TABLE refused")
        c.execute("ALTER TABLE batches DROP COLUMN held")
        c.execute("DELETE FROM meta WHERE key IN ('epoch', 'alarm_next_seq', 'alarm_prev_hash')")
        c.execute("PRAGMA user_version=1")
    ob = await Outbox.open(db)
    assert [r[0] for r in rows(db)] == ids
    assert await ob.append_many([ev(9)], key="k") == [ids[-1] + 1]
    b = await ob.claim_batch(100, 1 << 20, build)
    assert b is not None and protocol.decode_batch(b.data)[0].epoch == b""
    assert (await ob.stats()).epoch == ""
    await ob.close()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5


class FillableDisk(OsStorage):
    """The real filesystem until `fill()`: from then on the store may not grow by one page
    (SQLite's max_page_count, so a commit that needs space fails with SQLITE_FULL, as on a full
    disk) and no reserve can be allocated; the space `release` gives back goes to the store.
    `empty()` frees the disk again."""

    PAGE = 4096

    def __init__(self) -> None:
        self.full = False
        self._conn: sqlite3.Connection | None = None

    def connect(self, path: Path) -> sqlite3.Connection:
        # Not check_same_thread: fill() and empty() set the limit from the test's thread, while
        # the outbox's database thread is idle.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        return self._conn

    def _limit(self, pages: int) -> None:
        assert self._conn is not None
        self._conn.execute(f"PRAGMA max_page_count={pages}")

    def fill(self) -> None:
        self.full = True
        self._limit(1)  # SQLite keeps the limit at the store's size: not one page more

    def empty(self) -> None:
        self.full = False
        self._limit(1 << 30)

    def preallocate(self, path: Path, size: int) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        super().preallocate(path, size)

    def release(self, path: Path) -> None:
        freed = path.stat().st_size if path.exists() else 0
        super().release(path)
        if self.full and freed:
            assert self._conn is not None
            limit = int(self._conn.execute("PRAGMA max_page_count").fetchone()[0])
            self._limit(limit + freed // self.PAGE)


async def test_full_disk_releases_the_reserve_and_keeps_alarms(tmp_path: Path) -> None:
    """On a full disk (a fake one behind the storage seam: no root needed) the reserve is
    released, telemetry is refused with RefusedError and counted, alarms and alerts still
    commit, gateway.disk_full is recorded, and once space returns gateway.disk_ok follows and
    telemetry is accepted again; nothing accepted before is lost."""
    db = tmp_path / "o.db"
    reserve = tmp_path / "o.db.reserve"
    disk = FillableDisk()
    clock = [1000.0]
    ob = await Outbox.open(db, commit_interval=0, storage=disk, clock_monotonic=lambda: clock[0])
    assert reserve.stat().st_size == 1024 * 1024
    before = await ob.append_many([ev(v="x" * 200) for _ in range(20)])
    disk.fill()
    accepted_full: list[int] = []
    for _ in range(200):  # until a commit needs a page the disk does not have
        try:
            accepted_full.append(await ob.append(ev(v="y" * 300)))
        except RefusedError as exc:
            assert exc.priority == 2
            break
    else:
        pytest.fail("the full disk never refused telemetry")
    assert not reserve.exists(), "the reserve must be released on a full disk"
    st = await ob.stats()
    assert st.disk_full and st.refused == 1
    alarm = await ob.append(ev(v="z" * 300, prio=0))
    alert = await ob.append(ev(prio=1))
    with pytest.raises(RefusedError):
        await ob.append(ev(prio=3))
    assert (await ob.stats()).refused == 2

    disk.empty()
    clock[0] += RECHECK_INTERVAL
    back = await ob.append(ev())
    assert reserve.stat().st_size == 1024 * 1024
    st = await ob.stats()
    assert not st.disk_full and st.refused == 2
    await ob.close()

    with sqlite3.connect(db) as c:
        types = {int(i): cbor2.loads(b)["type"] for i, b in
                 c.execute("SELECT id, body FROM events")}
    assert set(before + accepted_full) <= set(types), "an accepted event was lost"
    disk_alerts = [(t, i) for i, t in sorted(types.items()) if t.startswith("gateway.disk_")]
    assert [t for t, _ in disk_alerts] == ["gateway.disk_full", "gateway.disk_ok"]
    (_, full), (_, ok) = disk_alerts
    assert full < alarm < alert < ok < back


_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<call>\w+)\((?P<args>.*?)(?:\)\s+=\s+(?P<ret>-?\d+).*|"
                   r" <unfinished \.\.\.>)$")
_RESUMED = re.compile(r"^(?P<pid>\d+)\s+<\.\.\. (?P<call>\w+) resumed>.*=\s+(?P<ret>-?\d+)")


def test_acceptance_follows_the_wal_fsync(tmp_path: Path) -> None:
    """An append resolves only after the write-ahead log holding it was fsynced: traced on the
    real system calls of a worker (all threads), each "accepted" line it prints comes after an
    fsync of outbox.db-wal that follows every write to the WAL before it. A process kill keeps
    the page cache and cannot show this: with synchronous=NORMAL (or OFF) the kill test passes,
    this one fails, as it must (mutation noted in docs/RELIABILITY.md)."""
    db = tmp_path / "outbox.db"
    trace = tmp_path / "strace.txt"
    subprocess.run(["strace", "-f", "-y", "-s", "8", "-o", str(trace), "-e",
                    "trace=write,pwrite64,pwritev,fsync,fdatasync", sys.executable, str(WORKER),
                    "append-n", str(db), "30"], check=True, timeout=120, capture_output=True)
    wal = f"{db}-wal>"
    pending: dict[str, tuple[str, str]] = {}
    last_wal_write = last_wal_sync = -1
    accepted = 0
    for n, line in enumerate(trace.read_text().splitlines()):
        m = _CALL.match(line)
        if m and m["ret"] is None:  # a call another thread interrupted: completes later
            pending[m["pid"]] = (m["call"], m["args"])
            continue
        if m is None:
            r = _RESUMED.match(line)
            if r is None or r["pid"] not in pending:
                continue
            call, args = pending.pop(r["pid"])
            ret = r["ret"]
        else:
            call, args, ret = m["call"], m["args"], m["ret"]
        if int(ret) < 0:
            continue
        if wal in args and call in ("write", "pwrite64", "pwritev"):
            last_wal_write = n
        elif wal in args and call in ("fsync", "fdatasync"):
            last_wal_sync = n
        elif call == "write" and args.startswith("1<") and '"A ' in args:
            accepted += 1
            assert last_wal_write >= 0, "nothing written to a WAL: not in WAL mode?"
            assert last_wal_sync > last_wal_write, f"accepted before the WAL fsync: {line}"
    assert accepted == 30


def test_an_alarms_commit_runs_before_the_jobs_waiting_for_the_database() -> None:
    """The database thread runs jobs in order, except one submitted first (an alarm's commit),
    which passes every job not yet started; shutting down runs what was submitted."""
    db = DbThread("test-db")
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        started.set()
        release.wait(10)

    db.submit(blocker)
    assert started.wait(10)
    jobs = [db.submit(ran.append, "claim"), db.submit(ran.append, "ack"),
            db.submit_first(ran.append, "alarm"), db.submit(ran.append, "stats")]
    release.set()
    db.shutdown(wait=True)
    assert all(j.done() for j in jobs)
    assert ran == ["alarm", "claim", "ack", "stats"]
