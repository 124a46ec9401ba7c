"""Opening the store: the schema and its migrations, the check that it can be written, and the
quarantine of a store that fails its integrity check."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import structlog

from agent import protocol
from agent.outbox.db import OutboxError, configure, transaction
from agent.outbox.side import SideState
from agent.outbox.storage import Storage

__all__ = ["REFUSED_KEPT", "SCHEMA_VERSION", "new_epoch", "open_store"]

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 5
REFUSED_KEPT = 32  # refused batches kept for an operator (table `refused`), newest first


def open_store(path: Path, storage: Storage,
               side: SideState) -> tuple[sqlite3.Connection, dict[str, Any] | None]:
    """Open the store at `path`, created or migrated to SCHEMA_VERSION. A store that fails
    SQLite's quick check (or cannot be read as a database) is renamed aside and a fresh one
    starts from the side state; the second value then says why and where the old one went
    (None otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    reason: str | None = None
    conn: sqlite3.Connection | None = None
    try:
        conn = storage.connect(path)
        configure(conn)
        row = conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            reason = f"quick_check: {row[0] if row else 'no answer'}"
        else:
            _migrate(conn, path, side)
    except sqlite3.DatabaseError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    reset: dict[str, Any] | None = None
    if reason is not None:
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        quarantined = _quarantine(path)
        log.error("outbox.store_reset", reason=reason, quarantined=quarantined)
        conn = configure(storage.connect(path))
        _migrate(conn, path, side)
        reset = {"reason": reason, "quarantined": quarantined}
    assert conn is not None
    _check_writable(conn, path)
    return conn, reset


def new_epoch() -> str:
    """A chain epoch: `protocol.EPOCH_LEN` random bytes, hex."""
    return os.urandom(protocol.EPOCH_LEN).hex()


def _check_writable(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse to start on a store that cannot be written (a failing SD card remounted
    read-only): accepting readings that cannot be committed would be a lie. systemd restarts
    the agent with its rate limit; doctor and the log say why."""
    try:
        with transaction(conn):
            conn.execute("UPDATE meta SET value=value WHERE key='next_id'")
    except sqlite3.OperationalError as exc:
        conn.close()
        raise OutboxError(
            f"the outbox {path} cannot be written: {exc} (read-only filesystem?)",
            hint="check `findmnt -no OPTIONS` for the state dir and `dmesg` for SD card "
            "errors; the agent will not accept readings it cannot store",
        ) from None


def _quarantine(path: Path) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(target) + suffix))
    return str(target)


def _migrate(conn: sqlite3.Connection, path: Path, side: SideState) -> None:
    """Schema versions are applied in order inside one transaction each (user_version)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise OutboxError(
            f"{path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}",
            hint="install the agent version that wrote it, or move the file aside",
        )
    if version < 1:
        # Imported here: only a new store needs it, and it costs 2.7 MB of resident memory in
        # an agent that runs for months (bench/footprint.py, peak RSS idle).
        import sqlite_utils

        with transaction(conn):
            db = sqlite_utils.Database(conn)
            db.table("meta").create({"key": str, "value": str}, pk="key")
            # body: the event's wire encoding (CBOR map, id included), built once at commit.
            db.table("events").create(
                {"id": int, "prio": int, "t": float, "size": int, "body": bytes, "batch": int},
                pk="id",
                not_null={"prio", "t", "size", "body"},
            )
            conn.execute(
                "CREATE INDEX events_queue ON events(prio, id) WHERE batch IS NULL"
            )
            conn.execute("CREATE INDEX events_batch ON events(batch) WHERE batch IS NOT NULL")
            db.table("batches").create(
                {
                    "seq": int,
                    "hash": bytes,
                    "created": float,
                    "count": int,
                    "top_prio": int,
                    "data": bytes,
                },
                pk="seq",
                not_null={"hash", "created", "count", "top_prio", "data"},
            )
            # A new store starts a new chain (its own epoch, seq 1: docs/PROTOCOL.md 3.2); a
            # fresh store after a quarantine continues above the ids the old one handed out.
            floor = int(side.read().get("id_floor", 0))
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [
                    ("next_id", str(max(1, floor + 1))),
                    ("next_seq", "1"),
                    ("prev_hash", protocol.ZERO_HASH.hex()),
                    ("epoch", new_epoch()),
                    ("last_acked_seq", "0"),
                    ("last_acked_at", ""),
                    ("dropped", "{}"),
                ],
            )
            conn.execute("PRAGMA user_version=1")
        version = 1
    if version < 2:
        # v2: idempotency keys of ingest requests (agent.outbox.keys).
        with transaction(conn):
            conn.execute(
                "CREATE TABLE ingest_keys "
                "(key TEXT PRIMARY KEY, t REAL NOT NULL, ids TEXT NOT NULL)"
            )
            conn.execute("PRAGMA user_version=2")
        version = 2
    if version < 3:
        # v3: chain epochs (a store made before has the chain without one: epoch ''), and the
        # batches the platform refused for good, kept for an operator.
        with transaction(conn):
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('epoch', '')")
            conn.execute(
                "CREATE TABLE refused (seq INTEGER NOT NULL, epoch TEXT NOT NULL, "
                "hash BLOB NOT NULL, err TEXT NOT NULL, action TEXT NOT NULL, at REAL NOT NULL, "
                "ids TEXT NOT NULL, data BLOB NOT NULL)"
            )
            conn.execute("PRAGMA user_version=3")
        version = 3
    if version < 4:
        # v4: direct batches (agent.outbox.batches): a batch signed at commit holds its events
        # itself; `held` (JSON) names their ids, priorities and oldest time. NULL: row-backed.
        with transaction(conn):
            conn.execute("ALTER TABLE batches ADD COLUMN held TEXT")
            conn.execute("PRAGMA user_version=4")
        version = 4
    if version < 5:
        # v5: the alarm lane's chain head (docs/PROTOCOL.md 3.2; agent.outbox.batches, lanes).
        # Its batches are keyed by minus their seq in the batches table.
        with transaction(conn):
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                             [("alarm_next_seq", "1"),
                              ("alarm_prev_hash", protocol.ZERO_HASH.hex())])
            conn.execute("ALTER TABLE refused ADD COLUMN lane INTEGER NOT NULL DEFAULT 0")
            conn.execute("PRAGMA user_version=5")
