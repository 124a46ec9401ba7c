"""The reference platform's batch handling, transport-free: bytes in, an Ack out.

Every check of docs/PROTOCOL.md ("Platform rules") happens here, in this order: decode and
verify the signature with the registered key, bind the key to its gateway (and to the topic the
batch came on), check the hash chain (replay, fork, gap) of the batch's lane within its epoch,
then store the batch, its events and the lane's new chain head.

Chains. A gateway's batches form one hash chain per lane (3.2: 0 bulk, 1 alarm) in an epoch,
each from seq 1 with a zero `prev`, so that an alarm's batch is checked and stored without
waiting for the bulk batches ahead of it. The gateway's current epoch is the newest it started
(`epochs`); a batch of it is checked against its lane's head there (a lane with no batch in it
yet: seq 0, zero hash). A batch of an epoch the platform has not seen, seq 1 with a zero `prev`
in either lane, starts a new chain for its gateway: the chain it replaces and where both of that
chain's lanes ended are recorded, so that a gateway that lost its state rejoins with the gap on
record; from then on a batch of a replaced epoch, in either lane, is a `replay` of bytes stored
or else a `fork`. Event ids are shared by the lanes (one sequence per gateway epoch).

The checks and the store are one write transaction, so several receivers (processes) on one
store file see one chain head per lane: of two copies of a batch handled at once, one is stored
and the other is a replay. Nothing of a rejected batch is stored; the rejection is counted.

Thread-safe: one lock around the store (the MQTT server calls it from paho's two threads, CoAP
from asyncio), handed to a waiting alarm-lane handler before any waiting bulk one, so that an
alarm waits at most for the transaction running when it arrives. Decoding and the signature
check, most of a bulk batch's cost, run before the lock is taken (with the registered keys
cached; the registration is read again inside the transaction).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import (
    ALARM_LANE,
    BULK_LANE,
    ZERO_HASH,
    Batch,
    decode_batch,
)
from branchsim.platform.handling import VerifyingStore, announced_keys, registration_key
from branchsim.platform.rules import ChainState, check_chain
from branchsim.platform.store import event_row, open_store, row_event

__all__ = ["Receiver"]

log = structlog.get_logger(__name__)

_EVENT_ROWS = 76  # rows per INSERT of events: 13 columns, 988 parameters (SQLite's old limit 999)


def _insert_events(rows: int) -> str:
    return ("INSERT OR IGNORE INTO events (gw, epoch, id, t, tq, src, type, v, u, prio, attrs, "
            "lane, seq) VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?)"] * rows))


_INSERT_EVENTS_MANY = _insert_events(_EVENT_ROWS)

# WAL size past which a bulk batch's handler checkpoints: about SQLite's own automatic
# threshold (1,000 pages of 4 KiB).
CHECKPOINT_BYTES = 4 << 20


class Receiver(VerifyingStore):
    """`lanes=False` answers as a platform from before lanes did (docs/PROTOCOL.md 3.2): the
    payload key `lane` is unknown to it, so an alarm lane batch is `malformed` (and the MQTT
    side does not read the alarm topic). For rehearsing a gateway against such a platform."""

    def __init__(self, store_path: Path, *, lanes: bool = True) -> None:
        super().__init__(lanes=lanes)
        self.store_path = Path(store_path)
        self._db = open_store(self.store_path)
        self._wal = f"{self.store_path}-wal"
        # Checkpoints run outside the store's lock (`_make_durable`), not inside the commit
        # that crosses SQLite's threshold: a checkpoint copies megabytes and syncs the file, and
        # an alarm's batch would wait for it behind the lock.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer: sqlite3.Connection | None = None  # opened at the first checkpoint
        self._checkpointing = threading.Lock()

    def close(self) -> None:
        with self._checkpointing, self._lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
            self._db.close()

    # --- registration ---------------------------------------------------------------------

    def register(self, gw: str, pubkey_pem: bytes) -> bytes:
        """Bind an Ed25519 public key (SPKI PEM) to a gateway id; returns its kid.
        Re-registering a gateway replaces its key (key rotation)."""
        kid = registration_key(pubkey_pem)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM gateways WHERE gw = ? OR kid = ?", (gw, kid))
            self._db.execute("INSERT INTO gateways (gw, kid, pubkey) VALUES (?, ?, ?)",
                             (gw, kid, pubkey_pem))
            self._keys.clear()
        return kid

    def _key(self, kid: bytes) -> tuple[str, Ed25519PublicKey] | None:
        row = self._db.execute("SELECT gw, pubkey FROM gateways WHERE kid = ?", (kid,)).fetchone()
        if row is None:
            return None
        key = serialization.load_pem_public_key(row[1])
        assert isinstance(key, Ed25519PublicKey)
        return row[0], key

    # --- batches --------------------------------------------------------------------------

    def _rows(self, batch: Batch) -> list[tuple[Any, ...]]:
        return [event_row(batch.gw, batch.epoch, batch.lane, batch.seq, ev)
                for ev in batch.events]

    def _lookup_key(self, kid: bytes) -> Ed25519PublicKey | None:
        found = self._key(kid)
        return None if found is None else found[1]

    def _check_and_store(self, batch: Batch, data: bytes, rows: list[tuple[Any, ...]],
                         topic_gw: str | None) -> None:
        """One write transaction: BEGIN IMMEDIATE takes the store's write lock before the chain
        head is read, so no other receiver on the file can move it between check and store.

        Committed with synchronous=NORMAL: the commit writes the WAL but does not fsync it, so
        the store's lock (and SQLite's write lock, which other receiver processes wait for) is
        not held across a disk flush; `handle_batch` syncs the WAL after releasing them
        (`_make_durable`), before the batch is acknowledged. An alarm's batch thus waits at
        most for a bulk batch's inserts, not for its fsync (bench/README.md, alarm lane)."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._db:  # commits, or rolls back when a check raises
                self._db.execute("BEGIN IMMEDIATE")
                self._check(batch, topic_gw)
                self._store(batch, data, rows)
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def _make_durable(self, lane: int) -> None:
        """Sync the WAL (fdatasync, as SQLite does): every transaction committed in it so far,
        by this process or another receiver's, is durable once this returns. A checkpoint in
        between is no loss: SQLite syncs the WAL before it copies frames into the database
        file, and the file after.

        Then, past SQLite's own threshold, a passive checkpoint on a connection of its own
        (writers go on meanwhile; one thread at a time, others skip it). An alarm's handler
        leaves it to the bulk ones unless the WAL has grown far past it (a platform that
        receives only alarms)."""
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:  # no WAL: the last connection checkpointed it (synced) and
            return                 # removed it; nothing is waiting in it
        try:
            os.fdatasync(fd)
            wal_bytes = os.fstat(fd).st_size
        finally:
            os.close(fd)
        limit = CHECKPOINT_BYTES if lane == BULK_LANE else 16 * CHECKPOINT_BYTES
        if wal_bytes >= limit and self._checkpointing.acquire(blocking=False):
            try:
                if self._checkpointer is None:
                    self._checkpointer = open_store(self.store_path)
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                self._checkpointing.release()

    def _check(self, batch: Batch, topic_gw: str | None) -> None:
        """The checks after the signature's (docs/PROTOCOL.md 4.1, `check_chain`), inside the
        transaction."""
        db = self._db
        row = db.execute("SELECT gw FROM gateways WHERE kid = ?", (batch.kid,)).fetchone()
        current = self._current_epoch(batch.gw)
        known = current == batch.epoch or db.execute(
            "SELECT 1 FROM epochs WHERE gw = ? AND epoch = ?", (batch.gw, batch.epoch)
        ).fetchone() is not None

        def stored_hash() -> bytes | None:
            found = db.execute(
                "SELECT hash FROM batches WHERE gw = ? AND epoch = ? AND lane = ? AND seq = ?",
                (batch.gw, batch.epoch, batch.lane, batch.seq)).fetchone()
            return None if found is None else bytes(found[0])

        check_chain(batch, topic_gw, ChainState(
            registered_gw=None if row is None else row[0],
            current_epoch=current,
            head=self._ends(batch.gw, current).get(batch.lane, (0, ZERO_HASH))
            if batch.epoch == current else (0, ZERO_HASH),
            epoch_known=known,
            stored_hash=stored_hash,
        ))

    def _current_epoch(self, gw: str) -> bytes | None:
        """The newest epoch the gateway started (None before its first batch)."""
        row = self._db.execute("SELECT epoch FROM epochs WHERE gw = ? ORDER BY n DESC LIMIT 1",
                               (gw,)).fetchone()
        return None if row is None else bytes(row[0])

    def _ends(self, gw: str, epoch: bytes | None) -> dict[int, tuple[int, bytes]]:
        """{lane: (last seq, its hash)} of the lanes that have a batch in `epoch`."""
        rows = self._db.execute(
            "SELECT lane, last_seq, last_hash FROM chain WHERE gw = ? AND epoch = ?",
            (gw, epoch)).fetchall()
        return {int(lane): (int(seq), bytes(h)) for lane, seq, h in rows}

    def _store(self, batch: Batch, data: bytes, rows: list[tuple[Any, ...]]) -> None:
        """Runs inside _check_and_store's transaction."""
        db = self._db
        current = self._current_epoch(batch.gw)
        if batch.epoch != current:
            ends = self._ends(batch.gw, current)
            bulk = ends.get(BULK_LANE, (None, None))
            alarm = ends.get(ALARM_LANE, (None, None))
            db.execute(
                "INSERT INTO epochs (gw, epoch, started_at, prev_epoch, prev_seq, prev_hash, "
                "prev_alarm_seq, prev_alarm_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (batch.gw, batch.epoch, time.time(), current, *bulk, *alarm),
            )
            if current is not None:
                log.warning("platform.chain_restarted", gw=batch.gw, epoch=batch.epoch.hex(),
                            lane=batch.lane, prev_epoch=current.hex(), prev_seq=bulk[0],
                            prev_alarm_seq=alarm[0])
        db.execute(
            "INSERT INTO batches (gw, epoch, lane, seq, hash, received_at, raw) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (batch.gw, batch.epoch, batch.lane, batch.seq, batch.hash, time.time(), data),
        )
        # Multi-row INSERTs: executemany takes the GIL back after every row, and the alarm
        # lane's handler waits for this transaction (as the outbox does: agent/outbox/store.py).
        full = len(rows) - len(rows) % _EVENT_ROWS
        for i in range(0, full, _EVENT_ROWS):
            db.execute(_INSERT_EVENTS_MANY,
                       [v for row in rows[i:i + _EVENT_ROWS] for v in row])
        if full < len(rows):
            db.execute(_insert_events(len(rows) - full), [v for row in rows[full:] for v in row])
        db.execute(
            "INSERT INTO chain (gw, lane, epoch, last_seq, last_hash) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (gw, lane) DO UPDATE SET epoch = excluded.epoch, "
            "last_seq = excluded.last_seq, last_hash = excluded.last_hash",
            (batch.gw, batch.lane, batch.epoch, batch.seq, batch.hash),
        )
        self._rotate_keys(batch)

    def _rotate_keys(self, batch: Batch) -> None:
        """Key rotation (docs/COMMANDS.md, rotate-key): a `gateway.key_rotated` event, in a batch
        signed by a key registered to the gateway, registers the announced key beside the old
        one (batches signed before the switch still verify); the first batch signed by the new
        key retires the old ones. Runs inside _check_and_store's transaction."""
        rotating, announced = announced_keys(batch)
        for kid, pem in announced:
            self._db.execute("INSERT OR IGNORE INTO gateways (gw, kid, pubkey) VALUES (?, ?, ?)",
                             (batch.gw, kid, pem))
            log.info("platform.key_announced", gw=batch.gw, kid=kid.hex())
        others = self._db.execute("SELECT COUNT(*) FROM gateways WHERE gw = ? AND kid != ?",
                                  (batch.gw, batch.kid)).fetchone()[0]
        if others and not rotating:
            newest_announced = self._db.execute(
                "SELECT rowid FROM gateways WHERE gw = ? AND kid = ?", (batch.gw, batch.kid)
            ).fetchone()
            older = self._db.execute(
                "SELECT COUNT(*) FROM gateways WHERE gw = ? AND rowid < ?",
                (batch.gw, newest_announced[0]),
            ).fetchone()[0]
            if older:  # signed by the newest key: the old ones are retired
                self._db.execute("DELETE FROM gateways WHERE gw = ? AND rowid < ?",
                                 (batch.gw, newest_announced[0]))
                self._keys.clear()
                log.info("platform.key_retired", gw=batch.gw, kid=batch.kid.hex())

    def _count(self, gw: str, reason: str) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO rejections (gw, reason, count) VALUES (?, ?, 1) "
                "ON CONFLICT (gw, reason) DO UPDATE SET count = count + 1",
                (gw, reason),
            )

    # --- queries (tests, CLI) -------------------------------------------------------------

    def chain_head(self, gw: str, lane: int = BULK_LANE) -> tuple[int, bytes]:
        """(last accepted seq, its hash) of `lane` in the gateway's current epoch; (0, 32 zero
        bytes) before the lane's first batch in it."""
        with self._lock:
            return self._ends(gw, self._current_epoch(gw)).get(lane, (0, ZERO_HASH))

    def epochs(self, gw: str) -> list[dict[str, Any]]:
        """The gateway's chains in the order they started: `epoch` (hex), `started_at`, and
        `prev` = where the chain it replaced ended (None for the first): {epoch, seq, hash} of
        its bulk lane and {alarm_seq, alarm_hash} of its alarm lane, each None for a lane that
        had no batch in it."""
        with self._lock:
            rows = self._db.execute(
                "SELECT epoch, started_at, prev_epoch, prev_seq, prev_hash, prev_alarm_seq, "
                "prev_alarm_hash FROM epochs WHERE gw = ? ORDER BY n", (gw,)).fetchall()

        def end(seq: int | None, h: bytes | None) -> tuple[int | None, str | None]:
            return (None, None) if seq is None or h is None else (int(seq), bytes(h).hex())

        out: list[dict[str, Any]] = []
        for e, at, pe, ps, ph, pas, pah in rows:
            prev: dict[str, Any] | None = None
            if pe is not None:
                (seq, h), (alarm_seq, alarm_h) = end(ps, ph), end(pas, pah)
                prev = {"epoch": bytes(pe).hex(), "seq": seq, "hash": h, "alarm_seq": alarm_seq,
                        "alarm_hash": alarm_h}
            out.append({"epoch": bytes(e).hex(), "started_at": float(at), "prev": prev})
        return out

    def events(self, gw: str | None = None) -> list[dict[str, Any]]:
        """Stored events ordered by gateway, then epoch (in the order the chains started),
        then id (both lanes together: they share the ids)."""
        with self._lock:
            sql = ("SELECT e.gw, e.epoch, e.id, e.t, e.tq, e.src, e.type, e.v, e.u, e.prio, "
                   "e.attrs, e.lane, e.seq FROM events e JOIN epochs p ON p.gw = e.gw "
                   "AND p.epoch = e.epoch")
            args: tuple[str, ...] = ()
            if gw is not None:
                sql += " WHERE e.gw = ?"
                args = (gw,)
            return [row_event(r)
                    for r in self._db.execute(sql + " ORDER BY e.gw, p.n, e.id", args)]

    def delivered_ids(self, gw: str) -> list[int]:
        """Every event id in every batch accepted from `gw`, in chain order (epoch after
        epoch; in each, the bulk lane's batches by seq, then the alarm lane's), read back from
        the stored batch bytes (the evidence), not from the events table: the table ignores a
        duplicate id, so only this shows an event delivered twice in two different batches (of
        one lane or of both). Ids are unique per epoch: a gateway that lost its state starts
        them again."""
        with self._lock:
            raws = [bytes(r) for (r,) in self._db.execute(
                "SELECT b.raw FROM batches b JOIN epochs p ON p.gw = b.gw AND p.epoch = b.epoch "
                "WHERE b.gw = ? ORDER BY p.n, b.lane, b.seq", (gw,))]
        return [int(e["id"]) for raw in raws for e in decode_batch(raw)[0].events]

    def counters(self) -> dict[tuple[str, str], int]:
        """Rejections by (gw, reason)."""
        with self._lock:
            rows = self._db.execute("SELECT gw, reason, count FROM rejections").fetchall()
        return {(gw, reason): int(n) for gw, reason, n in rows}

    def batch_count(self, gw: str, lane: int | None = None) -> int:
        """Batches accepted from `gw`, in every epoch: of `lane`, or of all lanes (None)."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FROM batches WHERE gw = ? AND (? IS NULL OR lane = ?)",
                (gw, lane, lane)).fetchone()
        return int(row[0])

    def public_key(self, kid: bytes) -> Ed25519PublicKey | None:
        with self._lock:
            found = self._key(kid)
        return None if found is None else found[1]

    # --- path supervision (branchsim.platform.supervision, docs/PROTOCOL.md 7) ----------------

    def registration(self, kid: bytes) -> tuple[str, Ed25519PublicKey] | None:
        """(the gateway, its key) registered under `kid`, or None."""
        with self._lock:
            return self._key(kid)

    def advance_heartbeat(self, gw: str, path: str, seq: int, at: float) -> tuple[bool, int]:
        """Record `seq` as the path's last heartbeat if it is above the last one: (True, seq);
        else (False, the last accepted seq) and nothing changes. One transaction, so two
        receivers on one file cannot both accept one heartbeat."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT last_seq FROM heartbeats WHERE gw = ? AND path = ?",
                                   (gw, path)).fetchone()
            if row is not None and seq <= int(row[0]):
                return False, int(row[0])
            self._db.execute(
                "INSERT INTO heartbeats (gw, path, last_seq, last_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (gw, path) DO UPDATE SET last_seq = excluded.last_seq, "
                "last_at = excluded.last_at", (gw, path, seq, at))
            return True, seq

    def heartbeat_paths(self) -> list[tuple[str, str]]:
        """Every (gateway, path) a heartbeat was ever accepted on: supervised from the start."""
        with self._lock:
            rows = self._db.execute("SELECT gw, path FROM heartbeats ORDER BY gw, path")
            return [(str(gw), str(path)) for gw, path in rows.fetchall()]

    def record_platform_event(self, gw: str, type: str, attrs: dict[str, Any],
                              at: float) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO platform_events (at, gw, type, attrs) "
                             "VALUES (?, ?, ?, ?)", (at, gw, type, json.dumps(attrs)))

    def platform_events(self, gw: str | None = None) -> list[dict[str, Any]]:
        """The platform's own events about its gateways, oldest first: {at, gw, type, attrs}."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, gw, type, attrs FROM platform_events "
                "WHERE ? IS NULL OR gw = ? ORDER BY n", (gw, gw)).fetchall()
        return [{"at": float(at), "gw": g, "type": t, "attrs": json.loads(a)}
                for at, g, t, a in rows]

    def count_rejection(self, gw: str, reason: str) -> None:
        """Count a refusal that is not a batch's (a heartbeat's: `heartbeat-<reason>`)."""
        with self._lock:
            self._count(gw, reason)
