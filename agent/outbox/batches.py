"""Batches: claimed from the store, stored signed before the first send, deleted on the ack.

`claim` selects the next events by (priority, id), has the caller build and sign the batch, and
in one transaction stores the signed bytes and the new chain head and marks the events as held
by that batch. They leave the store only with `ack` (matching seq and hash). A crash between
claim and ack leaves the batch stored; it is re-sent byte for byte (`pending`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from agent import protocol
from agent.outbox.db import transaction
from agent.outbox.store import Store
from agent.outbox.tally import EVENT_OVERHEAD

__all__ = ["BATCH_ENVELOPE", "BuildBatch", "PendingBatch", "ack", "claim", "pending"]

BATCH_ENVELOPE = 200  # COSE envelope, header fields and signature, rounded up
BuildBatch = Callable[[int, bytes, list[bytes]], bytes]


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
    data = build(seq, prev, [c[2] for c in chosen])
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
    store.side.acked(seq, h)
    return True
