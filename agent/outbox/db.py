"""The outbox's SQLite connection: its settings, the one transaction helper, and the error the
outbox raises in place of sqlite3's."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator

from agent.core.errors import StoreError

__all__ = ["OutboxError", "configure", "is_disk_full", "reported", "transaction"]


class OutboxError(StoreError):
    """The outbox's store failed or cannot be used: a database error (I/O, a full disk, a
    corrupt page), a read-only or newer store, a closed outbox. Every `Outbox` method raises it
    instead of sqlite3.Error or a bare OSError, so callers need not know the storage engine (it
    is an OSError too, through StoreError)."""


def configure(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # Keep the WAL small: checkpoint every 256 pages (1 MiB) and truncate it back to 1 MiB
    # after a checkpoint. SQLite's default (1000 pages, never truncated) lets the WAL alone
    # take 4 MiB, all of a small SD partition's headroom, and hides a full disk until late.
    conn.execute("PRAGMA wal_autocheckpoint=256")
    conn.execute("PRAGMA journal_size_limit=1048576")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The block runs in one transaction: committed at its end, rolled back (and the error
    raised again) if the block or the COMMIT fails. IMMEDIATE takes the write lock at BEGIN, so
    a transaction that has read never fails for the lock when it comes to write."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR): then ROLLBACK fails
        # with "no transaction is active", and the first error is the one to raise.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "disk is full" in str(exc)
        )
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


@contextlib.contextmanager
def reported(what: str) -> Iterator[None]:
    """A database or OS failure in the block leaves it as an OutboxError saying `what` failed
    (errors the outbox raised on purpose pass unchanged)."""
    try:
        yield
    except StoreError:
        raise
    except (sqlite3.Error, OSError) as exc:
        hint = "free space on the state dir's filesystem" if is_disk_full(exc) else None
        raise OutboxError(f"{what}: {exc}", hint=hint) from exc
