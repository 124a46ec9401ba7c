"""One audit record and the hash chain: what a record holds, the digest of its canonical JSON
(`h`, and the next record's `prev`), and who its actor is."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ZERO", "AuditRecord", "config_digest", "current_actor", "digest"]

ZERO = "0" * 64  # the `prev` of the first record ever written


@dataclass(frozen=True)
class AuditRecord:
    n: int
    t: float
    type: str
    actor: str
    pid: int
    attrs: dict[str, Any]
    prev: str
    h: str

    def body(self) -> dict[str, Any]:
        return {"n": self.n, "t": self.t, "type": self.type, "actor": self.actor,
                "pid": self.pid, "attrs": self.attrs, "prev": self.prev}


def digest(body: Mapping[str, Any]) -> str:
    """SHA-256 of `body`'s canonical JSON: a record's `h` (over everything but `h`)."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                       default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def config_digest(doc: Mapping[str, Any]) -> str:
    """SHA-256 of a configuration's canonical JSON (`cfg.model_dump(mode="json")`): what the
    `audit.config_loaded` record holds instead of the configuration itself."""
    return digest(doc)


def current_actor() -> str:
    """Who is running this process: `user(uid)`, plus the operator behind sudo if any."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    sudo = os.environ.get("SUDO_USER")
    return f"{name}({uid})" + (f" via sudo by {sudo}" if sudo else "")
