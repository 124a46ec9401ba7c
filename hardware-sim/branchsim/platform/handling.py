"""What both platform stores do the same way around their transaction: decode and verify a
batch outside the store's lock (most of a bulk batch's cost), then check and store it under the
lock (`_check_and_store`, the store's own transaction), waiting for a predecessor being stored
elsewhere if asked to; count and log each refusal. `Receiver` (SQLite) and `PgReceiver`
(PostgreSQL) fill in the store."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import (
    ALARM_LANE,
    BULK_LANE,
    LANES,
    Ack,
    Batch,
    ProtocolError,
    batch_hash,
    decode_batch,
    kid_for,
    verify_batch,
)

__all__ = ["GAP_POLL_S", "VerifyingStore", "announced_keys", "registration_key"]

log = structlog.get_logger("branchsim.platform.receiver")

GAP_POLL_S = 0.005  # how often a batch waiting for its predecessor looks at the chain head again
# The longest a bulk handler stands aside, at each of its steps, for alarm handlers at work: a
# bound, so that an alarm handler waiting for its predecessor (`gap_wait_s`) does not stall the
# bulk lane with it.
YIELD_MAX_S = 0.02


def registration_key(pubkey_pem: bytes) -> bytes:
    """The kid of a gateway's Ed25519 public key (SPKI PEM) being registered; ValueError if it
    is not one."""
    key = serialization.load_pem_public_key(pubkey_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return kid_for(key)


def announced_keys(batch: Batch) -> tuple[bool, list[tuple[bytes, bytes]]]:
    """Key rotation (docs/COMMANDS.md, rotate-key) as both stores read a batch: whether it holds
    a `gateway.key_rotated` event (a batch that does is never the one that retires the old
    keys), and the (kid, SPKI PEM) of each key such an event announces; an announcement whose
    `pub` is not an Ed25519 public key is logged and skipped."""
    rotating = False
    keys: list[tuple[bytes, bytes]] = []
    for ev in batch.events:
        if ev.get("type") != "gateway.key_rotated":
            continue
        rotating = True
        attrs = ev.get("attrs") or {}
        if not isinstance(attrs, dict):
            continue
        try:
            new = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(attrs.get("pub"))))
        except ValueError:
            log.warning("platform.bad_key_rotation", gw=batch.gw, seq=batch.seq)
            continue
        keys.append((kid_for(new), new.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)))
    return rotating, keys


class _StoreLock:
    """A mutex that lets a waiting alarm-lane handler in before any waiting bulk one (and before
    queries and registrations, which wait as bulk: so does `with lock:`). `threading.Lock`
    wakes waiters in no particular order: an alarm could wait behind every bulk batch queued
    at the receiver."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._waiting = dict.fromkeys(LANES, 0)

    def acquire(self, lane: int = BULK_LANE) -> None:
        with self._cond:
            self._waiting[lane] += 1
            try:
                self._cond.wait_for(lambda: not self._held and (
                    lane == ALARM_LANE or not self._waiting[ALARM_LANE]))
            except BaseException:
                self._cond.notify_all()  # a bulk handler may be waiting on this alarm
                raise
            finally:
                self._waiting[lane] -= 1
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, lane: int) -> Iterator[None]:
        self.acquire(lane)
        try:
            yield
        finally:
            self.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def waiting(self) -> dict[int, int]:
        with self._cond:
            return dict(self._waiting)


class _AlarmsFirst:
    """The CPU for alarm handlers first. A handler holds the GIL for its Python work (decoding,
    building rows, the sqlite3 calls between statements), and an alarm's handler, which needs
    the GIL back after each of its statements, waited up to the interpreter's switch interval
    behind a bulk handler's Python each time (bench/README.md, alarm lane). So while an alarm
    is being handled (a `_Turn` started), a bulk handler waits before each of its steps
    (decoding and verifying, rows, the store), up to `yield_max_s` each. `enabled=False`:
    bulk handlers never stand aside (bench/alarm_handling.py's baseline)."""

    def __init__(self) -> None:
        self.enabled = True
        self.yield_max_s = YIELD_MAX_S
        self._cond = threading.Condition()
        self._active = 0
        self.yields = 0  # times a bulk handler stood aside (tests, diagnostics)

    def turn(self) -> _Turn:
        return _Turn(self)

    def _add(self, n: int) -> None:
        with self._cond:
            self._active += n
            if not self._active:
                self._cond.notify_all()

    def bulk_step(self) -> None:
        if not self._active or not self.enabled:  # unlocked: a turn just missed is seen at
            return                                # the next step
        with self._cond:
            if self._active:
                self.yields += 1
                self._cond.wait_for(lambda: not self._active, timeout=self.yield_max_s)


class _Turn:
    """One handler's precedence: started when its batch is an alarm's (or came on the alarm
    lane's connection: until its payload says otherwise), stopped when it is done."""

    def __init__(self, owner: _AlarmsFirst) -> None:
        self._owner = owner
        self.active = False

    def start(self) -> None:
        if not self.active:
            self.active = True
            self._owner._add(1)

    def stop(self) -> None:
        if self.active:
            self.active = False
            self._owner._add(-1)

    def step(self) -> None:
        """A bulk handler's step: stand aside while an alarm is being handled."""
        if not self.active:
            self._owner.bulk_step()


class VerifyingStore:
    """`handle_batch` for a store that provides `_rows`, `_check_and_store`, `_count` and
    `_lookup_key`. Thread-safe: `_lock` around the store, alarm-lane handlers first."""

    lanes: bool

    def __init__(self, *, lanes: bool) -> None:
        self.lanes = lanes
        self._lock = _StoreLock()
        self.alarms_first = _AlarmsFirst()
        # kid -> registered key, read outside the lock (verification runs there); emptied by
        # every change of the registry, and the registration checked again under the lock
        self._keys: dict[bytes, Ed25519PublicKey] = {}

    # --- what a store provides --------------------------------------------------------------

    def _rows(self, batch: Batch) -> list[tuple[Any, ...]]:
        """The batch's event rows, made before the lock; may raise ProtocolError."""
        raise NotImplementedError

    def _check_and_store(self, batch: Batch, data: bytes, rows: list[tuple[Any, ...]],
                         topic_gw: str | None) -> None:
        """One transaction: the chain checks (raising ProtocolError) and the store."""
        raise NotImplementedError

    def _count(self, gw: str, reason: str) -> None:
        raise NotImplementedError

    def _lookup_key(self, kid: bytes) -> Ed25519PublicKey | None:
        """The key registered under `kid`, read from the store (under the lock)."""
        raise NotImplementedError

    # --- batches --------------------------------------------------------------------------

    def _make_durable(self, lane: int) -> None:
        """Make every transaction committed so far durable, outside the store's lock; called
        before any answer leaves `handle_batch` (`lane`: the batch's, bulk when it did not
        decode). A store whose commit is durable by itself does nothing."""

    def handle_batch(self, data: bytes, topic_gw: str | None = None, *,
                     gap_wait_s: float = 0.0, urgent: bool = False) -> Ack:
        """Verify and store one batch; the Ack says ok or why not (its `h` names `data`).

        `gap_wait_s`: how long a batch ahead of its lane's chain waits (polling) for its
        predecessor before it is rejected as a gap. Receivers sharing a subscription get a
        gateway's in-flight batches round-robin, so the predecessor is often being stored by
        another receiver right now; 0 answers a gap at once (the NATS bus hands it back to the
        stream instead).

        No answer leaves before what it reports is durable (`_make_durable`): a `replay` or
        `ok` may report a transaction of another handler's that is committed but not yet
        synced.

        `urgent`: the batch came where alarm lane batches come (the alarm topic's connection):
        it goes ahead of bulk handlers' work (`_AlarmsFirst`) from the start, and keeps that
        place only if its signed payload says it is an alarm lane batch. A scheduling hint,
        nothing else: the lane is what the payload says.
        """
        turn = self.alarms_first.turn()
        if urgent:
            turn.start()
        try:
            ack, lane = self._handle_batch(data, topic_gw, gap_wait_s, turn)
            self._make_durable(lane)
        finally:
            turn.stop()
        return ack

    def _handle_batch(self, data: bytes, topic_gw: str | None,
                      gap_wait_s: float, turn: _Turn) -> tuple[Ack, int]:
        h = batch_hash(data)
        arrived = time.monotonic()
        turn.step()
        try:
            # Decoding and the signature first, outside the store's lock: they are most of a
            # bulk batch's cost, and the lock is then held only for the chain check and the
            # store, which is all an alarm lane batch waits for.
            batch = verify_batch(data, self._registered_key)
            if batch.lane != BULK_LANE and not self.lanes:
                raise ProtocolError("malformed", "payload keys")  # a decoder without lanes
            if batch.lane == ALARM_LANE:
                turn.start()
            else:
                turn.stop()
            turn.step()
            rows = self._rows(batch)
        except ProtocolError as exc:
            with self._lock:
                return self._refuse(data, topic_gw, h, exc), BULK_LANE
        deadline = arrived + gap_wait_s
        waiting = False
        while True:
            turn.step()
            with self._lock.hold(batch.lane):
                started = time.monotonic()
                try:
                    self._check_and_store(batch, data, rows, topic_gw)
                except ProtocolError as exc:
                    if exc.reason != "gap" or time.monotonic() >= deadline:
                        return self._refuse(data, topic_gw, h, exc), batch.lane
                    if not waiting:
                        waiting = True
                        log.info("platform.gap_wait", gw=batch.gw, lane=batch.lane,
                                 seq=batch.seq, detail=exc.detail)
                else:
                    log.info("platform.accepted", gw=batch.gw, lane=batch.lane, seq=batch.seq,
                             events=len(batch.events),
                             waited_ms=round((started - arrived) * 1000, 2),
                             took_ms=round((time.monotonic() - started) * 1000, 2))
                    return Ack(seq=batch.seq, h=h, ok=True), batch.lane
            # Polled: another process's commit sends no notification.
            time.sleep(GAP_POLL_S)

    def _refuse(self, data: bytes, topic_gw: str | None, h: bytes, exc: ProtocolError) -> Ack:
        """Count and log a rejection; its ack. Runs under the lock."""
        seq, gw = self._unverified_seq_gw(data, topic_gw)
        self._count(gw, exc.reason)
        log.warning("platform.rejected", gw=gw, seq=seq, reason=exc.reason, detail=exc.detail,
                    hash=h.hex()[:16])
        return Ack(seq=seq, h=h, ok=False, err=exc.reason)

    @staticmethod
    def _unverified_seq_gw(data: bytes, topic_gw: str | None) -> tuple[int, str]:
        """For a rejection's ack and counter: the claimed seq and gw, if the bytes decode."""
        try:
            batch, _, _ = decode_batch(data)
        except ProtocolError:
            return 0, topic_gw or ""
        return batch.seq, topic_gw or batch.gw

    def _registered_key(self, kid: bytes) -> Ed25519PublicKey | None:
        key = self._keys.get(kid)
        if key is None:
            with self._lock:
                key = self._lookup_key(kid)
            if key is None:
                return None
            self._keys[kid] = key
        return key

    def waiting(self) -> dict[int, int]:
        """{lane: handlers waiting for the store right now} (tests, diagnostics)."""
        return self._lock.waiting()
