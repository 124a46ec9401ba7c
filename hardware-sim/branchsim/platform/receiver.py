"""The reference platform's batch handling, transport-free: bytes in, an Ack out.

Every check of docs/PROTOCOL.md ("Platform rules") happens here, in this order: decode and
verify the signature with the registered key, bind the key to its gateway (and to the topic the
batch came on), check the hash chain (replay, fork, gap) within the batch's epoch, then store the
batch, its events and the new chain head. A batch of an epoch the platform has not seen, seq 1
with a zero `prev`, starts a new chain for its gateway: the chain it replaces and where that one
ended are recorded (`epochs`), so that a gateway that lost its state rejoins with the gap on
record; a batch of an epoch that was replaced is refused as a `fork`. The checks and the store
are one write transaction, so several receivers (processes) on one store file see one chain
head: of two copies of a batch handled at once, one is stored and the other is a replay.
Nothing of a rejected batch is stored; the rejection is counted. Thread-safe (one lock; the
MQTT server calls it from paho's thread, CoAP from asyncio).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import (
    ZERO_HASH,
    Ack,
    Batch,
    ProtocolError,
    batch_hash,
    decode_batch,
    kid_for,
    verify_batch,
)
from branchsim.platform.store import event_row, open_store, row_event

__all__ = ["Receiver"]

log = structlog.get_logger(__name__)

GAP_POLL_S = 0.005  # how often a batch waiting for its predecessor looks at the chain head again


class Receiver:
    def __init__(self, store_path: Path) -> None:
        self.store_path = Path(store_path)
        self._db = open_store(self.store_path)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- registration ---------------------------------------------------------------------

    def register(self, gw: str, pubkey_pem: bytes) -> bytes:
        """Bind an Ed25519 public key (SPKI PEM) to a gateway id; returns its kid.
        Re-registering a gateway replaces its key (key rotation)."""
        key = serialization.load_pem_public_key(pubkey_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        kid = kid_for(key)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM gateways WHERE gw = ? OR kid = ?", (gw, kid))
            self._db.execute("INSERT INTO gateways (gw, kid, pubkey) VALUES (?, ?, ?)",
                             (gw, kid, pubkey_pem))
        return kid

    def _key(self, kid: bytes) -> tuple[str, Ed25519PublicKey] | None:
        row = self._db.execute("SELECT gw, pubkey FROM gateways WHERE kid = ?", (kid,)).fetchone()
        if row is None:
            return None
        key = serialization.load_pem_public_key(row[1])
        assert isinstance(key, Ed25519PublicKey)
        return row[0], key

    # --- batches --------------------------------------------------------------------------

    def handle_batch(self, data: bytes, topic_gw: str | None = None, *,
                     gap_wait_s: float = 0.0) -> Ack:
        """Verify and store one batch; the Ack says ok or why not (its `h` names `data`).

        `gap_wait_s`: how long a batch ahead of the chain waits for its predecessor before it is
        rejected as a gap. Receivers sharing a subscription get a gateway's in-flight batches
        round-robin, so the predecessor is often being stored by another receiver right now.
        """
        h = batch_hash(data)
        deadline = time.monotonic() + gap_wait_s
        waiting = False
        while True:
            with self._lock:
                try:
                    batch = self._check_and_store(data, topic_gw)
                except ProtocolError as exc:
                    seq, gw = self._unverified_seq_gw(data, topic_gw)
                    if exc.reason != "gap" or time.monotonic() >= deadline:
                        self._count(gw, exc.reason)
                        log.warning("platform.rejected", gw=gw, seq=seq, reason=exc.reason,
                                    detail=exc.detail, hash=h.hex()[:16])
                        return Ack(seq=seq, h=h, ok=False, err=exc.reason)
                    if not waiting:
                        waiting = True
                        log.info("platform.gap_wait", gw=gw, seq=seq, detail=exc.detail)
                else:
                    log.info("platform.accepted", gw=batch.gw, seq=batch.seq,
                             events=len(batch.events))
                    return Ack(seq=batch.seq, h=h, ok=True)
            # Polled: another process's commit to the store file sends no notification.
            time.sleep(GAP_POLL_S)

    def _check_and_store(self, data: bytes, topic_gw: str | None) -> Batch:
        """One write transaction: BEGIN IMMEDIATE takes the store's write lock before the chain
        head is read, so no other receiver on the file can move it between check and store."""
        with self._db:  # commits, or rolls back when a check raises
            self._db.execute("BEGIN IMMEDIATE")
            batch = self._check(data, topic_gw)
            self._store(batch, data)
        return batch

    def _check(self, data: bytes, topic_gw: str | None) -> Batch:
        registered: dict[bytes, str] = {}

        def key_for_kid(kid: bytes) -> Ed25519PublicKey | None:
            found = self._key(kid)
            if found is None:
                return None
            registered[kid] = found[0]
            return found[1]

        batch = verify_batch(data, key_for_kid)
        if batch.gw != registered[batch.kid]:
            raise ProtocolError("wrong-gateway",
                                f"key of {registered[batch.kid]!r} signed for {batch.gw!r}")
        if topic_gw is not None and topic_gw != batch.gw:
            raise ProtocolError("wrong-gateway", f"batch of {batch.gw!r} on {topic_gw!r} topic")
        cur = self._db.execute("SELECT epoch, last_seq, last_hash FROM chain WHERE gw = ?",
                               (batch.gw,)).fetchone()
        if cur is not None and bytes(cur[0]) == batch.epoch:
            last_seq, last_hash = int(cur[1]), bytes(cur[2])
        else:
            known = self._db.execute("SELECT 1 FROM epochs WHERE gw = ? AND epoch = ?",
                                     (batch.gw, batch.epoch)).fetchone()
            if known is not None:
                self._replay_or(batch, "fork", f"epoch {batch.epoch.hex()} was replaced")
            last_seq, last_hash = 0, ZERO_HASH  # a new chain: it must start at seq 1
        if batch.seq <= last_seq:
            self._replay_or(batch, "fork", f"seq {batch.seq} <= head {last_seq}, other bytes")
        if batch.seq > last_seq + 1:
            raise ProtocolError("gap", f"seq {batch.seq} after head {last_seq}")
        if batch.prev != last_hash:
            raise ProtocolError("fork", f"seq {batch.seq}: prev does not match head")
        return batch

    def _replay_or(self, batch: Batch, reason: str, detail: str) -> None:
        """Raise `replay` if these exact bytes are stored, else `reason`."""
        row = self._db.execute("SELECT hash FROM batches WHERE gw = ? AND epoch = ? AND seq = ?",
                               (batch.gw, batch.epoch, batch.seq)).fetchone()
        if row is not None and bytes(row[0]) == batch.hash:
            raise ProtocolError("replay", f"seq {batch.seq} already accepted")
        raise ProtocolError(reason, detail)

    def _store(self, batch: Batch, data: bytes) -> None:
        """Runs inside _check_and_store's transaction."""
        db = self._db
        cur = db.execute("SELECT epoch, last_seq, last_hash FROM chain WHERE gw = ?",
                         (batch.gw,)).fetchone()
        if cur is None or bytes(cur[0]) != batch.epoch:
            db.execute(
                "INSERT INTO epochs (gw, epoch, started_at, prev_epoch, prev_seq, prev_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (batch.gw, batch.epoch, time.time(), *(cur if cur is not None else (None,) * 3)),
            )
            if cur is not None:
                log.warning("platform.chain_restarted", gw=batch.gw, epoch=batch.epoch.hex(),
                            prev_epoch=bytes(cur[0]).hex(), prev_seq=int(cur[1]))
        db.execute(
            "INSERT INTO batches (gw, epoch, seq, hash, received_at, raw) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (batch.gw, batch.epoch, batch.seq, batch.hash, time.time(), data),
        )
        db.executemany(
            "INSERT OR IGNORE INTO events (gw, epoch, id, t, tq, src, type, v, u, prio, attrs, "
            "seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [event_row(batch.gw, batch.epoch, batch.seq, ev) for ev in batch.events],
        )
        db.execute(
            "INSERT INTO chain (gw, epoch, last_seq, last_hash) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (gw) DO UPDATE SET epoch = excluded.epoch, "
            "last_seq = excluded.last_seq, last_hash = excluded.last_hash",
            (batch.gw, batch.epoch, batch.seq, batch.hash),
        )
        self._rotate_keys(batch)

    def _rotate_keys(self, batch: Batch) -> None:
        """Key rotation (docs/COMMANDS.md, rotate-key): a `gateway.key_rotated` event, in a batch
        signed by a key registered to the gateway, registers the announced key beside the old
        one (batches signed before the switch still verify); the first batch signed by the new
        key retires the old ones. Runs inside _check_and_store's transaction."""
        for ev in batch.events:
            attrs = ev.get("attrs") or {}
            if ev.get("type") != "gateway.key_rotated" or not isinstance(attrs, dict):
                continue
            try:
                new = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(attrs.get("pub"))))
            except ValueError:
                log.warning("platform.bad_key_rotation", gw=batch.gw, seq=batch.seq)
                continue
            pem = new.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
            self._db.execute("INSERT OR IGNORE INTO gateways (gw, kid, pubkey) VALUES (?, ?, ?)",
                             (batch.gw, kid_for(new), pem))
            log.info("platform.key_announced", gw=batch.gw, kid=kid_for(new).hex())
        others = self._db.execute("SELECT COUNT(*) FROM gateways WHERE gw = ? AND kid != ?",
                                  (batch.gw, batch.kid)).fetchone()[0]
        if others and not any(e.get("type") == "gateway.key_rotated" for e in batch.events):
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
                log.info("platform.key_retired", gw=batch.gw, kid=batch.kid.hex())

    def _unverified_seq_gw(self, data: bytes, topic_gw: str | None) -> tuple[int, str]:
        """For a rejection's ack and counter: the claimed seq and gw, if the bytes decode."""
        try:
            batch, _, _ = decode_batch(data)
        except ProtocolError:
            return 0, topic_gw or ""
        return batch.seq, topic_gw or batch.gw

    def _count(self, gw: str, reason: str) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO rejections (gw, reason, count) VALUES (?, ?, 1) "
                "ON CONFLICT (gw, reason) DO UPDATE SET count = count + 1",
                (gw, reason),
            )

    # --- queries (tests, CLI) -------------------------------------------------------------

    def chain_head(self, gw: str) -> tuple[int, bytes]:
        """(last accepted seq, its hash) in the gateway's current epoch; (0, 32 zero bytes)
        before the first batch."""
        row = self._db.execute("SELECT last_seq, last_hash FROM chain WHERE gw = ?",
                               (gw,)).fetchone()
        return (0, ZERO_HASH) if row is None else (int(row[0]), bytes(row[1]))

    def epochs(self, gw: str) -> list[dict[str, Any]]:
        """The gateway's chains in the order they started: `epoch` (hex), `started_at`, and
        `prev` = {epoch, seq, hash} where the chain it replaced ended (None for the first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT epoch, started_at, prev_epoch, prev_seq, prev_hash FROM epochs "
                "WHERE gw = ? ORDER BY n", (gw,)).fetchall()
        return [{"epoch": bytes(e).hex(), "started_at": float(at),
                 "prev": None if pe is None else {"epoch": bytes(pe).hex(), "seq": int(ps),
                                                  "hash": bytes(ph).hex()}}
                for e, at, pe, ps, ph in rows]

    def events(self, gw: str | None = None) -> list[dict[str, Any]]:
        """Stored events ordered by gateway, then epoch (in the order the chains started),
        then id."""
        with self._lock:
            sql = ("SELECT e.gw, e.epoch, e.id, e.t, e.tq, e.src, e.type, e.v, e.u, e.prio, "
                   "e.attrs, e.seq FROM events e JOIN epochs p ON p.gw = e.gw "
                   "AND p.epoch = e.epoch")
            args: tuple[str, ...] = ()
            if gw is not None:
                sql += " WHERE e.gw = ?"
                args = (gw,)
            return [row_event(r)
                    for r in self._db.execute(sql + " ORDER BY e.gw, p.n, e.id", args)]

    def delivered_ids(self, gw: str) -> list[int]:
        """Every event id in every batch accepted from `gw`, in chain order (epoch after
        epoch), read back from the stored batch bytes (the evidence), not from the events
        table: the table ignores a duplicate id, so only this shows an event delivered twice in
        two different batches. Ids are unique per epoch: a gateway that lost its state starts
        them again."""
        with self._lock:
            raws = [bytes(r) for (r,) in self._db.execute(
                "SELECT b.raw FROM batches b JOIN epochs p ON p.gw = b.gw AND p.epoch = b.epoch "
                "WHERE b.gw = ? ORDER BY p.n, b.seq", (gw,))]
        return [int(e["id"]) for raw in raws for e in decode_batch(raw)[0].events]

    def counters(self) -> dict[tuple[str, str], int]:
        """Rejections by (gw, reason)."""
        with self._lock:
            rows = self._db.execute("SELECT gw, reason, count FROM rejections").fetchall()
        return {(gw, reason): int(n) for gw, reason, n in rows}

    def batch_count(self, gw: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM batches WHERE gw = ?", (gw,)).fetchone()
        return int(row[0])

    def public_key(self, kid: bytes) -> Ed25519PublicKey | None:
        with self._lock:
            found = self._key(kid)
        return None if found is None else found[1]
