"""Idempotency keys: an append made under a key commits once. A key already committed answers
with the ids it got the first time, so a request retransmitted to a restarted agent (CoAP
ingest) or a record forwarded again after a crash (operator audit) is not stored twice.

Table ``ingest_keys(key, t, ids)``: ``t`` is the wall time of the commit and ``ids`` the JSON
pair ``[first id, count]`` (an append's ids are consecutive).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence

__all__ = ["AUDIT_KEY_TTL", "INGEST_KEY_TTL", "KeyPruner", "key_row", "known_keys",
           "record_keys"]

INGEST_KEY_TTL = 600.0  # s: longer than CoAP's EXCHANGE_LIFETIME (247 s), retransmits included
# Keys of forwarded operator audit records (agent.audit.AuditForwarder, "audit:{hash}"): the
# agent may stay down long after a crash between commit and cursor write; rare, so kept a year.
AUDIT_KEY_TTL = 365 * 86400.0
PRUNE_INTERVAL = 60.0  # s between deletes of expired keys

KeyRow = tuple[str, float, str]


def key_row(key: str, t: float, first: int, count: int) -> KeyRow:
    return (key, t, json.dumps([first, count]))


def record_keys(conn: sqlite3.Connection, rows: Sequence[KeyRow]) -> None:
    """Inside the transaction that commits the keys' events."""
    conn.executemany("INSERT OR IGNORE INTO ingest_keys(key, t, ids) VALUES (?, ?, ?)", rows)


def known_keys(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, list[int]]:
    """Keys already committed, with their ids. (A key twice in one uncommitted group is not
    looked for: aiocoap already drops retransmissions while the first is in process.)"""
    found: dict[str, list[int]] = {}
    for k in set(keys):
        row = conn.execute("SELECT ids FROM ingest_keys WHERE key=?", (k,)).fetchone()
        if row is not None:
            start, n = json.loads(row[0])
            found[k] = list(range(int(start), int(start) + int(n)))
    return found


class KeyPruner:
    """Deletes expired keys, at most every PRUNE_INTERVAL seconds."""

    def __init__(self, wall: Callable[[], float],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._pruned = 0.0

    def prune(self, conn: sqlite3.Connection) -> None:
        now = self._monotonic()
        if now - self._pruned < PRUNE_INTERVAL:
            return
        self._pruned = now
        # Best effort (one autocommit statement): an expired key that stays a while is harmless.
        with contextlib.suppress(sqlite3.Error):
            t = self._wall()
            conn.execute(
                "DELETE FROM ingest_keys WHERE t < ? OR (t < ? AND key NOT LIKE 'audit:%')",
                (t - AUDIT_KEY_TTL, t - INGEST_KEY_TTL),
            )
