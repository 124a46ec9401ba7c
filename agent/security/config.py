"""`[commands]`: the config model of signed downlink commands, apart from their processing, so
that loading a config does not import cryptography."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from agent.core.config import StrictModel

__all__ = ["CommandsConfig"]


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
