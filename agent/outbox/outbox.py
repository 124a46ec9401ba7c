"""The outbox's face: `Outbox`, what the rest of the agent calls, on the event loop. Every
database call runs on one dedicated thread (sqlite3 connections are not to be shared across
threads, and an fsync must never block the event loop), and every failure of the store comes
out as OutboxError."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from agent.core.errors import RefusedError
from agent.core.types import ALARM, ALERT, TQ_SYNCED, TQ_UNSYNCED, Event
from agent.outbox import batches
from agent.outbox.batches import BuildBatch, DirectClaim, PendingBatch
from agent.outbox.commit import GroupCommit
from agent.outbox.db import DbThread, OutboxError, reported
from agent.outbox.diskfull import DiskFull
from agent.outbox.keys import KeyPruner
from agent.outbox.quota import Quota
from agent.outbox.schema import open_store
from agent.outbox.side import SideState
from agent.outbox.storage import OsStorage, Storage
from agent.outbox.store import Store
from agent.outbox.tally import Tally
from agent.outbox.writer import Append, GroupWriter, Result

__all__ = ["Outbox", "OutboxStats"]

log = structlog.get_logger(__name__)

_R = TypeVar("_R")


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
    alarm_next_seq: int = 1  # the alarm lane's (docs/PROTOCOL.md 3.2)
    epoch: str = ""  # hex; empty for a chain started before epochs existed
    refused_batches: int = 0  # kept for an operator (table `refused`)
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
            "alarm_next_seq": self.alarm_next_seq,
            "epoch": self.epoch,
            "refused_batches": self.refused_batches,
            "last_acked_seq": self.last_acked_seq,
            "last_acked_at": self.last_acked_at,
            "dropped": dict(self.dropped),
            "refused": self.refused,
            "disk_full": self.disk_full,
        }


class Outbox:
    """Use `await Outbox.open(...)`, then `append`, `claim_batch`, `ack_batch`, `close`.

    `storage` is the filesystem seam (agent.outbox.storage; the real one by default) and
    `clock_monotonic` the clock of its intervals (disk-full rechecks, batch linger, side file
    and key pruning): tests hand in a fake disk and a clock they move."""

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
        storage: Storage | None = None,
        clock_monotonic: Callable[[], float] = time.monotonic,
        telemetry_window: float = 0.0,
        clock_synchronized: Callable[[], bool] = lambda: True,
    ) -> None:
        self.path = path
        self._time = clock_time
        self._synchronized = clock_synchronized
        self._monotonic = clock_monotonic
        self._storage = storage or OsStorage()
        self._executor = DbThread("outbox-db")
        self._side = SideState(path.parent)
        self._tally = Tally(clock_monotonic)
        self._quota = Quota(quota_bytes, low_watermark)
        self._disk = DiskFull(self._storage, path, reserve_bytes, clock_monotonic)
        self._commit = GroupCommit(self._quota, self._disk, KeyPruner(clock_time,
                                                                      clock_monotonic))
        self._writer = GroupWriter(self._commit_group, self._executor,
                                   commit_interval=commit_interval, commit_max=commit_max,
                                   window=telemetry_window)
        self._store: Store | None = None
        self.reset_info: dict[str, Any] | None = None
        self._direct: DirectClaim | None = None
        self._alarm_lane: DirectClaim | None = None
        # alarm lane batches signed at commit, for the forwarder (appended on the database
        # thread, taken on the loop: a deque's append and popleft are atomic)
        self._alarm_batches: collections.deque[PendingBatch] = collections.deque()
        self._ack_flush: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[None] | None = None

    @property
    def quota_bytes(self) -> int:
        return self._quota.quota_bytes

    @property
    def low_watermark(self) -> float:
        return self._quota.low_watermark

    @property
    def reserve_bytes(self) -> int:
        return self._disk.reserve_bytes

    @property
    def commit_interval(self) -> float:
        return self._writer.commit_interval

    @property
    def commit_max(self) -> int:
        return self._writer.commit_max

    @property
    def telemetry_window(self) -> float:
        """Seconds locally produced telemetry may wait to be committed (agent.outbox.writer)."""
        return self._writer.window

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
        storage: Storage | None = None,
        clock_monotonic: Callable[[], float] = time.monotonic,
        telemetry_window: float = 0.0,
        clock_synchronized: Callable[[], bool] = lambda: True,
    ) -> Outbox:
        """`clock_synchronized`: whether the wall clock is synchronised now, for the time
        quality of the events the outbox records itself (store reset, refused batch)."""
        ob = cls(
            path,
            quota_bytes=quota_bytes,
            commit_interval=commit_interval,
            commit_max=commit_max,
            low_watermark=low_watermark,
            clock_time=clock_time,
            reserve_bytes=reserve_bytes,
            storage=storage,
            clock_monotonic=clock_monotonic,
            telemetry_window=telemetry_window,
            clock_synchronized=clock_synchronized,
        )
        try:
            await ob._call(ob._open_sync)
        except BaseException:
            ob._executor.shutdown(wait=False)
            raise
        ob._writer.start()
        return ob

    async def close(self) -> None:
        """Commit whatever is queued, then close the file. Idempotent."""
        if self._writer.closed:
            return
        self._direct = self._alarm_lane = None
        await self._writer.close()
        if self._ack_flush is not None:
            self._ack_flush.cancel()
        if self._flush_task is not None:
            await self._flush_task
        await self._call(self._close_sync)  # writes the acks still waiting
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open_sync(self) -> None:
        conn, self.reset_info = open_store(self.path, self._storage, self._side)
        store = Store(conn, self._side, self._tally, self._time)
        self._store = store
        store.load()
        self._disk.opened()
        if self.reset_info is not None:
            store.insert([Event(
                src="gateway",
                type="gateway.store_reset",
                v={
                    "reason": self.reset_info["reason"],
                    "quarantined": self.reset_info["quarantined"],
                    "first_new_id": self._tally.next_id,
                },
                t=self._time(),
                tq=self._tq(),
                prio=ALERT,
            )])

    def _tq(self) -> int:
        return TQ_SYNCED if self._synchronized() else TQ_UNSYNCED

    def _close_sync(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    async def _call(self, fn: Callable[[], _R]) -> _R:
        """Run `fn` on the database thread; a database or OS failure comes out as OutboxError."""
        loop = asyncio.get_running_loop()
        with reported(f"outbox {self.path}"):
            return await loop.run_in_executor(self._executor, fn)

    def _opened(self) -> Store:
        if self._store is None:
            raise OutboxError("outbox is closed")
        return self._store

    # ---------------------------------------------------------------- appending

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) after each commit of new events (wakes the forwarder)."""
        self._writer.on_commit(callback)

    def check_accepts(self, prio: int) -> None:
        """Raise RefusedError now if a commit would refuse `prio` for a full disk (only alarms
        and alerts are taken then): for appends whose producer does not wait for the commit."""
        if self._disk.active and prio > ALERT:
            raise RefusedError("disk full: only alarms and alerts are accepted",
                               priority=prio, retry_after=60.0)

    async def append(self, event: Event) -> int:
        """Resolve with the event's id once it is committed; raise RefusedError if over quota."""
        ids = await self.append_many((event,))
        return ids[0]

    async def append_many(self, events: Sequence[Event], key: str | None = None) -> list[int]:
        """Commit all of `events` in one transaction (or none); resolve with their ids.

        `key` makes the append idempotent across crashes: a key already committed (within
        agent.outbox.keys.INGEST_KEY_TTL) commits nothing and resolves with the ids it got the
        first time. CoAP ingest passes the request's identity, so a retransmission that reaches
        a restarted agent is not stored twice."""
        return await self._writer.submit(events, key)

    def _commit_group(self, taken: list[Append]) -> list[Result]:
        store = self._opened()
        offers = [d for d in (self._alarm_lane, self._direct) if d is not None]
        try:
            return self._commit(store, taken, offers)
        finally:
            while store.alarm_ready:
                self._alarm_batches.append(store.alarm_ready.pop(0))

    def offer_direct(self, claim: DirectClaim | None) -> None:
        """The forwarder waits for events with a free slot (`claim`), or no longer does (None):
        while offered, a commit may sign its events straight into a batch, which the next
        `claim_batch` returns (agent.outbox.batches)."""
        self._direct = claim

    def offer_alarm_lane(self, claim: DirectClaim | None) -> None:
        """The forwarder's alarm lane has a free slot (`claim`, its lane ALARM_LANE), or not
        (None): while offered, a group of alarms only is signed straight into the lane's next
        batch, which `take_alarm_batches` returns (agent.outbox.batches, lanes)."""
        self._alarm_lane = claim

    def take_alarm_batches(self) -> list[PendingBatch]:
        """The alarm lane batches signed since the last call, in seq order."""
        out = []
        while self._alarm_batches:
            out.append(self._alarm_batches.popleft())
        return out

    # ---------------------------------------------------------------- batches

    @property
    def unclaimed_alarms(self) -> int:
        """Alarms committed but not yet in a batch."""
        return self._tally.unclaimed_alarms

    @property
    def alarm_waiting(self) -> bool:
        """An alarm waits to be sent: unclaimed, or in a batch signed at commit that no claim
        has handed out yet (the forwarder's slot kept for alarms)."""
        store = self._store
        return bool(self._tally.unclaimed_alarms) or (
            store is not None and any(b.top_priority == ALARM for b in list(store.ready)))

    def linger_remaining(self, linger: float, batch_events: int) -> float:
        """How long the forwarder should still wait before claiming a batch, to fill it: 0
        when an alarm waits, a full batch is there, or the oldest unclaimed event has waited
        `linger` seconds. Fewer, fuller batches mean fewer transactions (less SD card wear)."""
        tally = self._tally
        if (tally.unclaimed_alarms or tally.unclaimed >= batch_events or linger <= 0
                or (self._store is not None and self._store.ready)):
            return 0.0
        if tally.first_unclaimed_at is None:
            return 0.0
        return max(0.0, tally.first_unclaimed_at + linger - self._monotonic())

    async def claim_batch(
        self, max_events: int, max_bytes: int, build: BuildBatch
    ) -> PendingBatch | None:
        """Claim the next events (alarms first) into a new batch. `build(seq, prev, bodies,
        epoch)` returns the signed bytes; they and the new chain head are stored in the same
        transaction that marks the events as claimed. None when there is nothing to send."""

        def claim() -> PendingBatch | None:
            store = self._opened()
            return self._disk.retry(
                store, lambda: batches.claim(store, max_events, max_bytes, build))

        return await self._call(claim)

    async def restart_chain(self, refused: PendingBatch, err: str, park: bool,
                            refused_too: frozenset[bytes] = frozenset()
                            ) -> dict[str, Any] | None:
        """The platform refuses `refused` for good: keep its bytes for an operator, start a new
        chain epoch with every unacknowledged event (without the refused batch's when `park`),
        and record a ``gateway.batch_refused`` alert (agent.outbox.batches.restart). None when
        `refused` is not the oldest unacknowledged batch of its lane, or the other lane holds a
        batch whose hash is not in `refused_too` (then nothing changed)."""

        tq = self._tq()

        def restart() -> dict[str, Any] | None:
            store = self._opened()
            info = self._disk.retry(store, lambda: batches.restart(store, refused, err, park,
                                                                   tq, refused_too))
            if info is not None:
                self._alarm_batches.clear()  # dissolved with the rest
            return info

        return await self._call(restart)

    async def pending_batches(self) -> list[PendingBatch]:
        """Signed batches not yet acknowledged, oldest first (re-sent after a restart)."""
        return await self._call(lambda: batches.pending(self._opened()))

    async def ack_batch(self, seq: int, h: bytes, lane: int = 0) -> bool:
        """The platform verified batch `seq` of `lane` with hash `h`: its events leave the
        store. False (and nothing changes) if no unacknowledged stored batch has that lane, seq
        and hash.

        The delete is written with the store's next transaction, or on its own after twice
        `telemetry_window` (at once when it is 0; twice, so that the window's next commit,
        due within one window, takes it along): an ack lost to a crash only means the batch
        is sent again, and the platform answers ``replay`` (agent.outbox.store)."""

        def ack() -> bool:
            store = self._opened()
            done = batches.ack(store, seq, h, lane)
            if done and self.telemetry_window <= 0:
                self._disk.retry(store, store.flush_acks)
            return done

        done = await self._call(ack)
        if done and self.telemetry_window > 0:
            self._schedule_ack_flush(2 * self.telemetry_window)
        return done

    def _schedule_ack_flush(self, delay: float) -> None:
        if self._ack_flush is None and not self._writer.closed:
            self._ack_flush = asyncio.get_running_loop().call_later(delay, self._flush_acks)

    def _flush_acks(self) -> None:
        """Write the acks that have waited twice the window; look again when the oldest
        still waiting will have (a commit in between usually took them along)."""
        self._ack_flush = None
        if self._writer.closed:
            return  # close() writes them
        delay = 2 * self.telemetry_window

        def due() -> float | None:
            store = self._opened()
            if store.acked_since is None:
                return None
            wait = store.acked_since + delay - time.monotonic()
            if wait > 0:
                return wait
            self._disk.retry(store, store.flush_acks)
            return None

        async def run() -> None:
            try:
                wait = await self._call(due)
            except OutboxError as exc:  # kept in memory; the next write takes them along
                log.warning("outbox.ack_flush_failed", error=str(exc))
                wait = delay
            if wait is not None:
                self._schedule_ack_flush(wait)

        self._flush_task = asyncio.create_task(run(), name="outbox-ack-flush")

    # ---------------------------------------------------------------- status

    async def stats(self) -> OutboxStats:
        return await self._call(self._stats_sync)

    def _stats_sync(self) -> OutboxStats:
        store = self._opened()
        tally = self._tally
        st = OutboxStats(bytes=tally.bytes, quota_bytes=self.quota_bytes,
                         refused=self._commit.refused, disk_full=self._disk.active)
        st.depth = {p: n for p, n in sorted(tally.depth.items()) if n}
        st.unclaimed = tally.unclaimed
        st.in_flight_batches = tally.batches
        # ids grow with commit time: the lowest id is the oldest event (a primary-key lookup),
        # unless an acknowledged batch waits to be deleted or a direct batch holds older ones
        held = [float(r[0]) for r in store.conn.execute(
            "SELECT json_extract(held, '$.t') FROM batches WHERE held IS NOT NULL "
            "AND seq NOT IN (SELECT value FROM json_each(?))", (json.dumps(store.acked),))]
        oldest = store.conn.execute(
            "SELECT t FROM events WHERE batch IS NULL OR batch NOT IN "
            "(SELECT value FROM json_each(?)) ORDER BY id LIMIT 1",
            (json.dumps(store.acked),)).fetchone()
        times = held + ([float(oldest[0])] if oldest is not None else [])
        st.oldest_unsent = min(times) if times else None
        st.next_id = tally.next_id
        st.next_seq = int(store.meta("next_seq"))
        st.alarm_next_seq = int(store.meta("alarm_next_seq"))
        st.epoch = store.meta("epoch")
        st.refused_batches = int(
            store.conn.execute("SELECT COUNT(*) FROM refused").fetchone()[0])
        st.last_acked_seq = int(store.meta("last_acked_seq") or 0)
        at = store.meta("last_acked_at")
        st.last_acked_at = float(at) if at else None
        if store.last_acked is not None and store.last_acked[0] > st.last_acked_seq:
            st.last_acked_seq, st.last_acked_at = store.last_acked  # not yet written
        st.dropped = {k: int(v) for k, v in json.loads(store.meta("dropped") or "{}").items()}
        return st
