"""What the transaction of one group holds, decided on the database thread: the appends the
quota refuses (whole appends: a request is accepted as a unit), the appends whose key already
committed (they get their first ids back), and on a full disk only the alarms and alerts."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence

from agent.core.errors import RefusedError
from agent.core.types import ALERT, TELEMETRY, Event
from agent.outbox.batches import DirectClaim
from agent.outbox.db import is_disk_full
from agent.outbox.diskfull import DiskFull
from agent.outbox.keys import KeyPruner, key_row, known_keys, record_keys
from agent.outbox.quota import Quota, evict
from agent.outbox.store import Store
from agent.outbox.writer import Append, Result

__all__ = ["GroupCommit"]

# Where an append's events go in a group: (offset, count) in the events to insert, or already
# decided (a refusal, or the ids an earlier commit under the same key got).
_Slot = tuple[int, int] | list[int] | BaseException


class GroupCommit:
    def __init__(self, quota: Quota, disk: DiskFull, keys: KeyPruner) -> None:
        self.quota = quota
        self.disk = disk
        self.keys = keys
        self.refused = 0  # events refused, by the quota or a full disk

    def __call__(self, store: Store, taken: list[Append],
                 direct: Sequence[DirectClaim] = ()) -> list[Result]:
        """Commit a group: one result per append, its ids or the error it gets. On a full
        disk, alarms and alerts still commit (the reserve is released for them) and telemetry
        and diagnostics are refused until space returns. `direct`: the forwarder's offers (the
        alarm lane's first): a group that holds an alarm or has waited the offer's linger is
        signed straight into a batch (agent.outbox.batches)."""
        direct = [d for d in direct if (
            any(a.urgent for a in taken)
            or time.monotonic() - min(a.at for a in taken) >= d.linger
            or sum(len(a.events) for a in taken) >= d.max_events
        )]
        self.disk.check_space_back(store)
        if self.disk.active:
            return self._urgent_only(store, taken)
        try:
            return self._commit(store, taken, direct)
        except (sqlite3.OperationalError, OSError) as exc:
            if not is_disk_full(exc):
                raise
            self.disk.enter(store, str(exc))
            return self._urgent_only(store, taken)

    def _urgent_only(self, store: Store, taken: list[Append]) -> list[Result]:
        keep = [a for a in taken if max(e.prio for e in a.events) <= ALERT]
        done: list[Result] = []
        if keep:
            try:
                done = self._commit(store, keep)
            except (sqlite3.OperationalError, OSError) as exc:
                if not is_disk_full(exc):
                    raise
                # Something else took the space the reserve gave back. Make the write need no
                # new space: restart the WAL (its file is then reused from the start, not
                # grown) and free pages inside the store by evicting telemetry (recorded).
                store.restart_wal()
                try:
                    done = self._commit(store, keep)
                except (sqlite3.OperationalError, OSError) as again:
                    if not is_disk_full(again):
                        raise
                    with contextlib.suppress(sqlite3.Error, OSError):
                        evict(store, max(64 * 1024, store.tally.bytes // 20), TELEMETRY,
                              "disk_full")
                    store.restart_wal()
                    done = self._commit(store, keep)
        results = dict(zip(map(id, keep), done, strict=True))
        out: list[Result] = []
        for a in taken:
            if id(a) in results:
                out.append(results[id(a)])
            else:
                self.refused += len(a.events)
                out.append(RefusedError("disk full: only alarms and alerts are accepted",
                                        priority=max(e.prio for e in a.events),
                                        retry_after=60.0))
        return out

    def _commit(self, store: Store, taken: list[Append],
                direct: Sequence[DirectClaim] = ()) -> list[Result]:
        """One transaction for every append of `taken`."""
        accepted: list[Event] = []
        plan: list[_Slot] = []
        for a in taken:
            plan.append((len(accepted), len(a.events)))
            accepted.extend(a.events)
        refused = self.quota.make_room(store, accepted)
        if refused:
            # Refuse whole appends that hold a refused event (a request is accepted as a unit).
            keep: list[Event] = []
            new_plan: list[_Slot] = []
            for a, p in zip(taken, plan, strict=True):
                assert isinstance(p, tuple)
                if not a.urgent and any(e.prio >= refused for e in a.events):
                    top = max(e.prio for e in a.events)
                    self.refused += len(a.events)
                    new_plan.append(
                        RefusedError(
                            f"outbox quota reached for priority {top}",
                            priority=top,
                            retry_after=30.0,
                        )
                    )
                else:
                    new_plan.append((len(keep), len(a.events)))
                    keep.extend(a.events)
            accepted, plan = keep, new_plan
        known = known_keys(store.conn, [a.key for a in taken if a.key is not None])
        if known:
            # Already committed under this key (before a crash, or twice in this group):
            # take nothing new, answer with the first commit's ids.
            keep = []
            new_plan = []
            for a, p in zip(taken, plan, strict=True):
                if isinstance(p, tuple) and a.key in known:
                    new_plan.append(known[a.key])
                elif isinstance(p, tuple):
                    new_plan.append((len(keep), p[1]))
                    keep.extend(a.events)
                else:
                    new_plan.append(p)
            accepted, plan = keep, new_plan
        first = store.tally.next_id
        key_rows = [
            key_row(a.key, store.wall(), first + p[0], p[1])
            for a, p in zip(taken, plan, strict=True)
            if a.key is not None and isinstance(p, tuple)
        ]

        def keys(c: sqlite3.Connection) -> None:
            record_keys(c, key_rows)

        ids = (store.insert(accepted, extra=keys if key_rows else None, direct=direct)
               if accepted else [])
        out: list[Result] = []
        for p in plan:
            if isinstance(p, tuple):
                start, n = p
                out.append(ids[start : start + n])
            else:
                out.append(p)  # a refusal, or the ids of an earlier commit under the same key
        self.keys.prune(store.conn)
        return out
