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

from pydantic import BaseModel, SecretBytes, SecretStr

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


def config_digest(cfg: BaseModel | Mapping[str, Any]) -> str:
    """SHA-256 of a configuration's canonical JSON: what the `audit.config_loaded` record holds
    instead of the configuration itself. A model counts as `model_dump(mode="json")` with each
    secret (a BTHome bindkey) as "sha256:" and the SHA-256 of its value, not the mask pydantic
    writes: a changed secret is a changed configuration, and the digest does not reveal it."""
    if isinstance(cfg, BaseModel):
        return digest(_secrets_hashed(cfg.model_dump(mode="python"), cfg.model_dump(mode="json")))
    return digest(cfg)


def _secrets_hashed(py: Any, js: Any) -> Any:
    """`js` (a JSON dump) with the secrets of `py` (the same model's Python dump, which keeps
    them as Secret objects, in the same order) in place of their masks."""
    if isinstance(py, SecretStr | SecretBytes):
        value = py.get_secret_value()
        raw = value.encode() if isinstance(value, str) else value
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    if isinstance(py, Mapping) and isinstance(js, Mapping):
        return {k: _secrets_hashed(p, j) for (k, j), p in zip(js.items(), py.values(),
                                                                strict=True)}
    if isinstance(py, list | tuple) and isinstance(js, list):
        return [_secrets_hashed(p, j) for p, j in zip(py, js, strict=True)]
    return js


def current_actor() -> str:
    """Who is running this process: `user(uid)`, plus the operator behind sudo if any."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    sudo = os.environ.get("SUDO_USER")
    return f"{name}({uid})" + (f" via sudo by {sudo}" if sudo else "")
