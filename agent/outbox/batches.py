"""Batches: claimed from the store, stored signed before the first send, deleted on the ack.

`claim` selects the next events by (priority, id), has the caller build and sign the batch, and
in one transaction stores the signed bytes and the new chain head and marks the events as held
by that batch. They leave the store only with `ack` (matching seq and hash). A crash between
claim and ack leaves the batch stored; it is re-sent byte for byte (`pending`).

A direct batch (`DirectClaim`): when the forwarder waits for events with a free slot, the
commit that accepts them may sign them straight into a batch, stored in that commit's
transaction with no event rows (column ``held`` says which ids and priorities it holds). The
events were never written twice, and no claim transaction follows the commit: at a branch's
trickle of readings, the claim and the ack each cost as many card writes as the commit
(bench/footprint.py). An ack is applied with the store's next write (`Store.transaction`).

`restart` is for a batch the platform refuses for good (docs/PROTOCOL.md 4.3): the batch's bytes
are kept for an operator (table ``refused``), every unacknowledged batch is dissolved (its events
unclaimed again, or, when the batch is parked, its events removed with a
``gateway.batch_refused`` alert naming them) and the chain starts again in a new epoch at seq 1.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent import protocol
from agent.core.types import ALARM, ALERT, TQ_SYNCED, Event
from agent.outbox.quota import id_ranges
from agent.outbox.schema import REFUSED_KEPT, new_epoch
from agent.outbox.store import Store
from agent.outbox.tally import EVENT_OVERHEAD

__all__ = ["BATCH_ENVELOPE", "BuildBatch", "DirectClaim", "PendingBatch", "ack", "claim",
           "pending", "restart"]

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


@dataclass(frozen=True, slots=True)
class DirectClaim:
    """What the forwarder would claim now (module doc): a commit signs its events straight into
    a batch when no older event waits unclaimed, or, for alarms only, no older alarm (the claim
    order stays (priority, id)), they fit one batch, and the oldest waited `linger` seconds or
    an alarm is among them (the caller checks the wait)."""

    max_events: int
    max_bytes: int
    build: BuildBatch
    linger: float

    def sign(self, store: Store, first: int, events: Sequence[Event],
             bodies: list[bytes]) -> _Signed | None:
        if not bodies or store.ready:
            return None
        # The claim order is (priority, id): a group may pass unclaimed events only if it
        # holds nothing but alarms and no older alarm waits (an alarm during a backlog drain).
        alarms_only = all(e.prio == ALARM for e in events)
        if ((store.tally.unclaimed and not (alarms_only and not store.tally.unclaimed_alarms))
                or len(bodies) > self.max_events
                or BATCH_ENVELOPE + sum(len(b) for b in bodies) > self.max_bytes):
            return None
        seq = int(store.meta("next_seq"))
        prev = bytes.fromhex(store.meta("prev_hash"))
        data = self.build(seq, prev, bodies, bytes.fromhex(store.meta("epoch")))
        prios: dict[int, int] = {}
        for e in events:
            prios[e.prio] = prios.get(e.prio, 0) + 1
        held = {"ids": [first, first + len(events) - 1],
                "prios": {str(p): n for p, n in sorted(prios.items())},
                "t": min(e.t for e in events)}
        batch = PendingBatch(seq, protocol.batch_hash(data), data, len(events), min(prios),
                             store.wall())
        return _Signed(batch, json.dumps(held, separators=(",", ":")))


@dataclass(frozen=True, slots=True)
class _Signed:
    batch: PendingBatch
    held: str

    def write(self, store: Store) -> None:
        """Inside the commit's transaction: the batch row and the new chain head."""
        b = self.batch
        store.conn.execute(
            "INSERT INTO batches(seq, hash, created, count, top_prio, data, held) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (b.seq, b.hash, b.created, b.count, b.top_priority, b.data, self.held),
        )
        store.set_meta("next_seq", str(b.seq + 1))
        store.set_meta("prev_hash", b.hash.hex())


def claim(store: Store, max_events: int, max_bytes: int,
          build: BuildBatch) -> PendingBatch | None:
    if store.ready:  # signed at commit, in seq order before anything claimed now
        return store.ready.pop(0)
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
    with store.transaction():
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
    acked = set(store.acked)
    return [
        PendingBatch(int(r[0]), bytes(r[1]), bytes(r[2]), int(r[3]), int(r[4]), float(r[5]))
        for r in store.conn.execute(
            "SELECT seq, hash, data, count, top_prio, created FROM batches ORDER BY seq"
        )
        if int(r[0]) not in acked
    ]


def ack(store: Store, seq: int, h: bytes) -> bool:
    """Mark batch `seq` (hash `h`) acknowledged: it leaves the figures now and the tables with
    the store's next write (`Store.transaction`). False when no unacknowledged stored batch has
    that seq and hash."""
    conn = store.conn
    if seq in store.acked:
        return False
    row = conn.execute("SELECT hash, length(data), held FROM batches WHERE seq=?",
                       (seq,)).fetchone()
    if row is None or bytes(row[0]) != h:
        return False
    if row[2] is not None:  # a direct batch: its events are only in the batch
        per_prio = [(int(p), n) for p, n in json.loads(row[2])["prios"].items()]
        freed = int(row[1])
    else:
        rows = [(int(p), int(size), int(n)) for p, size, n in conn.execute(
            "SELECT prio, COALESCE(SUM(size), 0), COUNT(*) FROM events WHERE batch=? "
            "GROUP BY prio", (seq,)
        )]
        per_prio = [(p, n) for p, _, n in rows]
        freed = sum(size + n * EVENT_OVERHEAD for _, size, n in rows) + int(row[1])
    if not store.acked:
        store.acked_since = time.monotonic()
    store.acked.append(seq)
    if store.last_acked is None or seq > store.last_acked[0]:
        store.last_acked = (seq, store.wall())
    store.tally.acked(per_prio, freed)
    return True


def _held_rows(data: bytes) -> list[tuple[int, int, float, int, bytes]]:
    """The event rows of a direct batch, out of its signed bytes (each body re-encoded
    canonically: the same bytes the batch was built from)."""
    batch, _, _ = protocol.decode_batch(data)
    rows = []
    for ev in batch.events:  # decoded events have exactly encode_event's keys
        body = protocol.encode_event(**ev)
        rows.append((int(ev["id"]), int(ev["prio"]), float(ev["t"]), len(body), body))
    return rows


def restart(store: Store, refused: PendingBatch, err: str, park: bool,
            tq: int = TQ_SYNCED) -> dict[str, Any] | None:
    """The platform refuses `refused` for good (`err`). In one transaction: keep its bytes in
    ``refused``; when `park`, remove its events and record a ``gateway.batch_refused`` alert
    naming them, else record the alert and let them go out again; dissolve every stored batch
    (their events unclaimed); start a new chain epoch at seq 1. Returns what the alert says, or
    None (nothing done) when `refused` is not the oldest stored batch: an older one may still
    be acknowledged, and its events must not go out twice."""
    conn = store.conn
    store.flush_acks()
    oldest = conn.execute("SELECT MIN(seq) FROM batches").fetchone()[0]
    row = conn.execute("SELECT hash, held FROM batches WHERE seq=?", (refused.seq,)).fetchone()
    if oldest != refused.seq or row is None or bytes(row[0]) != refused.hash:
        return None
    if row[1] is not None:
        first, last = json.loads(row[1])["ids"]
        ids = list(range(int(first), int(last) + 1))
    else:
        ids = [int(r[0]) for r in conn.execute(
            "SELECT id FROM events WHERE batch=? ORDER BY id", (refused.seq,))]
    # The events of the other direct batches become rows again (out of their signed bytes).
    unheld = [r for seq, data in conn.execute(
        "SELECT seq, data FROM batches WHERE held IS NOT NULL ORDER BY seq")
        if not (park and int(seq) == refused.seq) for r in _held_rows(bytes(data))]
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
        conn.executemany("INSERT INTO events(id, prio, t, size, body) VALUES (?, ?, ?, ?, ?)",
                         unheld)
        conn.execute("DELETE FROM batches")
        store.set_meta("epoch", epoch)
        store.set_meta("next_seq", "1")
        store.set_meta("prev_hash", protocol.ZERO_HASH.hex())

    store.insert([Event(src="gateway", type="gateway.batch_refused", v=info, t=store.wall(),
                        tq=tq, prio=ALERT)], extra=dissolve)
    store.ready.clear()  # dissolved with the rest
    store.tally.load(conn)  # rare: count again rather than track every change above
    return info
