"""The open store, as the database thread uses it: the connection, its tally and side state,
the meta table, and the one path by which events enter the events table."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from agent import protocol
from agent.core.types import Event
from agent.outbox.db import transaction
from agent.outbox.side import SideState
from agent.outbox.tally import EVENT_OVERHEAD, Tally

__all__ = ["INSERT_ROWS", "Store"]

INSERT_ROWS = 100  # rows per INSERT statement (500 parameters; SQLite allows 32766)


def _insert_sql(rows: int) -> str:
    return ("INSERT INTO events(id, prio, t, size, body) VALUES "
            + ",".join(["(?,?,?,?,?)"] * rows))


_INSERT_MANY = _insert_sql(INSERT_ROWS)


class Store:
    """Used only on the outbox's database thread (sqlite3 connections are not to be shared
    across threads)."""

    def __init__(self, conn: sqlite3.Connection, side: SideState, tally: Tally,
                 wall: Callable[[], float]) -> None:
        self.conn = conn
        self.side = side
        self.tally = tally
        self.wall = wall

    def load(self) -> None:
        self.tally.load(self.conn)
        self.side.load()

    def meta(self, key: str) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else ""

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("UPDATE meta SET value=? WHERE key=?", (value, key))

    def insert(
        self,
        events: Sequence[Event],
        extra: Callable[[sqlite3.Connection], None] | None = None,
    ) -> list[int]:
        """Insert `events` in one transaction, with ids assigned here from meta.next_id;
        `extra` runs inside the same transaction first (an eviction and its drop record commit
        together or not at all)."""
        conn = self.conn
        first = self.tally.next_id
        last = first + len(events) - 1
        self.side.reserve_ids(last)
        rows: list[Any] = []
        added = 0
        encode = protocol.encode_event
        for i, e in enumerate(events):
            body = encode(
                id=first + i,
                t=e.t,
                tq=e.tq,
                src=e.src,
                type=e.type,
                v=e.v,
                prio=e.prio,
                u=e.u,
                attrs=e.attrs,
            )
            rows += (first + i, e.prio, e.t, len(body), body)
            added += len(body) + EVENT_OVERHEAD
        with transaction(conn):
            if extra is not None:
                extra(conn)
            # Multi-row INSERTs, not executemany: executemany takes the GIL back after every
            # row, and while the event loop runs Python that wait was the larger part of an
            # ingest commit (bench/outbox.py).
            step = INSERT_ROWS * 5
            whole = len(rows) - len(rows) % step
            for at in range(0, whole, step):
                conn.execute(_INSERT_MANY, rows[at : at + step])
            if whole < len(rows):
                conn.execute(_insert_sql((len(rows) - whole) // 5), rows[whole:])
            conn.execute("UPDATE meta SET value=? WHERE key='next_id'", (str(last + 1),))
        self.tally.inserted([e.prio for e in events], last + 1, added)
        return list(range(first, last + 1))

    def restart_wal(self) -> None:
        """Checkpoint the WAL into the store and restart it: the next transactions overwrite
        the WAL file from its start instead of growing it, so they need no free disk space."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(RESTART)")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()
