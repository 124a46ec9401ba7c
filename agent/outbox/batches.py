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

Lanes (docs/PROTOCOL.md 3.2): alarms may go on a chain of their own, so that an alarm's batch
never waits for the bulk batches ahead of it, here or at the platform. An alarm lane batch is
always a direct batch: when the forwarder offers the lane (`DirectClaim` with `lane` =
ALARM_LANE), a group of alarms only, with no older alarm waiting unclaimed, is signed straight
into the lane's next batch (`Store.alarm_ready`). Alarms committed while the lane is not
offered (uplink down, the lane's window full) are rows, claimed on the bulk lane first, as
before lanes. The batches table keys a bulk batch by its seq and an alarm lane batch by minus
its seq (`batch_key`); the meta table holds each lane's chain head.

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
from agent.protocol import ALARM_LANE, BULK_LANE

__all__ = ["BATCH_ENVELOPE", "LANE_META", "BuildBatch", "DirectClaim", "PendingBatch", "ack",
           "batch_key", "claim", "pending", "restart"]

BATCH_ENVELOPE = 200  # COSE envelope, header fields and signature, rounded up
# build(seq, prev, bodies, epoch[, lane=ALARM_LANE]) -> the signed batch bytes; `lane` is
# passed only for the alarm lane
BuildBatch = Callable[..., bytes]
# meta keys of each lane's chain head: (next seq, hash of the last batch, hex)
LANE_META = {BULK_LANE: ("next_seq", "prev_hash"),
             ALARM_LANE: ("alarm_next_seq", "alarm_prev_hash")}


def batch_key(lane: int, seq: int) -> int:
    """A batch's key in the batches table (and in `Store.acked`): a bulk batch's seq, minus an
    alarm lane batch's (each lane counts from 1 in an epoch)."""
    return -seq if lane == ALARM_LANE else seq


def _lane_seq(key: int) -> tuple[int, int]:
    return (ALARM_LANE, -key) if key < 0 else (BULK_LANE, key)


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A signed batch stored in the outbox, waiting for the platform's ack."""

    seq: int
    hash: bytes
    data: bytes
    count: int
    top_priority: int
    created: float
    lane: int = BULK_LANE

    @property
    def key(self) -> int:
        return batch_key(self.lane, self.seq)


@dataclass(frozen=True, slots=True)
class DirectClaim:
    """What the forwarder would claim now (module doc). On the bulk lane, a commit signs its
    events straight into a batch when no older event waits unclaimed, or, for alarms only, no
    older alarm (the claim order stays (priority, id)), they fit one batch, and the oldest
    waited `linger` seconds or an alarm is among them (the caller checks the wait). On the
    alarm lane, a group of alarms only, with no older alarm unclaimed, that fits one batch."""

    max_events: int
    max_bytes: int
    build: BuildBatch
    linger: float
    lane: int = BULK_LANE

    def sign(self, store: Store, first: int, events: Sequence[Event],
             bodies: list[bytes]) -> _Signed | None:
        if not bodies or len(bodies) > self.max_events or (
                BATCH_ENVELOPE + sum(len(b) for b in bodies) > self.max_bytes):
            return None
        alarms_only = all(e.prio == ALARM for e in events)
        if self.lane == ALARM_LANE:
            if not alarms_only or store.tally.unclaimed_alarms:
                return None
        # The claim order is (priority, id): a group may pass unclaimed events only if it
        # holds nothing but alarms and no older alarm waits (an alarm during a backlog drain).
        elif store.ready or (store.tally.unclaimed
                             and not (alarms_only and not store.tally.unclaimed_alarms)):
            return None
        next_key, prev_key = LANE_META[self.lane]
        seq = int(store.meta(next_key))
        prev = bytes.fromhex(store.meta(prev_key))
        epoch = bytes.fromhex(store.meta("epoch"))
        data = (self.build(seq, prev, bodies, epoch, lane=ALARM_LANE)
                if self.lane == ALARM_LANE else self.build(seq, prev, bodies, epoch))
        prios: dict[int, int] = {}
        for e in events:
            prios[e.prio] = prios.get(e.prio, 0) + 1
        held = {"ids": [first, first + len(events) - 1],
                "prios": {str(p): n for p, n in sorted(prios.items())},
                "t": min(e.t for e in events)}
        batch = PendingBatch(seq, protocol.batch_hash(data), data, len(events), min(prios),
                             store.wall(), self.lane)
        return _Signed(batch, json.dumps(held, separators=(",", ":")))


@dataclass(frozen=True, slots=True)
class _Signed:
    batch: PendingBatch
    held: str

    def write(self, store: Store) -> None:
        """Inside the commit's transaction: the batch row and its lane's new chain head."""
        b = self.batch
        store.conn.execute(
            "INSERT INTO batches(seq, hash, created, count, top_prio, data, held) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (b.key, b.hash, b.created, b.count, b.top_priority, b.data, self.held),
        )
        next_key, prev_key = LANE_META[b.lane]
        store.set_meta(next_key, str(b.seq + 1))
        store.set_meta(prev_key, b.hash.hex())


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
    """Unacknowledged batches: the alarm lane's, then the bulk lane's, each in seq order."""
    acked = set(store.acked)
    out = []
    for key, h, data, count, top, created in store.conn.execute(
            "SELECT seq, hash, data, count, top_prio, created FROM batches"):
        if int(key) not in acked:
            lane, seq = _lane_seq(int(key))
            out.append(PendingBatch(seq, bytes(h), bytes(data), int(count), int(top),
                                    float(created), lane))
    return sorted(out, key=lambda b: (-b.lane, b.seq))


def ack(store: Store, seq: int, h: bytes, lane: int = BULK_LANE) -> bool:
    """Mark batch `seq` of `lane` (hash `h`) acknowledged: it leaves the figures now and the
    tables with the store's next write (`Store.transaction`). False when no unacknowledged
    stored batch has that lane, seq and hash."""
    conn = store.conn
    key = batch_key(lane, seq)
    if key in store.acked:
        return False
    row = conn.execute("SELECT hash, length(data), held FROM batches WHERE seq=?",
                       (key,)).fetchone()
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
    store.acked.append(key)
    if lane == BULK_LANE and (store.last_acked is None or seq > store.last_acked[0]):
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


def restart(store: Store, refused: PendingBatch, err: str, park: bool, tq: int = TQ_SYNCED,
            refused_too: frozenset[bytes] = frozenset()) -> dict[str, Any] | None:
    """The platform refuses `refused` for good (`err`). In one transaction: keep its bytes in
    ``refused``; when `park`, remove its events and record a ``gateway.batch_refused`` alert
    naming them, else record the alert and let them go out again; dissolve every stored batch
    of both lanes (their events unclaimed); start a new chain epoch, each lane at seq 1.
    Returns what the alert says, or None (nothing done) when `refused` is not the oldest stored
    batch of its lane, or a stored batch of the other lane is not among `refused_too` (the
    hashes the platform has refused): either may still be acknowledged, and its events must
    not go out twice."""
    conn = store.conn
    store.flush_acks()
    key = refused.key
    lane_keys = [int(k) for (k,) in conn.execute("SELECT seq FROM batches")]
    same = [k for k in lane_keys if (k < 0) == (key < 0)]
    other = {bytes(h) for (h,) in conn.execute(
        "SELECT hash FROM batches WHERE (seq < 0) != (? < 0)", (key,))}
    row = conn.execute("SELECT hash, held FROM batches WHERE seq=?", (key,)).fetchone()
    if (row is None or bytes(row[0]) != refused.hash or min(same, key=abs) != key
            or not other <= refused_too):
        return None
    if row[1] is not None:
        first, last = json.loads(row[1])["ids"]
        ids = list(range(int(first), int(last) + 1))
    else:
        ids = [int(r[0]) for r in conn.execute(
            "SELECT id FROM events WHERE batch=? ORDER BY id", (key,))]
    # The events of the other direct batches become rows again (out of their signed bytes).
    unheld = [r for seq, data in conn.execute(
        "SELECT seq, data FROM batches WHERE held IS NOT NULL ORDER BY seq")
        if not (park and int(seq) == key) for r in _held_rows(bytes(data))]
    old_epoch, epoch = store.meta("epoch"), new_epoch()
    info: dict[str, Any] = {
        "seq": refused.seq, "lane": refused.lane, "epoch": old_epoch, "hash": refused.hash.hex(),
        "err": err,
        "action": "parked" if park else "new_chain", "count": len(ids), "ids": id_ranges(ids),
        "new_epoch": epoch,
    }

    def dissolve(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO refused(seq, lane, epoch, hash, err, action, at, ids, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (refused.seq, refused.lane, old_epoch, refused.hash, err, info["action"],
             store.wall(), json.dumps(info["ids"]), refused.data),
        )
        conn.execute("DELETE FROM refused WHERE rowid NOT IN "
                     "(SELECT rowid FROM refused ORDER BY rowid DESC LIMIT ?)", (REFUSED_KEPT,))
        if park:
            conn.execute("DELETE FROM events WHERE batch=?", (key,))
        conn.execute("UPDATE events SET batch=NULL WHERE batch IS NOT NULL")
        conn.executemany("INSERT INTO events(id, prio, t, size, body) VALUES (?, ?, ?, ?, ?)",
                         unheld)
        conn.execute("DELETE FROM batches")
        store.set_meta("epoch", epoch)
        for next_key, prev_key in LANE_META.values():
            store.set_meta(next_key, "1")
            store.set_meta(prev_key, protocol.ZERO_HASH.hex())

    store.insert([Event(src="gateway", type="gateway.batch_refused", v=info, t=store.wall(),
                        tq=tq, prio=ALERT)], extra=dissolve)
    store.ready.clear()  # dissolved with the rest
    store.alarm_ready.clear()
    store.tally.load(conn)  # rare: count again rather than track every change above
    return info
