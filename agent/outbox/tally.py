"""The store's figures, kept in memory so that `Outbox.stats()` and the forwarder's questions
never scan a table: on a 1M backlog a GROUP BY took ~300 ms on the database thread, and alarms
queued behind it. Counted from the tables when the store opens; every write that changes them
updates the tally after its commit (tests/test_outbox.py checks that they agree)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence

from agent.core.types import ALARM

__all__ = ["EVENT_OVERHEAD", "HELD_DEPTH", "Tally"]

EVENT_OVERHEAD = 48  # bytes of row/index overhead counted per event against the quota
# (priority, events) held only in direct batches (agent.outbox.batches), not as rows
HELD_DEPTH = ("SELECT CAST(j.key AS INTEGER), SUM(j.value) FROM batches, "
              "json_each(batches.held, '$.prios') AS j WHERE batches.held IS NOT NULL "
              "GROUP BY j.key")


class Tally:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self.next_id = 1  # meta.next_id: the id the next committed event gets
        self.bytes = 0  # event bodies + EVENT_OVERHEAD each + stored batches
        self.depth: dict[int, int] = {}  # events held per priority, claimed or not
        self.unclaimed = 0
        self.unclaimed_alarms = 0
        self.batches = 0  # stored batches, not yet acknowledged
        self.first_unclaimed_at: float | None = None  # monotonic; None when none is unclaimed

    def load(self, conn: sqlite3.Connection) -> None:
        self.next_id = int(
            conn.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()[0])
        ev = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM events").fetchone()
        bt = conn.execute("SELECT COALESCE(SUM(length(data)), 0) FROM batches").fetchone()
        self.bytes = int(ev[0]) + int(ev[1]) * EVENT_OVERHEAD + int(bt[0])
        self.depth = {int(p): int(n) for p, n in
                      conn.execute("SELECT prio, COUNT(*) FROM events GROUP BY prio")}
        for p, n in conn.execute(HELD_DEPTH):
            self.depth[int(p)] = self.depth.get(int(p), 0) + int(n)
        self.unclaimed = int(
            conn.execute("SELECT COUNT(*) FROM events WHERE batch IS NULL").fetchone()[0])
        self.batches = int(conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        self.unclaimed_alarms = int(conn.execute(
            "SELECT COUNT(*) FROM events WHERE batch IS NULL AND prio=0").fetchone()[0])
        self.first_unclaimed_at = self._monotonic() if self.unclaimed else None

    def inserted(self, prios: Sequence[int], next_id: int, size: int) -> None:
        """Events of `prios` committed, taking ids up to `next_id` - 1 and `size` bytes."""
        self.next_id = next_id
        self.bytes += size
        for p in prios:
            self.depth[p] = self.depth.get(p, 0) + 1
        self.unclaimed += len(prios)
        self.unclaimed_alarms += sum(1 for p in prios if p == ALARM)
        if self.first_unclaimed_at is None:
            self.first_unclaimed_at = self._monotonic()

    def claimed(self, prios: Sequence[int], batch_size: int) -> None:
        """Events of `prios` claimed into a new stored batch of `batch_size` bytes."""
        self.bytes += batch_size
        self.unclaimed -= len(prios)
        self.unclaimed_alarms -= sum(1 for p in prios if p == ALARM)
        self.first_unclaimed_at = self._monotonic() if self.unclaimed else None
        self.batches += 1

    def acked(self, per_prio: Iterable[tuple[int, int]], freed: int) -> None:
        """A batch and its events left the store: (priority, events) pairs, `freed` bytes."""
        self.bytes -= freed
        for prio, n in per_prio:
            self.depth[prio] -= n
        self.batches -= 1

    def evicted(self, prio: int, n: int, freed: int) -> None:
        """`n` unclaimed events of `prio` evicted, `freed` bytes."""
        self.depth[prio] -= n
        self.unclaimed -= n
        self.bytes -= freed
