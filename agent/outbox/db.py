"""The outbox's SQLite connection: its settings, the one transaction helper, the thread that
runs every database job, and the error the outbox raises in place of sqlite3's."""

from __future__ import annotations

import contextlib
import errno
import itertools
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from agent.core.errors import StoreError

__all__ = ["DbThread", "OutboxError", "configure", "is_disk_full", "reported", "transaction"]

_T = TypeVar("_T")


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


class DbThread(Executor):
    """The one thread that touches the database (sqlite3 connections are not to be shared
    across threads). Jobs run one at a time in the order they came, except that a job submitted
    with `submit_first` (the commit of an alarm) runs before every job still waiting: during a
    backlog drain the forwarder's claims and acks queue up here, and an alarm's commit waited
    for all of them (bench/README.md, alarm latency under load)."""

    _FIRST, _NEXT, _STOP = 0, 1, 2

    def __init__(self, name: str) -> None:
        self._jobs: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        return self._put(self._NEXT, fn, args, kwargs)

    def submit_first(self, fn: Callable[..., _T], /, *args: Any) -> Future[_T]:
        """Like `submit`, ahead of every job not yet started."""
        return self._put(self._FIRST, fn, args, {})

    def _put(self, rank: int, fn: Callable[..., _T], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Future[_T]:
        if self._closed:
            raise RuntimeError("the database thread is shut down")
        fut: Future[_T] = Future()
        self._jobs.put((rank, next(self._order), (fut, fn, args, kwargs)))
        return fut

    def _run(self) -> None:
        while True:
            rank, _, job = self._jobs.get()
            if rank == self._STOP:
                return
            fut, fn, args, kwargs = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever awaits the job
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The jobs already submitted run first (cancelled instead with `cancel_futures`)."""
        if not self._closed:
            self._closed = True
            if cancel_futures:
                with contextlib.suppress(queue.Empty):
                    while True:
                        _, _, job = self._jobs.get_nowait()
                        job[0].cancel()
            self._jobs.put((self._STOP, next(self._order), None))
        if wait:
            self._thread.join()
