"""The per-gateway key that pseudonymises identifiers (HMAC; agent.runtime.pipeline): random,
kept in the state directory, never leaving the gateway."""

from __future__ import annotations

import secrets
from pathlib import Path

import structlog

from agent.core.atomic import write_atomic
from agent.core.paths import StateLayout

__all__ = ["PSEUDONYM_KEY_LEN", "load_pseudonym_key"]

log = structlog.get_logger(__name__)

PSEUDONYM_KEY_LEN = 32


def load_pseudonym_key(state_dir: Path) -> bytes:
    """A random per-gateway key for pseudonymising identifiers; never leaves the gateway.

    Created whole or not at all (agent.core.atomic). A key of any other length (an empty file
    left by a power cut under an older version, which made every pseudonym computable by
    anyone) is replaced by a new one, and said so: pseudonyms change from then on."""
    path = StateLayout(state_dir).pseudonym_key
    for _ in range(2):
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            if write_atomic(path, secrets.token_bytes(PSEUDONYM_KEY_LEN), 0o600, exclusive=True):
                log.info("pseudonym_key.created", path=str(path))
            continue  # read back what is there now (ours, or another process's)
        if len(key) == PSEUDONYM_KEY_LEN:
            return key
        log.error("pseudonym_key.invalid", path=str(path), length=len(key),
                  action="replaced by a new key; pseudonyms change from now on")
        write_atomic(path, secrets.token_bytes(PSEUDONYM_KEY_LEN), 0o600)
    return path.read_bytes()
