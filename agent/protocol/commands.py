"""Signed downlink commands on the wire (docs/COMMANDS.md): the command, its checks, and the
gateway's signed acknowledgement. Pure: bytes in, bytes out; agent.security.commands runs them.

A command is a tagged COSE_Sign1 (agent.protocol.cose) signed with the platform's command key.
Its payload names the gateway, carries a command `seq` that must increase with every command,
and a validity window. The acknowledgement is itself a COSE_Sign1, signed with the gateway's
key, so the platform knows which gateway answered and to exactly which command bytes (`h`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.protocol.cose import ProtocolError, kid_for, loads_exact, open_sign1, sign1

__all__ = [
    "COMMANDS",
    "FORMAT_VERSION",
    "MAX_COMMAND_BYTES",
    "REJECT_REASONS",
    "Command",
    "CommandAck",
    "CommandError",
    "decode_ack",
    "duration",
    "encode_ack",
    "encode_command",
    "verify_command",
]

# A signed command is a few hundred bytes; anything larger is dropped unread, by the MQTT
# uplink before buffering it and by the processor before decoding it.
MAX_COMMAND_BYTES = 16 * 1024
FORMAT_VERSION = 1
COMMANDS = frozenset({"ping", "status", "doctor", "log-level", "rotate-key", "pulse", "arm",
                      "disarm"})
REJECT_REASONS = frozenset({
    "malformed", "unknown-key", "bad-signature", "wrong-gateway", "version", "expired",
    "not-yet-valid", "too-long-valid", "clock-unsynced", "replay", "out-of-order",
    "unknown-command", "bad-args", "not-allowed", "unavailable", "failed", "busy",
})
_PAYLOAD_KEYS = frozenset({"v", "gw", "seq", "iat", "exp", "cmd", "args"})


class CommandError(ValueError):
    """A command refused; `reason` is one of `REJECT_REASONS` (the only thing the peer sees)."""

    def __init__(self, reason: str, detail: str = "", seq: int = 0) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.seq = seq


@dataclass(frozen=True)
class Command:
    kid: bytes
    gw: str
    seq: int
    iat: float
    exp: float
    cmd: str
    args: dict[str, Any]
    hash: bytes  # SHA-256 of the exact COSE bytes received


@dataclass(frozen=True)
class CommandAck:
    gw: str
    seq: int
    h: bytes
    ok: bool
    t: float
    err: str | None = None
    result: dict[str, Any] | None = None




def _loads_exact(data: bytes) -> Any:
    """One CBOR item spanning all of `data` (agent.protocol's decoder), as a CommandError."""
    try:
        return loads_exact(data, "command")
    except ProtocolError as exc:
        raise CommandError("malformed", exc.detail) from None


def _open_sign1(data: bytes, key_for_kid: Callable[[bytes], Ed25519PublicKey | None]
                ) -> tuple[bytes, bytes]:
    """Check a COSE_Sign1's size, structure, key and signature; return (kid, payload)."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError("malformed", "too large")
    try:
        return open_sign1(data, key_for_kid)
    except ProtocolError as exc:
        raise CommandError(exc.reason, exc.detail) from None


def _uint(x: object, low: int = 1) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= 2**63 - 1


def _time(x: object) -> TypeGuard[int | float]:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # a CBOR bignum longer than any double: no time at all
        return False


def duration(x: object) -> float | None:
    """A positive, finite duration, or None."""
    return float(x) if _time(x) and x > 0 else None


def encode_command(*, gw: str, seq: int, iat: float, exp: float, cmd: str,
                   args: Mapping[str, Any] | None = None) -> bytes:
    """The canonical CBOR payload of one command (sign it with `sign1`)."""
    return cbor2.dumps({"v": FORMAT_VERSION, "gw": gw, "seq": seq, "iat": float(iat),
                        "exp": float(exp), "cmd": cmd, "args": dict(args or {})},
                       canonical=True)


def verify_command(data: bytes, platform_key: Ed25519PublicKey) -> Command:
    """Structure, pinned key and signature, then the payload's shape. Raises CommandError."""
    pinned = kid_for(platform_key)
    kid, payload = _open_sign1(bytes(data), lambda k: platform_key if k == pinned else None)
    body = _loads_exact(payload)
    if not isinstance(body, dict):
        raise CommandError("malformed", "payload is not a map")
    version = body.get("v")
    if type(version) is not int or version != FORMAT_VERSION:  # a uint: not true, not 1.0
        raise CommandError("version", repr(version))
    if set(body) != _PAYLOAD_KEYS:
        raise CommandError("malformed", "payload keys")
    gw, seq, iat, exp, cmd, args = (body[k] for k in ("gw", "seq", "iat", "exp", "cmd", "args"))
    if not (isinstance(gw, str) and _uint(seq) and _time(iat) and _time(exp)
            and isinstance(cmd, str) and isinstance(args, dict)
            and all(isinstance(k, str) for k in args)):
        raise CommandError("malformed", "payload fields")
    return Command(kid=kid, gw=gw, seq=seq, iat=float(iat), exp=float(exp), cmd=cmd, args=args,
                   hash=hashlib.sha256(data).digest())


def encode_ack(key: Ed25519PrivateKey, ack: CommandAck) -> bytes:
    doc: dict[str, Any] = {"v": FORMAT_VERSION, "gw": ack.gw, "seq": ack.seq, "h": ack.h,
                           "ok": ack.ok, "t": ack.t}
    if ack.err is not None:
        doc["err"] = ack.err
    if ack.result is not None:
        doc["result"] = ack.result
    return sign1(key, cbor2.dumps(doc, canonical=True, default=_json_safe))


def _json_safe(encoder: cbor2.CBOREncoder, value: Any) -> None:
    encoder.encode(str(value))  # e.g. a Path in a status document


def decode_ack(data: bytes, gateway_key: Ed25519PublicKey) -> CommandAck:
    """Verify a cmd-ack with the gateway's public key (the platform side). Raises CommandError."""
    expected = kid_for(gateway_key)
    _kid, payload = _open_sign1(bytes(data), lambda k: gateway_key if k == expected else None)
    doc = _loads_exact(payload)
    if not (isinstance(doc, dict) and {"v", "gw", "seq", "h", "ok", "t"} <= doc.keys()):
        raise CommandError("malformed", "ack keys")
    gw, seq, h, ok, t = (doc[k] for k in ("gw", "seq", "h", "ok", "t"))
    err, result = doc.get("err"), doc.get("result")
    if not (isinstance(gw, str) and _uint(seq, 0) and isinstance(h, bytes) and len(h) == 32
            and isinstance(ok, bool) and _time(t) and (err is None or isinstance(err, str))
            and (result is None or isinstance(result, dict))):
        raise CommandError("malformed", "ack fields")
    return CommandAck(gw=gw, seq=seq, h=h, ok=ok, t=float(t), err=err, result=result)
