"""A full disk. `reserve_bytes` stay allocated beside the store (``<store>.reserve``); when a
write fails for want of space, the reserve is released and the WAL restarted, so that alarms
and alerts still commit (and acks still delete) while telemetry and diagnostics are refused.
A ``gateway.disk_full`` alert records the moment; once the reserve can be allocated again,
telemetry is accepted and a ``gateway.disk_ok`` alert says so."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from agent.core.types import ALERT, Event
from agent.outbox.db import is_disk_full
from agent.outbox.storage import Storage
from agent.outbox.store import Store

__all__ = ["RECHECK_INTERVAL", "DiskFull"]

log = structlog.get_logger(__name__)

RECHECK_INTERVAL = 10.0  # s between attempts to take the reserve back while the disk is full
_R = TypeVar("_R")


class DiskFull:
    def __init__(self, storage: Storage, store_path: Path, reserve_bytes: int,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.reserve_path = store_path.with_name(store_path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        self.active = False  # only alarms and alerts are accepted
        self._monotonic = monotonic
        self._checked = 0.0

    def opened(self) -> None:
        """At open: a disk already too full for the reserve starts in the full state."""
        if not self.ensure_reserve():
            self.active = True
            self._checked = self._monotonic()

    def ensure_reserve(self) -> bool:
        """Keep `reserve_bytes` allocated beside the store. True when it is in place."""
        if self.reserve_bytes <= 0:
            return True
        try:
            self.storage.preallocate(self.reserve_path, self.reserve_bytes)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.storage.release(self.reserve_path)
            log.warning("outbox.reserve_unavailable", error=str(exc))
            return False
        return True

    def enter(self, store: Store, error: str) -> None:
        """A write failed for want of space: release the reserve and accept only alarms and
        alerts until space returns (a commit that still fails then evicts telemetry: see
        agent.outbox.commit)."""
        first = not self.active
        self.active = True
        self._checked = self._monotonic()
        self.storage.release(self.reserve_path)
        store.restart_wal()
        if first:
            log.error("outbox.disk_full", error=error, advice="free space on the state dir's "
                      "filesystem; alarms and alerts are still accepted meanwhile")
            with contextlib.suppress(sqlite3.Error, OSError):
                store.insert([Event(src="gateway", type="gateway.disk_full",
                                    v={"error": error}, t=store.wall(), prio=ALERT)])

    def check_space_back(self, store: Store) -> None:
        """While the disk is full, retry the reserve every RECHECK_INTERVAL seconds; once it
        fits, telemetry is accepted again and a gateway.disk_ok alert says so."""
        if not self.active or self._monotonic() - self._checked < RECHECK_INTERVAL:
            return
        self._checked = self._monotonic()
        if self.ensure_reserve():
            self.active = False
            log.warning("outbox.disk_ok")
            with contextlib.suppress(sqlite3.Error, OSError):
                store.insert([Event(src="gateway", type="gateway.disk_ok", v=None,
                                    t=store.wall(), prio=ALERT)])

    def retry(self, store: Store, fn: Callable[[], _R]) -> _R:
        """Run a write; on a full disk release the reserve and run it once more."""
        try:
            return fn()
        except (sqlite3.OperationalError, OSError) as exc:
            if not is_disk_full(exc):
                raise
            self.enter(store, str(exc))
            return fn()
