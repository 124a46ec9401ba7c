"""Batches: claimed from the store, stored signed before the first send, deleted on the ack.

`claim` selects the next events by (priority, id), has the caller build and sign the batch, and
in one transaction stores the signed bytes and the new chain head and marks the events as held
by that batch. They leave the store only with `ack` (matching seq and hash). A crash between
claim and ack leaves the batch stored; it is re-sent byte for byte (`pending`).

`restart` is for a batch the platform refuses for good (docs/PROTOCOL.md 4.3): the batch's bytes
are kept for an operator (table ``refused``), every unacknowledged batch is dissolved (its events
unclaimed again, or, when the batch is parked, its events removed with a
``gateway.batch_refused`` alert naming them) and the chain starts again in a new epoch at seq 1.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import protocol
from agent.core.types import ALERT, TQ_SYNCED, Event
from agent.outbox.db import transaction
from agent.outbox.quota import id_ranges
from agent.outbox.schema import REFUSED_KEPT, new_epoch
from agent.outbox.store import Store
from agent.outbox.tally import EVENT_OVERHEAD

__all__ = ["BATCH_ENVELOPE", "BuildBatch", "PendingBatch", "ack", "claim", "pending", "restart"]

BATCH_ENVELOPE = 200  # COSE envelope, header fields and signature, rounded up
# build(seq, prev, bodies, epoch) -> the signed batch bytes
BuildBatch = Callable[[int, bytes, list[bytes], bytes], bytes]


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A signed batch stored in the outbox, waiting for the platform's ack."""

    seq: int
    hash: bytes
    data: bytes
    count: int
    top_priority: int
    created: float


def claim(store: Store, max_events: int, max_bytes: int,
          build: BuildBatch) -> PendingBatch | None:
    conn = store.conn
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
    seq = int(store.meta("next_seq"))
    prev = bytes.fromhex(store.meta("prev_hash"))
    data = build(seq, prev, [c[2] for c in chosen], bytes.fromhex(store.meta("epoch")))
    h = protocol.batch_hash(data)
    now = store.wall()
    top = min(c[1] for c in chosen)
    with transaction(conn):
        # One statement, not executemany (which takes the GIL back after every row).
        conn.execute("UPDATE events SET batch=? WHERE id IN (SELECT value FROM json_each(?))",
                     (seq, json.dumps([c[0] for c in chosen])))
        conn.execute(
            "INSERT INTO batches(seq, hash, created, count, top_prio, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (seq, h, now, len(chosen), top, data),
        )
        store.set_meta("next_seq", str(seq + 1))
        store.set_meta("prev_hash", h.hex())
    store.tally.claimed([c[1] for c in chosen], len(data))
    return PendingBatch(seq, h, data, len(chosen), top, now)


def pending(store: Store) -> list[PendingBatch]:
    return [
        PendingBatch(int(r[0]), bytes(r[1]), bytes(r[2]), int(r[3]), int(r[4]), float(r[5]))
        for r in store.conn.execute(
            "SELECT seq, hash, data, count, top_prio, created FROM batches ORDER BY seq"
        )
    ]


def ack(store: Store, seq: int, h: bytes) -> bool:
    conn = store.conn
    row = conn.execute("SELECT hash, length(data) FROM batches WHERE seq=?", (seq,)).fetchone()
    if row is None or bytes(row[0]) != h:
        return False
    per_prio = [(int(p), int(size), int(n)) for p, size, n in conn.execute(
        "SELECT prio, COALESCE(SUM(size), 0), COUNT(*) FROM events WHERE batch=? "
        "GROUP BY prio", (seq,)
    )]
    now = store.wall()
    with transaction(conn):
        conn.execute("DELETE FROM events WHERE batch=?", (seq,))
        conn.execute("DELETE FROM batches WHERE seq=?", (seq,))
        if seq > int(store.meta("last_acked_seq") or 0):
            store.set_meta("last_acked_seq", str(seq))
            store.set_meta("last_acked_at", repr(now))
    freed = sum(size + n * EVENT_OVERHEAD for _, size, n in per_prio) + int(row[1])
    store.tally.acked([(p, n) for p, _, n in per_prio], freed)
    return True


def restart(store: Store, refused: PendingBatch, err: str, park: bool,
            tq: int = TQ_SYNCED) -> dict[str, Any] | None:
    """The platform refuses `refused` for good (`err`). In one transaction: keep its bytes in
    ``refused``; when `park`, remove its events and record a ``gateway.batch_refused`` alert
    naming them, else record the alert and let them go out again; dissolve every stored batch
    (their events unclaimed); start a new chain epoch at seq 1. Returns what the alert says, or
    None (nothing done) when `refused` is not the oldest stored batch: an older one may still
    be acknowledged, and its events must not go out twice."""
    conn = store.conn
    oldest = conn.execute("SELECT MIN(seq) FROM batches").fetchone()[0]
    row = conn.execute("SELECT hash FROM batches WHERE seq=?", (refused.seq,)).fetchone()
    if oldest != refused.seq or row is None or bytes(row[0]) != refused.hash:
        return None
    ids = [int(r[0]) for r in conn.execute(
        "SELECT id FROM events WHERE batch=? ORDER BY id", (refused.seq,))]
    old_epoch, epoch = store.meta("epoch"), new_epoch()
    info: dict[str, Any] = {
        "seq": refused.seq, "epoch": old_epoch, "hash": refused.hash.hex(), "err": err,
        "action": "parked" if park else "new_chain", "count": len(ids), "ids": id_ranges(ids),
        "new_epoch": epoch,
    }

    def dissolve(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO refused(seq, epoch, hash, err, action, at, ids, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (refused.seq, old_epoch, refused.hash, err, info["action"], store.wall(),
             json.dumps(info["ids"]), refused.data),
        )
        conn.execute("DELETE FROM refused WHERE rowid NOT IN "
                     "(SELECT rowid FROM refused ORDER BY rowid DESC LIMIT ?)", (REFUSED_KEPT,))
        if park:
            conn.execute("DELETE FROM events WHERE batch=?", (refused.seq,))
        conn.execute("UPDATE events SET batch=NULL WHERE batch IS NOT NULL")
        conn.execute("DELETE FROM batches")
        store.set_meta("epoch", epoch)
        store.set_meta("next_seq", "1")
        store.set_meta("prev_hash", protocol.ZERO_HASH.hex())

    store.insert([Event(src="gateway", type="gateway.batch_refused", v=info, t=store.wall(),
                        tq=tq, prio=ALERT)], extra=dissolve)
    store.tally.load(conn)  # rare: count again rather than track every change above
    return info
