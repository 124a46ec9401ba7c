"""The durable outbox: the only writer of the agent's SQLite file.

An event is *accepted* only when the transaction holding it has committed (WAL,
``synchronous=FULL``); `Outbox.append` resolves after that commit and not before. Appends are
group-committed: a writer task takes whatever has queued every `commit_interval` seconds or
`commit_max` events, whichever comes first, so the cost of one fsync is shared; an alarm commits at
once. Every database call runs on one dedicated thread (sqlite3 connections are not to be shared
across threads, and an fsync must never block the event loop).

Ids are assigned at commit from a counter kept in the same transaction (``meta.next_id``), so they
are strictly increasing and never reused, also after deletes and restarts. A side file
(``ids.floor``) reserves id blocks ahead of use so that even after a corrupt store is quarantined,
the fresh store never reuses an id the platform may already hold.

The forwarder claims events into a batch (`claim_batch`): one transaction selects the next events
by (priority, id), has the caller build and sign the batch, stores the signed bytes and the new
chain head, and marks the events as held by that batch. They leave the store only on `ack_batch`.
A crash between claim and ack leaves the batch stored; it is re-sent byte for byte.

Quota: when the stored bytes pass the quota, the lowest-priority, oldest unclaimed events are
evicted (diagnostics, then telemetry; never alarms or alerts) and a ``gateway.dropped`` alert
names every evicted id. Telemetry that cannot be made room for is refused (`RefusedError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils
import structlog

from agent import protocol
from agent.core.atomic import write_atomic
from agent.core.errors import RefusedError, StoreError
from agent.core.types import ALARM, ALERT, TELEMETRY, TQ_SYNCED, Event

__all__ = [
    "SCHEMA_VERSION",
    "Outbox",
    "OutboxStats",
    "PendingBatch",
    "id_ranges",
]

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2
INGEST_KEY_TTL = 600.0  # s: longer than CoAP's EXCHANGE_LIFETIME (247 s), retransmits included
# Keys of forwarded operator audit records (agent.audit.AuditForwarder, "audit:{hash}"): the
# agent may stay down long after a crash between commit and cursor write; rare, so kept a year.
AUDIT_KEY_TTL = 365 * 86400.0
ID_BLOCK = 1_000_000  # ids reserved ahead in ids.floor; one fsync'd write per million
BATCH_ENVELOPE = 200  # COSE envelope, header fields and signature, rounded up
SIDE_STATE_INTERVAL = 2.0  # seconds between writes of the acked chain head to chain.json
EVENT_OVERHEAD = 48  # bytes of row/index overhead counted per event against the quota
BuildBatch = Callable[[int, bytes, list[bytes]], bytes]
_R = TypeVar("_R")


def id_ranges(ids: Iterable[int]) -> list[list[int]]:
    """[1, 2, 3, 7, 9, 10] -> [[1, 3], [7, 7], [9, 10]] (the drop record's compact form)."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A signed batch stored in the outbox, waiting for the platform's ack."""

    seq: int
    hash: bytes
    data: bytes
    count: int
    top_priority: int
    created: float


@dataclass(slots=True)
class OutboxStats:
    depth: dict[int, int] = field(default_factory=dict)  # events held per priority
    unclaimed: int = 0
    in_flight_batches: int = 0
    oldest_unsent: float | None = None
    bytes: int = 0
    quota_bytes: int = 0
    next_id: int = 1
    next_seq: int = 1
    last_acked_seq: int = 0
    last_acked_at: float | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    disk_full: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "depth": {str(k): v for k, v in sorted(self.depth.items())},
            "unclaimed": self.unclaimed,
            "in_flight_batches": self.in_flight_batches,
            "oldest_unsent": self.oldest_unsent,
            "bytes": self.bytes,
            "quota_bytes": self.quota_bytes,
            "next_id": self.next_id,
            "next_seq": self.next_seq,
            "last_acked_seq": self.last_acked_seq,
            "last_acked_at": self.last_acked_at,
            "dropped": dict(self.dropped),
            "refused": self.refused,
            "disk_full": self.disk_full,
        }


INSERT_ROWS = 100  # rows per INSERT statement (500 parameters; SQLite allows 32766)


def _insert_sql(rows: int) -> str:
    return ("INSERT INTO events(id, prio, t, size, body) VALUES "
            + ",".join(["(?,?,?,?,?)"] * rows))


_INSERT_MANY = _insert_sql(INSERT_ROWS)


@dataclass(slots=True)
class _Append:
    events: Sequence[Event]
    future: asyncio.Future[list[int]]
    urgent: bool
    key: str | None = None


class _SideState:
    """Small JSON files beside the store, written atomically (temp file, fsync, rename).

    They survive the quarantine of a corrupt store: the id floor (so ids are never reused) and
    the last acknowledged chain head (so a fresh store continues the chain the platform knows).
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "chain.json"

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("outbox.side_state_unreadable", path=str(self.path), error=str(exc))
            return {}
        return data if isinstance(data, dict) else {}

    def update(self, **changes: Any) -> None:
        data = self.read()
        data.update(changes)
        write_atomic(self.path, json.dumps(data, sort_keys=True).encode(), 0o600)


class Outbox:
    """Use `await Outbox.open(...)`, then `append`, `claim_batch`, `ack_batch`, `close`."""

    def __init__(
        self,
        path: Path,
        *,
        quota_bytes: int,
        commit_interval: float,
        commit_max: int,
        low_watermark: float,
        clock_time: Callable[[], float],
        reserve_bytes: int = 1024 * 1024,
    ) -> None:
        self.path = path
        self.reserve_bytes = reserve_bytes
        self._disk_full = False
        self._disk_checked = 0.0
        self.quota_bytes = quota_bytes
        self.commit_interval = commit_interval
        self.commit_max = commit_max
        self.low_watermark = low_watermark
        self._time = clock_time
        self._side = _SideState(path.parent)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-db")
        self._conn: sqlite3.Connection | None = None
        self._queue: list[_Append] = []
        self._queued = 0  # events in _queue
        self._urgent = 0  # appends in _queue that hold an alarm
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._bytes = 0
        self._next_id = 1
        self._id_floor = 0
        self._refused = 0
        # Figures kept in memory so that `stats()` never scans the table: on a 1M backlog a
        # GROUP BY took ~300 ms on the database thread, and alarms queued behind it.
        self._depth: dict[int, int] = {}
        self._unclaimed = 0
        self._batches = 0
        self._unclaimed_alarms = 0
        self._first_unclaimed_at: float | None = None
        self._side_written = 0.0
        self._keys_pruned = 0.0
        self._acked_head: tuple[int, bytes] | None = None
        self.reset_info: dict[str, Any] | None = None
        self._listeners: list[Callable[[], None]] = []

    # ---------------------------------------------------------------- opening and closing

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        quota_bytes: int = 256 * 1024 * 1024,
        commit_interval: float = 0.005,
        commit_max: int = 500,
        low_watermark: float = 0.9,
        clock_time: Callable[[], float] = time.time,
        reserve_bytes: int = 1024 * 1024,
    ) -> Outbox:
        ob = cls(
            path,
            quota_bytes=quota_bytes,
            commit_interval=commit_interval,
            commit_max=commit_max,
            low_watermark=low_watermark,
            clock_time=clock_time,
            reserve_bytes=reserve_bytes,
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(ob._executor, ob._open_sync)
        except BaseException:
            ob._executor.shutdown(wait=False)
            raise
        ob._writer = asyncio.create_task(ob._writer_loop(), name="outbox-writer")
        return ob

    async def close(self) -> None:
        """Commit whatever is queued, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # Keep the WAL small: checkpoint every 256 pages (1 MiB) and truncate it back to 1 MiB
        # after a checkpoint. SQLite's default (1000 pages, never truncated) lets the WAL alone
        # take 4 MiB, all of a small SD partition's headroom, and hides a full disk until late.
        conn.execute("PRAGMA wal_autocheckpoint=256")
        conn.execute("PRAGMA journal_size_limit=1048576")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        reason: str | None = None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            row = conn.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                reason = f"quick_check: {row[0] if row else 'no answer'}"
            else:
                self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            quarantined = self._quarantine()
            log.error("outbox.store_reset", reason=reason, quarantined=quarantined)
            conn = self._connect()
            self._migrate(conn)
            self.reset_info = {"reason": reason, "quarantined": quarantined}
        assert conn is not None
        self._conn = conn
        self._check_writable(conn)
        self._load_state()
        if not self._ensure_reserve():
            self._disk_full = True
            self._disk_checked = time.monotonic()
        if self.reset_info is not None:
            self._record_reset()

    def _check_writable(self, conn: sqlite3.Connection) -> None:
        """Refuse to start on a store that cannot be written (a failing SD card remounted
        read-only): accepting readings that cannot be committed would be a lie. systemd
        restarts the agent with its rate limit; doctor and the log say why."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE meta SET value=value WHERE key='next_id'")
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
            self._conn = None
            raise StoreError(
                f"the outbox {self.path} cannot be written: {exc} (read-only filesystem?)",
                hint="check `findmnt -no OPTIONS` for the state dir and `dmesg` for SD card "
                "errors; the agent will not accept readings it cannot store",
            ) from None

    def _quarantine(self) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{n}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        return str(target)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Schema versions are applied in order inside one transaction each (user_version)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this agent's "
                f"{SCHEMA_VERSION}",
                hint="install the agent version that wrote it, or move the file aside",
            )
        if version < 1:
            conn.execute("BEGIN IMMEDIATE")
            db = sqlite_utils.Database(conn)
            db.table("meta").create({"key": str, "value": str}, pk="key")
            # body: the event's wire encoding (CBOR map, id included), built once at commit.
            db.table("events").create(
                {"id": int, "prio": int, "t": float, "size": int, "body": bytes, "batch": int},
                pk="id",
                not_null={"prio", "t", "size", "body"},
            )
            conn.execute(
                "CREATE INDEX events_queue ON events(prio, id) WHERE batch IS NULL"
            )
            conn.execute("CREATE INDEX events_batch ON events(batch) WHERE batch IS NOT NULL")
            db.table("batches").create(
                {
                    "seq": int,
                    "hash": bytes,
                    "created": float,
                    "count": int,
                    "top_prio": int,
                    "data": bytes,
                },
                pk="seq",
                not_null={"hash", "created", "count", "top_prio", "data"},
            )
            side = self._side.read()
            floor = int(side.get("id_floor", 0))
            acked_seq = int(side.get("acked_seq", 0))
            acked_hash = str(side.get("acked_hash", protocol.ZERO_HASH.hex()))
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [
                    ("next_id", str(max(1, floor + 1))),
                    ("next_seq", str(acked_seq + 1)),
                    ("prev_hash", acked_hash),
                    ("last_acked_seq", str(acked_seq)),
                    ("last_acked_at", ""),
                    ("dropped", "{}"),
                ],
            )
            conn.execute("PRAGMA user_version=1")
            conn.execute("COMMIT")
            version = 1
        if version < 2:
            # v2: idempotency keys of ingest requests (see append_many).
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "CREATE TABLE ingest_keys "
                "(key TEXT PRIMARY KEY, t REAL NOT NULL, ids TEXT NOT NULL)"
            )
            conn.execute("PRAGMA user_version=2")
            conn.execute("COMMIT")

    def _meta(self, key: str) -> str:
        assert self._conn is not None
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else ""

    def _set_meta(self, key: str, value: str) -> None:
        assert self._conn is not None
        self._conn.execute("UPDATE meta SET value=? WHERE key=?", (value, key))

    def _load_state(self) -> None:
        assert self._conn is not None
        self._next_id = int(self._meta("next_id"))
        self._id_floor = int(self._side.read().get("id_floor", 0))
        ev = self._conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM events").fetchone()
        bt = self._conn.execute("SELECT COALESCE(SUM(length(data)), 0) FROM batches").fetchone()
        self._bytes = int(ev[0]) + int(ev[1]) * EVENT_OVERHEAD + int(bt[0])
        conn = self._conn
        self._depth = {int(p): int(n) for p, n in
                       conn.execute("SELECT prio, COUNT(*) FROM events GROUP BY prio")}
        self._unclaimed = int(
            conn.execute("SELECT COUNT(*) FROM events WHERE batch IS NULL").fetchone()[0])
        self._batches = int(conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        self._unclaimed_alarms = int(conn.execute(
            "SELECT COUNT(*) FROM events WHERE batch IS NULL AND prio=0").fetchone()[0])
        self._first_unclaimed_at = time.monotonic() if self._unclaimed else None

    def _record_reset(self) -> None:
        assert self.reset_info is not None
        ev = Event(
            src="gateway",
            type="gateway.store_reset",
            v={
                "reason": self.reset_info["reason"],
                "quarantined": self.reset_info["quarantined"],
                "first_new_id": self._next_id,
            },
            t=self._time(),
            tq=TQ_SYNCED,
            prio=ALERT,
        )
        self._commit_sync([ev])

    def _close_sync(self) -> None:
        self._write_acked_head()
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None

    # ---------------------------------------------------------------- appending

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) after each commit of new events (wakes the forwarder)."""
        self._listeners.append(callback)

    async def append(self, event: Event) -> int:
        """Resolve with the event's id once it is committed; raise RefusedError if over quota."""
        ids = await self.append_many((event,))
        return ids[0]

    async def append_many(self, events: Sequence[Event], key: str | None = None) -> list[int]:
        """Commit all of `events` in one transaction (or none); resolve with their ids.

        `key` makes the append idempotent across crashes: a key already committed (within
        INGEST_KEY_TTL) commits nothing and resolves with the ids it got the first time. CoAP
        ingest passes the request's identity, so a retransmission that reaches a restarted
        agent is not stored twice."""
        if self._closed:
            raise StoreError("outbox is closed")
        if not events:
            return []
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        urgent = any(e.prio == ALARM for e in events)
        self._queue.append(_Append(events, fut, urgent, key))
        self._queued += len(events)
        self._urgent += urgent
        self._wake.set()
        return await fut

    async def _writer_loop(self) -> None:
        """Group commit, pipelined: while one commit runs on the database thread, the next group
        gathers on the loop and is handed over as soon as it is full or the running one ends;
        at most two commits are queued for the thread. So under load the thread never waits
        for the loop, and producers whose commit ended run while the next one is written
        (the sqlite3 module releases the GIL inside SQLite). When the writer is idle, a new
        group waits up to `commit_interval` for company, so a trickle shares one fsync."""
        loop = asyncio.get_running_loop()
        running: list[asyncio.Task[None]] = []
        while True:
            running = [t for t in running if not t.done()]
            if not self._queue:
                if self._closed:
                    break
                self._wake.clear()
                await self._wait_for_wake(running, None)
                continue
            if running:
                # A commit is running: gather until it ends, unless the group is full or an
                # alarm waits (then it queues right behind the running commit).
                while (running and not running[-1].done() and not self._closed
                       and self._queued < self.commit_max and not self._urgent):
                    self._wake.clear()
                    await self._wait_for_wake(running, None)
                if len(running) >= 2 and not running[0].done():
                    await asyncio.wait([running[0]])
            else:
                # Idle: give producers `commit_interval` to join, unless an alarm waits, the
                # group is full, or we are closing.
                deadline = loop.time() + self.commit_interval
                while not self._closed and self._queued < self.commit_max and not self._urgent:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wake.clear()
                    await self._wait_for_wake([], remaining)
            taken = self._take()
            if taken:
                job = loop.run_in_executor(self._executor, self._commit_appends, taken)
                running.append(asyncio.create_task(self._finish(job, taken),
                                                   name="outbox-commit"))
        if running:
            await asyncio.wait(running)

    async def _wait_for_wake(self, running: list[asyncio.Task[None]],
                             seconds: float | None) -> None:
        """Until an append arrives, the newest running commit ends, or `seconds` pass."""
        # asyncio.timeout, not wait_for: on 3.11 a cancel racing wait_for can be lost.
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await asyncio.wait([waiter, *running[-1:]],
                                       return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    def _take(self) -> list[_Append]:
        """The next group: whole appends up to `commit_max` events (at least one append), or
        the whole queue when an alarm waits in it (the alarm commits at once, with company)."""
        if self._urgent or self._closed or self._queued <= self.commit_max:
            taken, self._queue = self._queue, []
        else:
            n = count = 0
            while n < len(self._queue) and (n == 0 or count + len(self._queue[n].events)
                                            <= self.commit_max):
                count += len(self._queue[n].events)
                n += 1
            taken, self._queue = self._queue[:n], self._queue[n:]
        self._queued -= sum(len(a.events) for a in taken)
        self._urgent -= sum(a.urgent for a in taken)
        return taken

    async def _finish(self, job: asyncio.Future[list[list[int] | BaseException]],
                      taken: list[_Append]) -> None:
        """Resolve the producers of one committed group (or fail them all)."""
        try:
            results = await job
        except Exception as exc:  # the transaction failed: nobody's events are accepted
            log.error("outbox.commit_failed", error=str(exc), events=len(taken))
            err = exc if isinstance(exc, StoreError) else StoreError(f"commit failed: {exc}")
            for a in taken:
                if not a.future.done():
                    a.future.set_exception(err)
            return
        for a, res in zip(taken, results, strict=True):
            if a.future.done():
                continue
            if isinstance(res, BaseException):
                a.future.set_exception(res)
            else:
                a.future.set_result(res)
        for cb in self._listeners:
            cb()

    def _commit_appends(self, taken: list[_Append]) -> list[list[int] | BaseException]:
        """Commit a group; on a full disk, alarms and alerts still commit (the reserve is
        released for them) and telemetry and diagnostics are refused until space returns."""
        self._check_space_back()
        if self._disk_full:
            return self._commit_urgent_only(taken)
        try:
            return self._commit_group(taken)
        except (sqlite3.OperationalError, OSError) as exc:
            if not self._is_disk_full(exc):
                raise
            self._enter_disk_full(str(exc))
            return self._commit_urgent_only(taken)

    def _commit_urgent_only(self, taken: list[_Append]) -> list[list[int] | BaseException]:
        keep = [a for a in taken if max(e.prio for e in a.events) <= ALERT]
        done: list[list[int] | BaseException] = []
        if keep:
            try:
                done = self._commit_group(keep)
            except (sqlite3.OperationalError, OSError) as exc:
                if not self._is_disk_full(exc):
                    raise
                # Something else took the space the reserve gave back. Make the write need no
                # new space: restart the WAL (its file is then reused from the start, not
                # grown) and free pages inside the store by evicting telemetry (recorded).
                self._restart_wal()
                try:
                    done = self._commit_group(keep)
                except (sqlite3.OperationalError, OSError) as again:
                    if not self._is_disk_full(again):
                        raise
                    with contextlib.suppress(sqlite3.Error, OSError):
                        self._evict(max(64 * 1024, self._bytes // 20), TELEMETRY, "disk_full")
                    self._restart_wal()
                    done = self._commit_group(keep)
        results = dict(zip(map(id, keep), done, strict=True))
        out: list[list[int] | BaseException] = []
        for a in taken:
            if id(a) in results:
                out.append(results[id(a)])
            else:
                self._refused += len(a.events)
                out.append(RefusedError("disk full: only alarms and alerts are accepted",
                                        priority=max(e.prio for e in a.events),
                                        retry_after=60.0))
        return out

    def _commit_group(self, taken: list[_Append]) -> list[list[int] | BaseException]:
        """One transaction for every queued append. Appends the quota refuses get RefusedError."""
        accepted: list[Event] = []
        plan: list[tuple[int, int] | list[int] | BaseException] = []
        for a in taken:
            plan.append((len(accepted), len(a.events)))
            accepted.extend(a.events)
        refused = self._make_room(accepted)
        if refused:
            # Refuse whole appends that hold a refused event (a request is accepted as a unit).
            keep: list[Event] = []
            new_plan: list[tuple[int, int] | list[int] | BaseException] = []
            for a, p in zip(taken, plan, strict=True):
                assert isinstance(p, tuple)
                if not a.urgent and any(e.prio >= refused for e in a.events):
                    top = max(e.prio for e in a.events)
                    self._refused += len(a.events)
                    new_plan.append(
                        RefusedError(
                            f"outbox quota reached for priority {top}",
                            priority=top,
                            retry_after=30.0,
                        )
                    )
                else:
                    new_plan.append((len(keep), len(a.events)))
                    keep.extend(a.events)
            accepted, plan = keep, new_plan
        known = self._known_keys([a.key for a in taken if a.key is not None])
        if known:
            # Already committed under this key (before a crash, or twice in this group):
            # take nothing new, answer with the first commit's ids.
            keep = []
            new_plan = []
            for a, p in zip(taken, plan, strict=True):
                if isinstance(p, tuple) and a.key in known:
                    new_plan.append(known[a.key])
                elif isinstance(p, tuple):
                    new_plan.append((len(keep), p[1]))
                    keep.extend(a.events)
                else:
                    new_plan.append(p)
            accepted, plan = keep, new_plan
        first = self._next_id
        key_rows = [
            (a.key, self._time(), json.dumps([first + p[0], p[1]]))
            for a, p in zip(taken, plan, strict=True)
            if a.key is not None and isinstance(p, tuple)
        ]

        def keys(c: sqlite3.Connection) -> None:
            c.executemany("INSERT OR IGNORE INTO ingest_keys(key, t, ids) VALUES (?, ?, ?)",
                          key_rows)

        ids = self._commit_sync(accepted, extra=keys if key_rows else None) if accepted else []
        out: list[list[int] | BaseException] = []
        for p in plan:
            if isinstance(p, tuple):
                start, n = p
                out.append(ids[start : start + n])
            else:
                out.append(p)  # a refusal, or the ids of an earlier commit under the same key
        self._prune_keys()
        return out

    def _known_keys(self, keys: list[str]) -> dict[str, list[int]]:
        """Keys already committed, with their ids. (A key twice in one uncommitted group is not
        looked for: aiocoap already drops retransmissions while the first is in process.)"""
        if not keys:
            return {}
        assert self._conn is not None
        found: dict[str, list[int]] = {}
        for k in set(keys):
            row = self._conn.execute("SELECT ids FROM ingest_keys WHERE key=?", (k,)).fetchone()
            if row is not None:
                start, n = json.loads(row[0])
                found[k] = list(range(int(start), int(start) + int(n)))
        return found

    def _prune_keys(self) -> None:
        now = time.monotonic()
        if now - self._keys_pruned < 60.0:
            return
        self._keys_pruned = now
        assert self._conn is not None
        with contextlib.suppress(sqlite3.Error):
            now = self._time()
            self._conn.execute(
                "DELETE FROM ingest_keys WHERE t < ? OR (t < ? AND key NOT LIKE 'audit:%')",
                (now - AUDIT_KEY_TTL, now - INGEST_KEY_TTL),
            )

    def _commit_sync(
        self,
        events: Sequence[Event],
        extra: Callable[[sqlite3.Connection], None] | None = None,
    ) -> list[int]:
        """Insert `events` (ids assigned here) in one transaction; `extra` runs inside the same
        transaction first (an eviction and its drop record commit together or not at all)."""
        conn = self._conn
        assert conn is not None
        first = self._next_id
        last = first + len(events) - 1
        if last > self._id_floor:
            self._id_floor = last + ID_BLOCK
            self._side.update(id_floor=self._id_floor)
        rows: list[Any] = []
        added = 0
        encode = protocol.encode_event
        for i, e in enumerate(events):
            body = encode(
                id=first + i,
                t=e.t,
                tq=e.tq,
                src=e.src,
                type=e.type,
                v=e.v,
                prio=e.prio,
                u=e.u,
                attrs=e.attrs,
            )
            rows += (first + i, e.prio, e.t, len(body), body)
            added += len(body) + EVENT_OVERHEAD
        conn.execute("BEGIN IMMEDIATE")
        try:
            if extra is not None:
                extra(conn)
            # Multi-row INSERTs, not executemany: executemany takes the GIL back after every
            # row, and while the event loop runs Python that wait was the larger part of an
            # ingest commit (bench/outbox.py).
            step = INSERT_ROWS * 5
            whole = len(rows) - len(rows) % step
            for at in range(0, whole, step):
                conn.execute(_INSERT_MANY, rows[at : at + step])
            if whole < len(rows):
                conn.execute(_insert_sql((len(rows) - whole) // 5), rows[whole:])
            conn.execute("UPDATE meta SET value=? WHERE key='next_id'", (str(last + 1),))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._next_id = last + 1
        self._bytes += added
        for e in events:
            self._depth[e.prio] = self._depth.get(e.prio, 0) + 1
        self._unclaimed += len(events)
        self._unclaimed_alarms += sum(1 for e in events if e.prio == ALARM)
        if self._first_unclaimed_at is None:
            self._first_unclaimed_at = time.monotonic()
        return list(range(first, last + 1))

    # ---------------------------------------------------------------- quota

    def _make_room(self, incoming: Sequence[Event]) -> int | None:
        """Evict so that `incoming` fits under the quota. Returns None if it all fits, else the
        least urgent incoming priority that must be refused. Room for an event is never made by
        evicting events more urgent than it; alarms are never evicted and never refused (for
        them the disk is the only limit)."""
        need = len(incoming) * (256 + EVENT_OVERHEAD)  # upper-bound estimate before encoding
        if self._bytes + need <= self.quota_bytes:
            return None
        most_urgent = min(e.prio for e in incoming)
        target = int(self.quota_bytes * self.low_watermark) - need
        self._evict(self._bytes - max(0, target), floor_prio=max(TELEMETRY, most_urgent))
        if self._bytes + need <= self.quota_bytes:
            return None
        least_urgent = max(e.prio for e in incoming)
        return least_urgent if least_urgent >= TELEMETRY else None

    def _evict(self, want: int, floor_prio: int, reason: str = "quota") -> list[int]:
        """Delete unclaimed events, priority 3 then 2 (not below `floor_prio`), oldest first,
        until `want` bytes are freed; never alarms or alerts. Per priority, the delete and the
        gateway.dropped record naming every id that went commit in one transaction."""
        conn = self._conn
        assert conn is not None
        freed_total = 0
        all_ids: list[int] = []
        for prio in range(3, floor_prio - 1, -1):
            if freed_total >= want:
                break
            ids: list[int] = []
            freed = 0
            for row in conn.execute(
                "SELECT id, size FROM events WHERE batch IS NULL AND prio=? ORDER BY id",
                (prio,),
            ):
                ids.append(int(row[0]))
                freed += int(row[1]) + EVENT_OVERHEAD
                if freed_total + freed >= want:
                    break
            if not ids:
                continue
            ranges = id_ranges(ids)
            drop = Event(
                src="gateway",
                type="gateway.dropped",
                v={"reason": reason, "priority": prio, "count": len(ids), "ids": ranges},
                t=self._time(),
                prio=ALERT,
            )

            def delete(c: sqlite3.Connection, ids: list[int] = ids) -> None:
                c.execute("DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))",
                          (json.dumps(ids),))
                dropped = json.loads(self._meta("dropped") or "{}")
                dropped[reason] = int(dropped.get(reason, 0)) + len(ids)
                self._set_meta("dropped", json.dumps(dropped))

            self._commit_sync([drop], extra=delete)
            self._depth[prio] -= len(ids)
            self._unclaimed -= len(ids)
            self._bytes -= freed
            freed_total += freed
            log.warning("outbox.evicted", reason=reason, priority=prio, count=len(ids),
                        ids=ranges[:8])
            all_ids.extend(ids)
        return all_ids

    # ---------------------------------------------------------------- a full disk

    def _ensure_reserve(self) -> bool:
        """Keep `reserve_bytes` allocated beside the store. When the disk fills, releasing it
        is what lets alarms still commit (and acks still delete). True when it is in place."""
        if self.reserve_bytes <= 0:
            return True
        path = self.path.with_name(self.path.name + ".reserve")
        try:
            if path.exists() and path.stat().st_size >= self.reserve_bytes:
                return True
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            log.warning("outbox.reserve_unavailable", error=str(exc))
            return False
        return True

    def _restart_wal(self) -> None:
        """Checkpoint the WAL into the store and restart it: the next transactions overwrite
        the WAL file from its start instead of growing it, so they need no free disk space."""
        assert self._conn is not None
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(RESTART)")

    def _release_reserve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.with_name(self.path.name + ".reserve").unlink()

    @staticmethod
    def _is_disk_full(exc: BaseException) -> bool:
        if isinstance(exc, sqlite3.OperationalError):
            return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
                "disk is full" in str(exc)
            )
        return isinstance(exc, OSError) and exc.errno == errno.ENOSPC

    def _enter_disk_full(self, error: str) -> None:
        """The disk is full: release the reserve and accept only alarms and alerts until space
        returns (a commit that still fails then evicts telemetry: `_commit_urgent_only`)."""
        first = not self._disk_full
        self._disk_full = True
        self._disk_checked = time.monotonic()
        self._release_reserve()
        self._restart_wal()
        if first:
            log.error("outbox.disk_full", error=error, advice="free space on the state dir's "
                      "filesystem; alarms and alerts are still accepted meanwhile")
        if first:
            with contextlib.suppress(sqlite3.Error, OSError):
                self._commit_sync([Event(src="gateway", type="gateway.disk_full",
                                         v={"error": error}, t=self._time(), prio=ALERT)])

    def _check_space_back(self) -> None:
        """While the disk is full, retry the reserve every 10 s; once it fits, telemetry is
        accepted again and a gateway.disk_ok alert says so."""
        if not self._disk_full or time.monotonic() - self._disk_checked < 10.0:
            return
        self._disk_checked = time.monotonic()
        if self._ensure_reserve():
            self._disk_full = False
            log.warning("outbox.disk_ok")
            with contextlib.suppress(sqlite3.Error, OSError):
                self._commit_sync([Event(src="gateway", type="gateway.disk_ok", v=None,
                                         t=self._time(), prio=ALERT)])

    # ---------------------------------------------------------------- batches

    @property
    def unclaimed_alarms(self) -> int:
        """Alarms committed but not yet in a batch (the forwarder's alarm lane)."""
        return self._unclaimed_alarms

    def linger_remaining(self, linger: float, batch_events: int) -> float:
        """How long the forwarder should still wait before claiming a batch, to fill it: 0
        when an alarm waits, a full batch is there, or the oldest unclaimed event has waited
        `linger` seconds. Fewer, fuller batches mean fewer transactions (less SD card wear)."""
        if self._unclaimed_alarms or self._unclaimed >= batch_events or linger <= 0:
            return 0.0
        if self._first_unclaimed_at is None:
            return 0.0
        return max(0.0, self._first_unclaimed_at + linger - time.monotonic())

    def _retry_on_full(self, fn: Callable[[], _R]) -> _R:
        """Run a write; on a full disk release the reserve (and evict) and run it once more."""
        try:
            return fn()
        except (sqlite3.OperationalError, OSError) as exc:
            if not self._is_disk_full(exc):
                raise
            self._enter_disk_full(str(exc))
            return fn()

    async def claim_batch(
        self, max_events: int, max_bytes: int, build: BuildBatch
    ) -> PendingBatch | None:
        """Claim the next events (alarms first) into a new batch. `build(seq, prev, bodies)`
        returns the signed bytes; they and the new chain head are stored in the same transaction
        that marks the events as claimed. None when there is nothing to send."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor,
            lambda: self._retry_on_full(lambda: self._claim_sync(max_events, max_bytes, build)),
        )

    def _claim_sync(
        self, max_events: int, max_bytes: int, build: BuildBatch
    ) -> PendingBatch | None:
        conn = self._conn
        assert conn is not None
        rows = conn.execute(
            "SELECT id, prio, body FROM events WHERE batch IS NULL ORDER BY prio, id LIMIT ?",
            (max_events,),
        ).fetchall()
        if not rows:
            return None
        chosen: list[tuple[int, int, bytes]] = []
        size = BATCH_ENVELOPE
        for r in rows:
            if chosen and size + len(r[2]) > max_bytes:
                break
            chosen.append((int(r[0]), int(r[1]), bytes(r[2])))
            size += len(r[2])
        seq = int(self._meta("next_seq"))
        prev = bytes.fromhex(self._meta("prev_hash"))
        data = build(seq, prev, [c[2] for c in chosen])
        h = protocol.batch_hash(data)
        now = self._time()
        top = min(c[1] for c in chosen)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # One statement, not executemany (which takes the GIL back after every row).
            conn.execute("UPDATE events SET batch=? WHERE id IN (SELECT value FROM json_each(?))",
                         (seq, json.dumps([c[0] for c in chosen])))
            conn.execute(
                "INSERT INTO batches(seq, hash, created, count, top_prio, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (seq, h, now, len(chosen), top, data),
            )
            self._set_meta("next_seq", str(seq + 1))
            self._set_meta("prev_hash", h.hex())
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._bytes += len(data)
        self._unclaimed -= len(chosen)
        self._unclaimed_alarms -= sum(1 for c in chosen if c[1] == ALARM)
        self._first_unclaimed_at = time.monotonic() if self._unclaimed else None
        self._batches += 1
        return PendingBatch(seq, h, data, len(chosen), top, now)

    async def pending_batches(self) -> list[PendingBatch]:
        """Signed batches not yet acknowledged, oldest first (re-sent after a restart)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._pending_sync)

    def _pending_sync(self) -> list[PendingBatch]:
        assert self._conn is not None
        return [
            PendingBatch(int(r[0]), bytes(r[1]), bytes(r[2]), int(r[3]), int(r[4]), float(r[5]))
            for r in self._conn.execute(
                "SELECT seq, hash, data, count, top_prio, created FROM batches ORDER BY seq"
            )
        ]

    async def ack_batch(self, seq: int, h: bytes) -> bool:
        """The platform verified batch `seq` with hash `h`: its events leave the store.
        False (and nothing changes) if no stored batch has that seq and hash."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, lambda: self._retry_on_full(lambda: self._ack_sync(seq, h))
        )

    def _ack_sync(self, seq: int, h: bytes) -> bool:
        conn = self._conn
        assert conn is not None
        row = conn.execute("SELECT hash, length(data) FROM batches WHERE seq=?", (seq,)).fetchone()
        if row is None or bytes(row[0]) != h:
            return False
        per_prio = conn.execute(
            "SELECT prio, COALESCE(SUM(size), 0), COUNT(*) FROM events WHERE batch=? "
            "GROUP BY prio", (seq,)
        ).fetchall()
        freed = (sum(int(r[1]) for r in per_prio), sum(int(r[2]) for r in per_prio))
        now = self._time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM events WHERE batch=?", (seq,))
            conn.execute("DELETE FROM batches WHERE seq=?", (seq,))
            if seq > int(self._meta("last_acked_seq") or 0):
                self._set_meta("last_acked_seq", str(seq))
                self._set_meta("last_acked_at", repr(now))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._bytes -= int(freed[0]) + int(freed[1]) * EVENT_OVERHEAD + int(row[1])
        for prio, _size, n in per_prio:
            self._depth[int(prio)] -= int(n)
        self._batches -= 1
        self._acked_head = (seq, h)
        if time.monotonic() - self._side_written >= SIDE_STATE_INTERVAL:
            self._write_acked_head()
        return True

    def _write_acked_head(self) -> None:
        """Record the last acknowledged chain head beside the store (see _SideState). Written
        at most every SIDE_STATE_INTERVAL seconds and on close: an fsync'd file per ack would
        double the writes of a busy gateway."""
        if self._acked_head is None:
            return
        seq, h = self._acked_head
        try:
            self._side.update(acked_seq=seq, acked_hash=h.hex())
            self._side_written = time.monotonic()
            self._acked_head = None
        except OSError as exc:
            # Best effort: the delete has committed; the next ack rewrites the side file.
            log.error("outbox.side_state_write_failed", error=str(exc))

    # ---------------------------------------------------------------- status

    async def stats(self) -> OutboxStats:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._stats_sync)

    def _stats_sync(self) -> OutboxStats:
        conn = self._conn
        assert conn is not None
        st = OutboxStats(bytes=self._bytes, quota_bytes=self.quota_bytes, refused=self._refused,
                         disk_full=self._disk_full)
        st.depth = {p: n for p, n in sorted(self._depth.items()) if n}
        st.unclaimed = self._unclaimed
        st.in_flight_batches = self._batches
        # ids grow with commit time: the lowest id is the oldest event (a primary-key lookup)
        oldest = conn.execute("SELECT t FROM events ORDER BY id LIMIT 1").fetchone()
        st.oldest_unsent = float(oldest[0]) if oldest is not None else None
        st.next_id = self._next_id
        st.next_seq = int(self._meta("next_seq"))
        st.last_acked_seq = int(self._meta("last_acked_seq") or 0)
        at = self._meta("last_acked_at")
        st.last_acked_at = float(at) if at else None
        st.dropped = {k: int(v) for k, v in json.loads(self._meta("dropped") or "{}").items()}
        return st
