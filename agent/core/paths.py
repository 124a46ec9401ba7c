"""The state directory's layout (`[gateway] state_dir`, /var/lib/branch-agent on a gateway):
every file the agent keeps there, named once. `branch-agent wipe` removes this directory's
content; docs/OPERATIONS.md lists the files. The runtime directory (`[gateway] runtime_dir`,
/run/branch-agent: a tmpfs) holds what is rewritten while the agent runs and may be lost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RuntimeLayout", "StateLayout"]


@dataclass(frozen=True)
class StateLayout:
    root: Path

    @property
    def outbox(self) -> Path:
        """The SQLite outbox (and its -wal, -shm and .reserve files beside it)."""
        return self.root / "outbox.db"

    @property
    def chain(self) -> Path:
        """The id floor; outlives a quarantined store."""
        return self.root / "chain.json"

    @property
    def pseudonym_key(self) -> Path:
        """The per-gateway key that pseudonymises identifiers (never leaves the gateway)."""
        return self.root / "pseudonym.key"

    @property
    def command_seq(self) -> Path:
        """The replay guard of signed platform commands."""
        return self.root / "commands.json"

    @property
    def audit_log(self) -> Path:
        """The local audit log, unless `[audit] path` says otherwise."""
        return self.root / "audit" / "audit.log"

    @property
    def audit_forwarded(self) -> Path:
        """How far the operator commands' audit records were forwarded to the outbox."""
        return self.root / "audit-forwarded.json"


@dataclass(frozen=True)
class RuntimeLayout:
    root: Path

    @property
    def status(self) -> Path:
        """The running agent's status document, rewritten every 2 s (advisory; on a tmpfs, so
        that it costs the SD card nothing: 350 MB a day when it was in the state dir)."""
        return self.root / "status.json"
