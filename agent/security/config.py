"""`[audit]` and `[commands]`: the config models of the security pieces, apart from the pieces
themselves, so that loading a config imports neither cryptography (the command processor) nor
the audit trail's runtime."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from agent.core.config import StrictModel

__all__ = ["AuditConfig", "CommandsConfig"]


class AuditConfig(StrictModel):
    """`[audit]`: the local audit log (the `audit.*` events go to the outbox regardless)."""

    path: Path | None = Field(default=None,
                              description="default: {gateway.state_dir}/audit/audit.log")
    max_bytes: int = Field(default=4 * 1024 * 1024, ge=4096,
                           description="rotate the log past this size")
    keep: int = Field(default=4, ge=1, le=100, description="rotated files kept")
    group: str | None = Field(default=None,
                              description="admin group that may read the log (e.g. branch-admin)")


class CommandsConfig(StrictModel):
    """`[commands]`: signed downlink commands. Off unless this table is present."""

    platform_key: Path = Field(description="the platform's command-signing public key (PEM), "
                                           "pinned at provisioning")
    max_validity_s: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600,
                                  description="refuse commands valid for longer than this")
    max_skew_s: float = Field(default=300.0, ge=0, le=3600,
                              description="tolerated clock difference for iat/exp")
    queue: int = Field(default=16, ge=1, le=1024, description="commands waiting at most")
    allow_outputs: dict[str, float] = Field(
        default_factory=dict,
        description="outputs `pulse` may drive: name -> longest pulse in seconds; empty: none")
    max_log_level_s: float = Field(default=3600.0, gt=0, le=24 * 3600)
