"""The open store, as the database thread uses it: the connection, its tally and side state,
the meta table, the one path by which events enter the store (as rows, or straight into a
signed batch: `agent.outbox.batches.direct`), and the acknowledgements not yet written.

Deferred deletes: an acknowledged batch leaves the figures at once (`Tally.acked`) and the
tables with the next write transaction, whatever it is for (`Store.transaction`), or after
twice the telemetry window on its own (`Outbox.ack_batch`). A commit per ack cost as many
card writes as the commit of the events themselves (bench/footprint.py); an ack lost to a
crash costs only a re-send, which the platform answers ``replay`` (docs/PROTOCOL.md 4.2)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from agent import protocol
from agent.core.types import Event
from agent.outbox.db import transaction
from agent.outbox.side import SideState
from agent.outbox.tally import EVENT_OVERHEAD, Tally

if TYPE_CHECKING:
    from agent.outbox.batches import DirectClaim, PendingBatch

__all__ = ["INSERT_ROWS", "Store", "encode_body"]

INSERT_ROWS = 100  # rows per INSERT statement (500 parameters; SQLite allows 32766)


def encode_body(id: int, e: Event) -> bytes:
    """An event's wire encoding under its id (built once, at commit)."""
    return protocol.encode_event(id=id, t=e.t, tq=e.tq, src=e.src, type=e.type, v=e.v,
                                 prio=e.prio, u=e.u, attrs=e.attrs)


def _insert_sql(rows: int) -> str:
    return ("INSERT INTO events(id, prio, t, size, body) VALUES "
            + ",".join(["(?,?,?,?,?)"] * rows))


_INSERT_MANY = _insert_sql(INSERT_ROWS)


class Store:
    """Used only on the outbox's database thread (sqlite3 connections are not to be shared
    across threads)."""

    def __init__(self, conn: sqlite3.Connection, side: SideState, tally: Tally,
                 wall: Callable[[], float]) -> None:
        self.conn = conn
        self.side = side
        self.tally = tally
        self.wall = wall
        self.acked: list[int] = []  # keys (batch_key) acknowledged, rows not yet deleted
        self.acked_since: float | None = None  # monotonic: when the oldest of them came
        self.last_acked: tuple[int, float] | None = None  # (seq, wall time), to write
        self.ready: list[PendingBatch] = []  # bulk batches signed at commit, not handed out
        self.alarm_ready: list[PendingBatch] = []  # alarm lane batches, likewise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, which also deletes the acknowledged batches waiting for one
        (module doc). They count as deleted only once it has committed."""
        taken = list(self.acked)
        with transaction(self.conn) as conn:
            if taken:
                self._delete_acked(conn, taken)
            yield conn
        del self.acked[: len(taken)]
        if not self.acked:
            self.acked_since = None

    def flush_acks(self) -> None:
        """Delete the acknowledged batches now, in a transaction of their own if any wait."""
        if self.acked:
            with self.transaction():
                pass

    def _delete_acked(self, conn: sqlite3.Connection, keys: list[int]) -> None:
        for key in keys:  # batch=? uses the partial index events_batch
            conn.execute("DELETE FROM events WHERE batch=?", (key,))
            conn.execute("DELETE FROM batches WHERE seq=?", (key,))
        if self.last_acked is not None:
            seq, at = self.last_acked
            if seq > int(self.meta("last_acked_seq") or 0):
                self.set_meta("last_acked_seq", str(seq))
                self.set_meta("last_acked_at", repr(at))

    def load(self) -> None:
        self.tally.load(self.conn)
        self.side.load()

    def meta(self, key: str) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else ""

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("UPDATE meta SET value=? WHERE key=?", (value, key))

    def insert(
        self,
        events: Sequence[Event],
        extra: Callable[[sqlite3.Connection], None] | None = None,
        direct: Sequence[DirectClaim] = (),
    ) -> list[int]:
        """Insert `events` in one transaction, with ids assigned here from meta.next_id;
        `extra` runs inside the same transaction first (an eviction and its drop record commit
        together or not at all). With `direct` (the alarm lane's offer first), the events may
        go straight into a new signed batch instead of rows (`DirectClaim`; the batch is then
        in `self.alarm_ready` or `self.ready`)."""
        conn = self.conn
        first = self.tally.next_id
        last = first + len(events) - 1
        self.side.reserve_ids(last)
        bodies = [encode_body(first + i, e) for i, e in enumerate(events)]
        signed = next((s for d in direct
                       if (s := d.sign(self, first, events, bodies)) is not None), None)
        with self.transaction():
            if extra is not None:
                extra(conn)
            if signed is not None:
                signed.write(self)
            else:
                rows: list[Any] = []
                for i, (e, body) in enumerate(zip(events, bodies, strict=True)):
                    rows += (first + i, e.prio, e.t, len(body), body)
                # Multi-row INSERTs, not executemany: executemany takes the GIL back after
                # every row, and while the event loop runs Python that wait was the larger part
                # of an ingest commit (bench/outbox.py).
                step = INSERT_ROWS * 5
                whole = len(rows) - len(rows) % step
                for at in range(0, whole, step):
                    conn.execute(_INSERT_MANY, rows[at : at + step])
                if whole < len(rows):
                    conn.execute(_insert_sql((len(rows) - whole) // 5), rows[whole:])
            conn.execute("UPDATE meta SET value=? WHERE key='next_id'", (str(last + 1),))
        prios = [e.prio for e in events]
        if signed is not None:
            self.tally.inserted(prios, last + 1, 0)
            self.tally.claimed(prios, len(signed.batch.data))
            (self.alarm_ready if signed.batch.lane else self.ready).append(signed.batch)
        else:
            self.tally.inserted(prios, last + 1,
                                sum(len(b) for b in bodies) + EVENT_OVERHEAD * len(bodies))
        return list(range(first, last + 1))

    def restart_wal(self) -> None:
        """Checkpoint the WAL into the store and restart it: the next transactions overwrite
        the WAL file from its start instead of growing it, so they need no free disk space."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(RESTART)")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.flush_acks()
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()
