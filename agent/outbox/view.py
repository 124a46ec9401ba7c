"""The store read-only, for whoever is not the agent: `branch-agent status` when the agent is
not running, the demo's final count. The database is opened with a ``mode=ro`` URI: nothing is
written, no journal is created, the agent stays its only writer. This module imports nothing
heavy (operator commands must start fast on a Pi)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.outbox.db import reported
from agent.outbox.tally import HELD_DEPTH

__all__ = ["OutboxSnapshot", "OutboxView"]


@dataclass(frozen=True, slots=True)
class OutboxSnapshot:
    depth: dict[int, int]  # events held per priority, claimed or not
    in_flight_batches: int  # stored batches not yet acknowledged
    oldest_unsent: float | None  # capture time of the oldest event in no batch
    next_id: int  # every id below it was accepted once (held, delivered or dropped)
    last_acked_seq: int
    last_acked_at: float | None
    dropped: dict[str, int]  # events evicted, per reason


class OutboxView:
    """`with OutboxView.open(path) as view: view.snapshot()`. Raises OutboxError when the file
    cannot be opened or read."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path, timeout: float = 5.0) -> OutboxView:
        with reported(f"cannot open {path} read-only"):
            return cls(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout,
                                       isolation_level=None), path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> OutboxView:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def snapshot(self) -> OutboxSnapshot:
        conn = self._conn
        with reported(f"cannot read {self.path}"):
            depth = {int(p): int(n) for p, n in conn.execute(
                "SELECT prio, COUNT(*) FROM events GROUP BY prio ORDER BY prio")}
            for p, n in self._direct(HELD_DEPTH):
                depth[int(p)] = depth.get(int(p), 0) + int(n)
            depth = dict(sorted(depth.items()))
            oldest = conn.execute("SELECT MIN(t) FROM events WHERE batch IS NULL").fetchone()[0]
            meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            batches = int(conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        return OutboxSnapshot(
            depth=depth,
            in_flight_batches=batches,
            oldest_unsent=float(oldest) if oldest is not None else None,
            next_id=int(meta.get("next_id") or 1),
            last_acked_seq=int(meta.get("last_acked_seq") or 0),
            last_acked_at=float(meta["last_acked_at"]) if meta.get("last_acked_at") else None,
            dropped={k: int(v) for k, v in json.loads(meta.get("dropped") or "{}").items()},
        )

    def held_ids(self) -> set[int]:
        """The ids of every event still in the store (as rows or in direct batches)."""
        with reported(f"cannot read {self.path}"):
            ids = {int(i) for (i,) in self._conn.execute("SELECT id FROM events")}
            for (held,) in self._direct("SELECT held FROM batches WHERE held IS NOT NULL"):
                first, last = json.loads(held)["ids"]
                ids.update(range(int(first), int(last) + 1))
            return ids

    def _direct(self, sql: str) -> list[Any]:
        """Rows of a query on direct batches; none in a store older than schema 4 (no
        ``held`` column: the agent that migrates it is not running)."""
        cols = {str(r[1]) for r in self._conn.execute("PRAGMA table_info(batches)")}
        return self._conn.execute(sql).fetchall() if "held" in cols else []
