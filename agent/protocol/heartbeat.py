"""Path supervision heartbeats (docs/PROTOCOL.md 7): a signed "this path works" from the gateway
on each of its paths, and the platform's answer.

Alarm transmission is supervised per path (EN 50136-1 dual-path categories): the platform must
notice within a fixed reporting time that a path has gone silent, so every path carries a
heartbeat, the standby path too. A heartbeat is a COSE_Sign1 (agent.protocol.cose, the gateway's
batch key) over the canonical CBOR map ``{"type": "heartbeat", "v": 1, "gw": id, "path":
"mqtt" | "coap", "seq": n, "t": seconds}``. Signed, so nobody else can keep a dead path looking
alive; `path` is signed too, so a heartbeat taken off one path and played on the other is
refused; `seq` must advance per (gateway, path), so a recorded heartbeat played again is refused.

The answer is an unsigned canonical CBOR map ``{"h": SHA-256 of the heartbeat's bytes, "seq": n,
"ok": bool, "err"?: text, "last"?: uint}``: a gateway matches it by `h`; `last` (with ``err =
"replay"``) is the platform's last accepted seq on that path, from which a gateway whose seq fell
behind (a clock set back: a Pi has no RTC) continues. An answer is only a hint (forged, it can make
the gateway skip seqs forward, never reuse one); what counts is what the platform recorded.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.protocol.cose import ProtocolError, guarded, loads_exact, open_sign1, sign1

__all__ = [
    "HEARTBEAT_TYPE",
    "HEARTBEAT_VERSION",
    "PATHS",
    "Heartbeat",
    "HeartbeatAnswer",
    "build_heartbeat",
    "decode_heartbeat_answer",
    "encode_heartbeat_answer",
    "verify_heartbeat",
]

HEARTBEAT_TYPE = "heartbeat"
HEARTBEAT_VERSION = 1
PATHS = frozenset({"mqtt", "coap"})
_KEYS = frozenset({"type", "v", "gw", "path", "seq", "t"})
_MAX_SEQ = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Heartbeat:
    kid: bytes
    gw: str
    path: str
    seq: int
    t: float
    hash: bytes  # SHA-256 of the COSE bytes: what the answer names


@dataclass(frozen=True, slots=True)
class HeartbeatAnswer:
    h: bytes
    seq: int
    ok: bool
    err: str | None = None
    last: int | None = None


def build_heartbeat(key: Ed25519PrivateKey, kid: bytes, gw: str, path: str, seq: int,
                    t: float) -> bytes:
    """One signed heartbeat for `path`."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}")
    if not 1 <= seq <= _MAX_SEQ:
        raise ValueError(f"heartbeat seq {seq} out of range")
    payload = cbor2.dumps({"type": HEARTBEAT_TYPE, "v": HEARTBEAT_VERSION, "gw": gw,
                           "path": path, "seq": seq, "t": float(t)}, canonical=True)
    return sign1(key, payload, kid)


def verify_heartbeat(data: bytes, key_for_kid: Callable[[bytes], Ed25519PublicKey | None]
                     ) -> Heartbeat:
    """Structure, key, signature, then the payload's shape; raises ProtocolError ("malformed",
    "unknown-key", "bad-signature", "version"). The caller checks the gateway the key is
    registered to, the path it arrived on and that `seq` advances."""
    kid, payload = open_sign1(data, key_for_kid)

    def shape() -> Heartbeat:
        m = loads_exact(payload, "heartbeat")
        if not isinstance(m, dict) or set(m) != _KEYS or m["type"] != HEARTBEAT_TYPE:
            raise ProtocolError("malformed", "heartbeat keys")
        gw, path, seq, t, v = m["gw"], m["path"], m["seq"], m["t"], m["v"]
        if not (isinstance(gw, str) and gw and path in PATHS and type(seq) is int
                and 1 <= seq <= _MAX_SEQ and type(t) is float and math.isfinite(t)
                and type(v) is int):
            raise ProtocolError("malformed", "heartbeat field types")
        if v != HEARTBEAT_VERSION:
            raise ProtocolError("version", f"heartbeat v={v}")
        return Heartbeat(kid, gw, path, seq, t, hashlib.sha256(data).digest())

    return guarded(shape)


def encode_heartbeat_answer(answer: HeartbeatAnswer) -> bytes:
    m: dict[str, object] = {"h": answer.h, "seq": answer.seq, "ok": answer.ok}
    if not answer.ok:
        m["err"] = answer.err or "malformed"
        if answer.last is not None:
            m["last"] = answer.last
    return cbor2.dumps(m, canonical=True)


def decode_heartbeat_answer(data: bytes) -> HeartbeatAnswer:
    """Raises ProtocolError("malformed") for anything but a well-formed answer."""

    def shape() -> HeartbeatAnswer:
        m = loads_exact(data, "heartbeat answer")
        if not isinstance(m, dict) or not {"h", "seq", "ok"} <= set(m) <= {
                "h", "seq", "ok", "err", "last"}:
            raise ProtocolError("malformed", "heartbeat answer keys")
        h, seq, ok, err, last = m["h"], m["seq"], m["ok"], m.get("err"), m.get("last")
        if not (isinstance(h, bytes) and len(h) == 32 and type(seq) is int and type(ok) is bool
                and (err is None or isinstance(err, str)) and (ok == (err is None))
                and (last is None or (type(last) is int and 0 <= last <= _MAX_SEQ))):
            raise ProtocolError("malformed", "heartbeat answer fields")
        return HeartbeatAnswer(h, seq, ok, err, last)

    return guarded(shape)
