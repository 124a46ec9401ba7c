"""The side state: ``chain.json`` beside the store, for what must outlive the store itself.

When a corrupt store is quarantined, the fresh one starts from this file above the id floor, so
that no id the platform may hold is handed out again. (It starts a new chain epoch: the chain
position is not kept here. An acknowledged head written now and then was stale after a crash,
and a store restarted from it forked the platform's chain for good; issue 16.) The file is small
and written atomically (temp file, fsync, rename, directory fsync:
`agent.core.atomic.write_atomic`), once per `ID_BLOCK` ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from agent.core.atomic import write_atomic
from agent.core.paths import StateLayout

__all__ = ["ID_BLOCK", "SideState"]

log = structlog.get_logger(__name__)

ID_BLOCK = 1_000_000  # ids reserved ahead in the floor; one fsync'd write per million


class SideState:
    """``chain.json``: ``id_floor``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = StateLayout(state_dir).chain
        self.id_floor = 0

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
