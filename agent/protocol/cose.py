"""COSE_Sign1 (RFC 9052) with EdDSA (Ed25519): the one signer and the one parser of the
project's signed messages (batches, commands, command acks, renewal requests). Pure: bytes in,
bytes out, no transport. Decoding untrusted bytes raises `ProtocolError` and nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.core import cbor

__all__ = [
    "ALG_EDDSA",
    "COSE_SIGN1_TAG",
    "KID_LEN",
    "REASONS",
    "SIG_LEN",
    "ProtocolError",
    "decode_sign1",
    "guarded",
    "kid_for",
    "loads_exact",
    "open_sign1",
    "sig_structure",
    "sign1",
]

COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
KID_LEN = 16
SIG_LEN = 64

# The reasons a platform puts in a negative ack's "err" (docs/PROTOCOL.md, "Acks").
REASONS = frozenset(
    {"malformed", "unknown-key", "bad-signature", "wrong-gateway", "gap", "fork", "replay",
     "version"}
)

_T = TypeVar("_T")


class ProtocolError(ValueError):
    """Bytes that are not a valid v1 message. `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def kid_for(public_key: Ed25519PublicKey) -> bytes:
    """Key id: the first 16 bytes of SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KID_LEN]


def _protected(kid: bytes) -> bytes:
    return cbor2.dumps({1: ALG_EDDSA, 4: kid}, canonical=True)


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The COSE Sig_structure a COSE_Sign1 signs (RFC 9052 §4.4); shared with agent.commands."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign1(key: Ed25519PrivateKey, payload: bytes, kid: bytes | None = None) -> bytes:
    """A tagged COSE_Sign1 (EdDSA) over `payload`; `kid` defaults to `kid_for` the key's
    public half (pass it when known: deriving it costs a SHA-256)."""
    protected = _protected(kid_for(key.public_key()) if kid is None else kid)
    signature = key.sign(sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


def loads_exact(data: bytes, what: str) -> Any:
    """Decode one CBOR item that must span all of `data` (trailing bytes are malformed).
    Arrays come back as lists and maps as dicts whatever the cbor2 version (agent.core.cbor)."""
    try:
        return cbor.loads_exact(data, what)
    except cbor.CBORError as exc:
        raise ProtocolError("malformed", str(exc)) from None


def _envelope(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """COSE_Sign1 structure -> (protected, kid, payload, signature). The one parser of
    COSE_Sign1 in the project: batches, commands and renewal requests all come through it."""
    msg = loads_exact(data, "cose")
    if not isinstance(msg, cbor2.CBORTag) or msg.tag != COSE_SIGN1_TAG:
        raise ProtocolError("malformed", "not a tagged COSE_Sign1")
    parts = msg.value
    if not isinstance(parts, list) or len(parts) != 4:
        raise ProtocolError("malformed", "COSE_Sign1 is not a 4-element array")
    protected, unprotected, payload, signature = parts
    if not (
        isinstance(protected, bytes) and isinstance(unprotected, dict) and not unprotected
        and isinstance(payload, bytes) and isinstance(signature, bytes)
        and len(signature) == SIG_LEN
    ):
        raise ProtocolError("malformed", "COSE_Sign1 field types")
    header = loads_exact(protected, "protected header")
    if not isinstance(header, dict) or set(header) != {1, 4}:
        raise ProtocolError("malformed", "protected header keys")
    kid = header[4]
    if header[1] != ALG_EDDSA or not isinstance(kid, bytes) or len(kid) != KID_LEN:
        raise ProtocolError("malformed", "protected header alg/kid")
    return protected, kid, payload, signature


def _open(data: bytes, key_for_kid: Callable[[bytes], Ed25519PublicKey | None]
          ) -> tuple[bytes, bytes]:
    protected, kid, payload, signature = _envelope(data)
    key = key_for_kid(kid)
    if key is None:
        raise ProtocolError("unknown-key", kid.hex())
    try:
        key.verify(signature, sig_structure(protected, payload))
    except InvalidSignature:
        raise ProtocolError("bad-signature", kid.hex()) from None
    return kid, payload


def open_sign1(data: bytes, key_for_kid: Callable[[bytes], Ed25519PublicKey | None]
               ) -> tuple[bytes, bytes]:
    """Check a COSE_Sign1's structure, key and signature, in that order; return (kid,
    payload). Raises ProtocolError ("malformed", "unknown-key", "bad-signature") only."""
    return guarded(lambda: _open(data, key_for_kid))


def decode_sign1(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """A COSE_Sign1's structure, unverified: (protected header bytes, kid, payload,
    signature). Raises ProtocolError ("malformed") only."""
    return guarded(lambda: _envelope(data))


def guarded(fn: Callable[[], _T]) -> _T:
    """Run `fn`; any exception but a ProtocolError becomes ProtocolError("malformed")."""
    try:
        return fn()
    except ProtocolError:
        raise
    except Exception as exc:  # e.g. RecursionError from a deeply nested value: still malformed
        raise ProtocolError("malformed", type(exc).__name__) from None
