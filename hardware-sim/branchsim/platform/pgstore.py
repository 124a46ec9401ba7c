"""The reference platform's store in PostgreSQL, for the platform at fleet scale: any number of
receivers, in any number of processes and hosts, on one database. `PgReceiver` has the API and
the answers of the SQLite `Receiver` (docs/PROTOCOL.md 4: the same checks, by the same
`rules.check_chain`, in the same order), and is what `branch-platform --store postgresql://...`
serves from.

Invariants.
- One gateway's chains are written by one transaction at a time: every transaction that stores
  a batch of a gateway, or changes its keys, first locks the gateway's row of `gateway_locks`
  (FOR UPDATE), then reads the chain state in a statement of its own, whose snapshot is taken
  after the lock is granted (READ COMMITTED), so it sees the commit of the transaction it waited
  for. Of two copies of a batch handled at once by two receivers, one is stored and the other is
  a replay; a batch whose predecessor is being stored elsewhere is a gap (or, with `gap_wait_s`,
  waits for it). Other gateways' batches do not wait: the lock is per gateway.
- A batch is stored atomically: its epoch row when it starts one, its bytes (`batches`, the
  evidence), its events and its lane's new head, in the transaction that checked it. Nothing of
  a rejected batch is stored; the rejection is counted (`rejections`).
- An event is stored once. The chain check is what keeps a batch from being stored twice, and
  a gateway never puts one event id in two batches (docs/RELIABILITY.md, P3), so the store does
  not deduplicate as the SQLite one does (INSERT OR IGNORE): events are loaded with COPY, and an
  event already stored makes the batch's transaction fail loudly (`DuplicateEventError`, logged
  as an error), nothing of the batch stored, and the batch refused as `malformed`. A store that
  dropped duplicates silently could not show exactly-once delivery; `delivered_ids` reads the
  stored batch bytes, as in SQLite.

Layout (migration 1).
- `gateway_locks (gw)`: one row per gateway ever registered, never deleted: the row every
  transaction that writes the gateway's chain or keys locks. Not the key rows themselves: a
  gateway has two keys during a rotation, and `register` deletes and inserts its keys.
- `gateways (kid, gw, pubkey, n)`: the registered keys; `n`, the order they were registered or
  announced in, tells a rotation's newest key from the older ones (SQLite's rowid).
- `chain (gw, lane, epoch, last_seq, last_hash)`: each lane's head; a head of an epoch older
  than the gateway's current one is no head.
- `epochs (n, gw, epoch, started_at, prev_*)`: the chains in the order they started, each with
  where both lanes of the chain it replaced ended (NULL: no batch in that lane).
- `batches (gw, epoch, lane, seq, hash, received_at, raw)`: the accepted batches' bytes.
- `events`: partitioned by RANGE on `captured_at`, the event's `t` as a timestamptz (a partition
  key cannot be a generated column: the receiver computes it). One partition per UTC day,
  `events_YYYYMMDD`, made for yesterday to the day after tomorrow when a receiver starts, and
  for any day within `PAST_DAYS` back a batch needs when it has none; `events_default` takes the
  rest (an unsynchronised clock's 1970, a clock years ahead). The unique key is (gw, epoch, id,
  captured_at): a partitioned table's unique key must hold the partition key. An event sent again
  has the same bytes, so the same `t`, and still collides; an id reused with another `t` is a
  gateway bug this index does not see (the evidence in `batches` does). `v` and `attrs` are JSON
  text, as in SQLite: a value may be a NaN, which jsonb refuses.
- `rejections (gw, reason, count)`.
- `schema_migrations (version, applied_at)`: the migrations applied, in order, under an
  advisory lock, so receivers starting together do not race; a database of a newer platform is
  refused (`StoreVersionError`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from psycopg import sql
from psycopg.rows import TupleRow

from agent.protocol import (
    ALARM_LANE,
    BULK_LANE,
    ZERO_HASH,
    Batch,
    ProtocolError,
    decode_batch,
)
from branchsim.platform.handling import VerifyingStore, announced_keys, registration_key
from branchsim.platform.rules import ChainState, check_chain
from branchsim.platform.store import event_row, row_event

__all__ = ["MIGRATIONS", "DuplicateEventError", "PgReceiver", "StoreVersionError", "event_rows",
           "migrate"]

log = structlog.get_logger(__name__)

Connection = psycopg.Connection[TupleRow]

PAST_DAYS = 92  # a day this far back still gets a partition (a backlog after a long outage)
FUTURE_DAYS = 2  # and this far ahead; later days, and earlier ones, go to events_default

MAX_COUNTED_GW = 256  # characters of a refused batch's claimed gateway id kept in its counter

# pg_advisory_xact_lock(LOCK_SPACE, key): ours, apart from any other user of the database's
LOCK_SPACE = 0x62726E63  # "brnc"
MIGRATION_LOCK = 1
PARTITION_LOCK = 2

# The migrations, in order: version i + 1 is MIGRATIONS[i]. Append; never edit one released.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE gateway_locks (
        gw text PRIMARY KEY
    );
    CREATE TABLE gateways (
        kid bytea PRIMARY KEY,
        gw text NOT NULL,
        pubkey bytea NOT NULL,
        n bigint GENERATED ALWAYS AS IDENTITY UNIQUE
    );
    CREATE INDEX gateways_gw ON gateways (gw, n);
    CREATE TABLE chain (
        gw text NOT NULL,
        lane smallint NOT NULL,
        epoch bytea NOT NULL,
        last_seq bigint NOT NULL,
        last_hash bytea NOT NULL,
        PRIMARY KEY (gw, lane)
    );
    CREATE TABLE epochs (
        n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        gw text NOT NULL,
        epoch bytea NOT NULL,
        started_at timestamptz NOT NULL,
        prev_epoch bytea,
        prev_seq bigint,
        prev_hash bytea,
        prev_alarm_seq bigint,
        prev_alarm_hash bytea,
        UNIQUE (gw, epoch)
    );
    CREATE INDEX epochs_gw ON epochs (gw, n);
    CREATE TABLE batches (
        gw text NOT NULL,
        epoch bytea NOT NULL,
        lane smallint NOT NULL,
        seq bigint NOT NULL,
        hash bytea NOT NULL,
        received_at timestamptz NOT NULL,
        raw bytea NOT NULL,
        PRIMARY KEY (gw, epoch, lane, seq)
    );
    CREATE TABLE events (
        gw text NOT NULL,
        epoch bytea NOT NULL,
        id bigint NOT NULL,
        t double precision NOT NULL,
        captured_at timestamptz NOT NULL,
        tq smallint NOT NULL,
        src text NOT NULL,
        type text NOT NULL,
        v text,
        u text,
        prio smallint NOT NULL,
        attrs text,
        lane smallint NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (gw, epoch, id, captured_at)
    ) PARTITION BY RANGE (captured_at);
    CREATE TABLE events_default PARTITION OF events DEFAULT;
    CREATE TABLE rejections (
        gw text NOT NULL,
        reason text NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (gw, reason)
    );
    """,
)

# The columns COPY loads, in `event_rows` order, and their types (binary COPY)
_EVENT_COLUMNS = ("gw", "epoch", "id", "t", "captured_at", "tq", "src", "type", "v", "u", "prio",
                  "attrs", "lane", "seq")
_EVENT_TYPES = ["text", "bytea", "int8", "float8", "timestamptz", "int2", "text", "text", "text",
                "text", "int2", "text", "int2", "int8"]

# Everything `check_chain` and the store need, in one statement; run after the gateway's lock
# is granted, so that its snapshot sees the transaction that held it.
_STATE = """
SELECT
    (SELECT gw FROM gateways WHERE kid = %(kid)s),
    cur.epoch,
    EXISTS (SELECT 1 FROM epochs WHERE gw = %(gw)s AND epoch = %(epoch)s),
    (SELECT hash FROM batches
      WHERE gw = %(gw)s AND epoch = %(epoch)s AND lane = %(lane)s AND seq = %(seq)s),
    b.last_seq, b.last_hash, a.last_seq, a.last_hash,
    EXISTS (SELECT 1 FROM gateways o WHERE o.gw = %(gw)s
             AND o.n < (SELECT k.n FROM gateways k WHERE k.kid = %(kid)s))
FROM (SELECT (SELECT epoch FROM epochs WHERE gw = %(gw)s ORDER BY n DESC LIMIT 1) AS epoch) cur
LEFT JOIN chain b ON b.gw = %(gw)s AND b.lane = %(bulk)s AND b.epoch = cur.epoch
LEFT JOIN chain a ON a.gw = %(gw)s AND a.lane = %(alarm)s AND a.epoch = cur.epoch
"""

_CURRENT_EPOCH = "(SELECT epoch FROM epochs WHERE gw = %s ORDER BY n DESC LIMIT 1)"


class StoreVersionError(RuntimeError):
    """The database was made or migrated by a newer platform than this one."""


class DuplicateEventError(RuntimeError):
    """A batch that passed the chain check holds an event the store already has (or holds one
    twice): a gateway bug, or a store bug, that exactly-once delivery cannot hide. Nothing of
    the batch is stored, and no ack is given: the exception is the answer."""


def migrate(conn: Connection) -> int:
    """Bring the database to the newest schema (in one transaction, under an advisory lock: of
    receivers starting together, one migrates, the others then find it done); its version."""
    newest = len(MIGRATIONS)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, MIGRATION_LOCK))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        have = int(row[0]) if row else 0
        if have > newest:
            raise StoreVersionError(
                f"the store is at schema version {have}, made by a newer platform; this one "
                f"knows versions up to {newest}: upgrade branch-gateway-sim to serve from it")
        for version in range(have + 1, newest + 1):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            log.info("platform.store_migrated", version=version)
    return newest


def _captured_at(t: float) -> datetime:
    """An event's `t` as the partition key; a time outside what a timestamp holds (year 1 to
    9999) as the nearest end of it, which the default partition takes."""
    try:
        return datetime.fromtimestamp(t, UTC)
    except (OverflowError, OSError, ValueError):
        return (datetime.min if t < 0 else datetime.max).replace(tzinfo=UTC)


def event_rows(batch: Batch) -> list[tuple[Any, ...]]:
    """The rows COPY loads (`_EVENT_COLUMNS`). PostgreSQL's text cannot hold U+0000, which a
    CBOR text may: such a batch is `malformed` here (the SQLite store would take it)."""
    texts = [batch.gw]
    rows = []
    for ev in batch.events:
        gw, epoch, id_, t, *rest = event_row(batch.gw, batch.epoch, batch.lane, batch.seq, ev)
        rows.append((gw, epoch, id_, t, _captured_at(float(t)), *rest))
        texts += (ev["src"], ev["type"], ev.get("u") or "")
    if any("\x00" in s for s in texts):
        raise ProtocolError("malformed", "a NUL character in a text (PostgreSQL cannot store it)")
    return rows


def _printable(gw: str) -> str:
    """An unverified gateway id as a rejection counter's key: without NUL, and short enough
    for an index entry (a btree's is at most about 2.7 kB; a claimed id is anyone's bytes)."""
    return gw.replace("\x00", "\\x00")[:MAX_COUNTED_GW]


class PgReceiver(VerifyingStore):
    """`Receiver`'s API and answers on a PostgreSQL database (`dsn`: postgresql://...), made
    and migrated as needed. Thread-safe: one connection, one lock around it (an alarm-lane
    handler waiting for it goes before waiting bulk ones, as in `Receiver`); several receivers,
    in threads or processes, share a database safely. A lost connection (a server restart) is
    opened again at the next call; the call that found it lost raises psycopg.OperationalError,
    with the batch's outcome unknown to it: sent again, it is stored or a replay.

    `lanes=False` answers as a platform from before lanes did (see `Receiver`)."""

    def __init__(self, dsn: str, *, lanes: bool = True) -> None:
        # The kid -> key cache (VerifyingStore) is emptied by every change of the registry made
        # here; a key another receiver retired still verifies from it, but the kid's
        # registration is read again in the transaction.
        super().__init__(lanes=lanes)
        self.dsn = dsn
        self._days: set[date] = set()  # days that have their partition of `events`
        self._closed = False
        self._db = self._connect()
        try:
            migrate(self._db)
            today = datetime.now(UTC).date()
            self._ensure_partitions(today + timedelta(days=d) for d in range(-1, FUTURE_DAYS + 1))
        except BaseException:
            self._db.close()
            raise

    def _connect(self) -> Connection:
        return psycopg.connect(self.dsn, autocommit=True, application_name="branch-platform")

    def _conn(self) -> Connection:
        """The connection, opened again if the server dropped it (not after `close`)."""
        if self._db.broken and not self._closed:
            self._db.close()
            self._db = self._connect()
            log.warning("platform.store_reconnected")
        return self._db

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()

    # --- registration ---------------------------------------------------------------------

    def register(self, gw: str, pubkey_pem: bytes) -> bytes:
        """Bind an Ed25519 public key (SPKI PEM) to a gateway id; returns its kid.
        Re-registering a gateway replaces its key (key rotation)."""
        if "\x00" in gw:
            raise ValueError("a gateway id cannot hold a NUL character")
        kid = registration_key(pubkey_pem)
        with self._lock:
            conn = self._conn()
            with conn.transaction():
                conn.execute("INSERT INTO gateway_locks (gw) VALUES (%s) ON CONFLICT DO NOTHING",
                             (gw,))
                conn.execute("SELECT 1 FROM gateway_locks WHERE gw = %s FOR UPDATE", (gw,))
                conn.execute("DELETE FROM gateways WHERE gw = %s OR kid = %s", (gw, kid))
                conn.execute("INSERT INTO gateways (kid, gw, pubkey) VALUES (%s, %s, %s)",
                             (kid, gw, pubkey_pem))
                self._keys.clear()
        return kid

    def _lookup_key(self, kid: bytes) -> Ed25519PublicKey | None:
        row = self._conn().execute("SELECT pubkey FROM gateways WHERE kid = %s",
                                   (kid,)).fetchone()
        if row is None:
            return None
        key = serialization.load_pem_public_key(bytes(row[0]))
        assert isinstance(key, Ed25519PublicKey)
        return key

    # --- batches --------------------------------------------------------------------------

    def _rows(self, batch: Batch) -> list[tuple[Any, ...]]:
        return event_rows(batch)

    def _count(self, gw: str, reason: str) -> None:
        self._conn().execute(
            "INSERT INTO rejections (gw, reason, count) VALUES (%s, %s, 1) "
            "ON CONFLICT (gw, reason) DO UPDATE SET count = rejections.count + 1",
            (_printable(gw), reason))

    def _check_and_store(self, batch: Batch, data: bytes, rows: list[tuple[Any, ...]],
                         topic_gw: str | None) -> None:
        """One transaction: the gateway's lock, the chain state, `check_chain`, the store. A
        batch holding an event already stored is refused as `malformed` (ids are unique in an
        epoch): the gateway parks it and goes on (docs/PROTOCOL.md 4.3), instead of sending it
        forever."""
        try:
            self._transaction(batch, data, rows, topic_gw)
        except DuplicateEventError as exc:
            raise ProtocolError("malformed", str(exc)) from exc

    def _transaction(self, batch: Batch, data: bytes, rows: list[tuple[Any, ...]],
                     topic_gw: str | None) -> None:
        self._ensure_partitions(row[4].date() for row in rows)
        conn = self._conn()
        with conn.transaction():  # commits, or rolls back when a check raises
            with conn.pipeline():  # one round trip: the lock, then the state read after it
                conn.execute("SELECT 1 FROM gateway_locks WHERE gw = %s FOR UPDATE", (batch.gw,))
                cur = conn.execute(_STATE, {
                    "kid": batch.kid, "gw": batch.gw, "epoch": batch.epoch, "lane": batch.lane,
                    "seq": batch.seq, "bulk": BULK_LANE, "alarm": ALARM_LANE})
            state = cur.fetchone()
            assert state is not None
            registered, current, known, stored, *ends, older_keys = state
            current = None if current is None else bytes(current)
            lane_ends = {lane: (int(s), bytes(h)) for lane, s, h in
                         ((BULK_LANE, ends[0], ends[1]), (ALARM_LANE, ends[2], ends[3]))
                         if s is not None}
            check_chain(batch, topic_gw, ChainState(
                registered_gw=registered,
                current_epoch=current,
                head=lane_ends.get(batch.lane, (0, ZERO_HASH))
                if batch.epoch == current else (0, ZERO_HASH),
                epoch_known=current == batch.epoch or bool(known),
                stored_hash=lambda: None if stored is None else bytes(stored),
            ))
            with conn.pipeline():
                if batch.epoch != current:
                    self._start_epoch(conn, batch, current, lane_ends)
                conn.execute(
                    "INSERT INTO batches (gw, epoch, lane, seq, hash, received_at, raw) "
                    "VALUES (%s, %s, %s, %s, %s, now(), %s)",
                    (batch.gw, batch.epoch, batch.lane, batch.seq, batch.hash, data))
                conn.execute(
                    "INSERT INTO chain (gw, lane, epoch, last_seq, last_hash) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (gw, lane) DO UPDATE SET "
                    "epoch = excluded.epoch, last_seq = excluded.last_seq, "
                    "last_hash = excluded.last_hash",
                    (batch.gw, batch.lane, batch.epoch, batch.seq, batch.hash))
                self._rotate_keys(conn, batch, bool(older_keys))
            self.copy_events(conn, batch, rows)

    def _start_epoch(self, conn: Connection, batch: Batch, current: bytes | None,
                     ends: dict[int, tuple[int, bytes]]) -> None:
        """The batch starts a new chain: record it and where both lanes of the one it replaces
        ended (the gap on record)."""
        bulk = ends.get(BULK_LANE, (None, None))
        alarm = ends.get(ALARM_LANE, (None, None))
        conn.execute(
            "INSERT INTO epochs (gw, epoch, started_at, prev_epoch, prev_seq, prev_hash, "
            "prev_alarm_seq, prev_alarm_hash) VALUES (%s, %s, now(), %s, %s, %s, %s, %s)",
            (batch.gw, batch.epoch, current, *bulk, *alarm))
        if current is not None:
            log.warning("platform.chain_restarted", gw=batch.gw, epoch=batch.epoch.hex(),
                        lane=batch.lane, prev_epoch=current.hex(), prev_seq=bulk[0],
                        prev_alarm_seq=alarm[0])

    def copy_events(self, conn: Connection, batch: Batch, rows: list[tuple[Any, ...]]) -> None:
        """COPY, not INSERT ... ON CONFLICT DO NOTHING: an event already stored fails the
        transaction (see the module's invariants)."""
        columns = sql.SQL(", ").join(map(sql.Identifier, _EVENT_COLUMNS))
        try:
            with conn.cursor() as cur, cur.copy(sql.SQL(
                    "COPY events ({}) FROM STDIN (FORMAT BINARY)").format(columns)) as copy:
                copy.set_types(_EVENT_TYPES)
                for row in rows:
                    copy.write_row(row)
        except psycopg.errors.UniqueViolation as exc:
            log.error("platform.duplicate_event", gw=batch.gw, epoch=batch.epoch.hex(),
                      lane=batch.lane, seq=batch.seq, detail=exc.diag.message_detail)
            raise DuplicateEventError(
                f"batch lane {batch.lane} seq {batch.seq} of {batch.gw!r} holds an event "
                f"already stored: {exc.diag.message_detail}") from exc

    def _rotate_keys(self, conn: Connection, batch: Batch, older_keys: bool) -> None:
        """Key rotation (docs/COMMANDS.md, rotate-key), as `Receiver` does it: a
        `gateway.key_rotated` event, in a batch signed by a key registered to the gateway,
        registers the announced key beside the old one; the first batch signed by the newest
        key (`older_keys`: the gateway has keys registered before it) retires the older ones."""
        rotating, announced = announced_keys(batch)
        for kid, pem in announced:
            conn.execute("INSERT INTO gateways (kid, gw, pubkey) VALUES (%s, %s, %s) "
                         "ON CONFLICT (kid) DO NOTHING", (kid, batch.gw, pem))
            log.info("platform.key_announced", gw=batch.gw, kid=kid.hex())
        if older_keys and not rotating:  # signed by the newest key: the old ones are retired
            conn.execute("DELETE FROM gateways WHERE gw = %s AND n < "
                         "(SELECT n FROM gateways WHERE kid = %s)", (batch.gw, batch.kid))
            self._keys.clear()
            log.info("platform.key_retired", gw=batch.gw, kid=batch.kid.hex())

    # --- partitions -----------------------------------------------------------------------

    def _ensure_partitions(self, days: Iterable[date]) -> None:
        """Make the daily partitions of `days` that are not known to exist, each in a
        transaction of its own before the batch's (CREATE TABLE ... PARTITION OF locks all of
        `events` for a moment: once per day and database, not per batch). Days outside
        PAST_DAYS..FUTURE_DAYS from today are left to the default partition."""
        today = datetime.now(UTC).date()
        first, last = today - timedelta(days=PAST_DAYS), today + timedelta(days=FUTURE_DAYS)
        for day in sorted(set(days) - self._days):
            if first <= day <= last:
                self._create_partition(day)
                self._days.add(day)

    def _create_partition(self, day: date) -> None:
        """CREATE TABLE IF NOT EXISTS alone is not safe against a concurrent creation of the
        same table (either may fail on the catalog's unique index): receivers take turns."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        conn = self._conn()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, PARTITION_LOCK))
                conn.execute(sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF events FOR VALUES FROM ({}) TO ({})"
                ).format(sql.Identifier(f"events_{day:%Y%m%d}"),
                         sql.Literal(start.isoformat()),
                         sql.Literal((start + timedelta(days=1)).isoformat())))
        except psycopg.errors.CheckViolation as exc:
            # The default partition holds events of that day (stored when it was far ahead):
            # they stay there, and so do the day's next ones.
            log.warning("platform.partition_in_default", day=day.isoformat(),
                        detail=exc.diag.message_primary)

    # --- queries (tests, CLI) -------------------------------------------------------------

    def _query(self, query: str, params: tuple[Any, ...] = ()) -> list[TupleRow]:
        with self._lock:
            return self._conn().execute(query, params).fetchall()

    def chain_head(self, gw: str, lane: int = BULK_LANE) -> tuple[int, bytes]:
        """(last accepted seq, its hash) of `lane` in the gateway's current epoch; (0, 32 zero
        bytes) before the lane's first batch in it."""
        rows = self._query("SELECT last_seq, last_hash FROM chain WHERE gw = %s AND lane = %s "
                           f"AND epoch = {_CURRENT_EPOCH}", (gw, lane, gw))
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else (0, ZERO_HASH)

    def epochs(self, gw: str) -> list[dict[str, Any]]:
        """The gateway's chains in the order they started (see `Receiver.epochs`)."""
        rows = self._query(
            "SELECT epoch, started_at, prev_epoch, prev_seq, prev_hash, prev_alarm_seq, "
            "prev_alarm_hash FROM epochs WHERE gw = %s ORDER BY n", (gw,))

        def end(seq: int | None, h: bytes | None) -> tuple[int | None, str | None]:
            return (None, None) if seq is None or h is None else (int(seq), bytes(h).hex())

        out: list[dict[str, Any]] = []
        for e, at, pe, ps, ph, pas, pah in rows:
            prev: dict[str, Any] | None = None
            if pe is not None:
                (seq, h), (alarm_seq, alarm_h) = end(ps, ph), end(pas, pah)
                prev = {"epoch": bytes(pe).hex(), "seq": seq, "hash": h, "alarm_seq": alarm_seq,
                        "alarm_hash": alarm_h}
            out.append({"epoch": bytes(e).hex(), "started_at": at.timestamp(), "prev": prev})
        return out

    def events(self, gw: str | None = None) -> list[dict[str, Any]]:
        """Stored events ordered by gateway, then epoch (in the order the chains started),
        then id (both lanes together: they share the ids)."""
        query = ("SELECT e.gw, e.epoch, e.id, e.t, e.tq, e.src, e.type, e.v, e.u, e.prio, "
                 "e.attrs, e.lane, e.seq FROM events e JOIN epochs p ON p.gw = e.gw "
                 "AND p.epoch = e.epoch")
        if gw is None:
            return [row_event(r) for r in self._query(query + " ORDER BY e.gw, p.n, e.id")]
        return [row_event(r) for r in
                self._query(query + " WHERE e.gw = %s ORDER BY p.n, e.id", (gw,))]

    def delivered_ids(self, gw: str) -> list[int]:
        """Every event id in every batch accepted from `gw`, in chain order, read back from the
        stored batch bytes (see `Receiver.delivered_ids`)."""
        raws = [bytes(r) for (r,) in self._query(
            "SELECT b.raw FROM batches b JOIN epochs p ON p.gw = b.gw AND p.epoch = b.epoch "
            "WHERE b.gw = %s ORDER BY p.n, b.lane, b.seq", (gw,))]
        return [int(e["id"]) for raw in raws for e in decode_batch(raw)[0].events]

    def counters(self) -> dict[tuple[str, str], int]:
        """Rejections by (gw, reason)."""
        return {(gw, reason): int(n) for gw, reason, n in
                self._query("SELECT gw, reason, count FROM rejections")}

    def batch_count(self, gw: str, lane: int | None = None) -> int:
        """Batches accepted from `gw`, in every epoch: of `lane`, or of all lanes (None)."""
        if lane is None:
            rows = self._query("SELECT count(*) FROM batches WHERE gw = %s", (gw,))
        else:
            rows = self._query("SELECT count(*) FROM batches WHERE gw = %s AND lane = %s",
                               (gw, lane))
        return int(rows[0][0])

    def public_key(self, kid: bytes) -> Ed25519PublicKey | None:
        with self._lock:
            return self._lookup_key(kid)
