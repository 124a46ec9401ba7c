"""The side state: ``chain.json`` beside the store, for what must outlive the store itself.

When a corrupt store is quarantined, the fresh one starts from this file: above the id floor (so
no id the platform may hold is handed out again) and after the last acknowledged chain head (so
the platform sees its chain continue). The file is small and written atomically (temp file,
fsync, rename, directory fsync: `agent.core.atomic.write_atomic`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.core.atomic import write_atomic
from agent.core.paths import StateLayout

__all__ = ["ID_BLOCK", "SIDE_STATE_INTERVAL", "SideState"]

log = structlog.get_logger(__name__)

ID_BLOCK = 1_000_000  # ids reserved ahead in the floor; one fsync'd write per million
SIDE_STATE_INTERVAL = 2.0  # seconds between writes of the acked chain head


class SideState:
    """``chain.json``: ``id_floor``, ``acked_seq``, ``acked_hash`` (hex)."""

    def __init__(self, state_dir: Path,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = StateLayout(state_dir).chain
        self.id_floor = 0
        self._monotonic = monotonic
        self._acked_head: tuple[int, bytes] | None = None
        self._head_written = 0.0

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("outbox.side_state_unreadable", path=str(self.path), error=str(exc))
            return {}
        return data if isinstance(data, dict) else {}

    def update(self, **changes: Any) -> None:
        data = self.read()
        data.update(changes)
        write_atomic(self.path, json.dumps(data, sort_keys=True).encode(), 0o600)

    def load(self) -> None:
        self.id_floor = int(self.read().get("id_floor", 0))

    def reserve_ids(self, last: int) -> None:
        """Called before ids up to `last` are committed: when they pass the floor, move it a
        block ahead, on disk first (if that write fails, the commit does not happen and the
        next one tries again)."""
        if last > self.id_floor:
            floor = last + ID_BLOCK
            self.update(id_floor=floor)
            self.id_floor = floor

    def acked(self, seq: int, h: bytes) -> None:
        """Batch `seq` with hash `h` was acknowledged (its delete has committed)."""
        self._acked_head = (seq, h)
        if self._monotonic() - self._head_written >= SIDE_STATE_INTERVAL:
            self.write_acked_head()

    def write_acked_head(self) -> None:
        """Record the last acknowledged chain head. Written at most every SIDE_STATE_INTERVAL
        seconds and on close: an fsync'd file per ack would double the writes of a busy
        gateway."""
        if self._acked_head is None:
            return
        seq, h = self._acked_head
        try:
            self.update(acked_seq=seq, acked_hash=h.hex())
            self._head_written = self._monotonic()
            self._acked_head = None
        except OSError as exc:
            # Best effort: the delete has committed; the next ack rewrites the side file.
            log.error("outbox.side_state_write_failed", error=str(exc))
