"""The quota: past `quota_bytes`, the lowest-priority, oldest unclaimed events are evicted
(diagnostics, then telemetry; never alarms or alerts) down to `low_watermark` of the quota, and a
``gateway.dropped`` alert committed with the delete names every evicted id. What cannot be made
room for without evicting more urgent events is refused (the caller raises RefusedError)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence

import structlog

from agent.core.types import ALERT, TELEMETRY, Event
from agent.outbox.store import Store
from agent.outbox.tally import EVENT_OVERHEAD

__all__ = ["Quota", "evict", "id_ranges"]

log = structlog.get_logger(__name__)

# Upper bound of one event's encoded size, for the room check made before encoding.
ESTIMATED_EVENT = 256


def id_ranges(ids: Iterable[int]) -> list[list[int]]:
    """[1, 2, 3, 7, 9, 10] -> [[1, 3], [7, 7], [9, 10]] (the drop record's compact form)."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


class Quota:
    def __init__(self, quota_bytes: int, low_watermark: float) -> None:
        self.quota_bytes = quota_bytes
        self.low_watermark = low_watermark

    def make_room(self, store: Store, incoming: Sequence[Event]) -> int | None:
        """Evict so that `incoming` fits under the quota. Returns None if it all fits, else the
        least urgent incoming priority that must be refused. Room for an event is never made by
        evicting events more urgent than it; alarms are never evicted and never refused (for
        them the disk is the only limit)."""
        tally = store.tally
        need = len(incoming) * (ESTIMATED_EVENT + EVENT_OVERHEAD)
        if tally.bytes + need <= self.quota_bytes:
            return None
        most_urgent = min(e.prio for e in incoming)
        target = int(self.quota_bytes * self.low_watermark) - need
        evict(store, tally.bytes - max(0, target), floor_prio=max(TELEMETRY, most_urgent))
        if tally.bytes + need <= self.quota_bytes:
            return None
        least_urgent = max(e.prio for e in incoming)
        return least_urgent if least_urgent >= TELEMETRY else None


def evict(store: Store, want: int, floor_prio: int, reason: str = "quota") -> list[int]:
    """Delete unclaimed events, priority 3 then 2 (not below `floor_prio`), oldest first,
    until `want` bytes are freed; never alarms or alerts. Per priority, the delete and the
    gateway.dropped record naming every id that went commit in one transaction."""
    freed_total = 0
    all_ids: list[int] = []
    for prio in range(3, floor_prio - 1, -1):
        if freed_total >= want:
            break
        ids: list[int] = []
        freed = 0
        for row in store.conn.execute(
            "SELECT id, size FROM events WHERE batch IS NULL AND prio=? ORDER BY id",
            (prio,),
        ):
            ids.append(int(row[0]))
            freed += int(row[1]) + EVENT_OVERHEAD
            if freed_total + freed >= want:
                break
        if not ids:
            continue
        ranges = id_ranges(ids)
        drop = Event(
            src="gateway",
            type="gateway.dropped",
            v={"reason": reason, "priority": prio, "count": len(ids), "ids": ranges},
            t=store.wall(),
            prio=ALERT,
        )

        def delete(c: sqlite3.Connection, ids: list[int] = ids) -> None:
            c.execute("DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))",
                      (json.dumps(ids),))
            dropped = json.loads(store.meta("dropped") or "{}")
            dropped[reason] = int(dropped.get(reason, 0)) + len(ids)
            store.set_meta("dropped", json.dumps(dropped))

        store.insert([drop], extra=delete)
        store.tally.evicted(prio, len(ids), freed)
        freed_total += freed
        log.warning("outbox.evicted", reason=reason, priority=prio, count=len(ids),
                    ids=ranges[:8])
        all_ids.extend(ids)
    return all_ids
