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
    "decode_sign1_typed",
    "guarded",
    "kid_for",
    "loads_exact",
    "open_sign1",
    "open_sign1_typed",
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


def _protected(kid: bytes, content_type: str | None = None) -> bytes:
    header: dict[int, object] = {1: ALG_EDDSA, 4: kid}
    if content_type is not None:
        header[3] = content_type
    return cbor2.dumps(header, canonical=True)


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The COSE Sig_structure a COSE_Sign1 signs (RFC 9052 §4.4); shared with agent.commands."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign1(key: Ed25519PrivateKey, payload: bytes, kid: bytes | None = None,
          content_type: str | None = None) -> bytes:
    """A tagged COSE_Sign1 (EdDSA) over `payload`; `kid` defaults to `kid_for` the key's
    public half (pass it when known: deriving it costs a SHA-256). `content_type` (COSE header
    3, protected): how the payload is encoded, e.g. a compressed batch's "application/zstd"."""
    protected = _protected(kid_for(key.public_key()) if kid is None else kid, content_type)
    signature = key.sign(sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


def loads_exact(data: bytes, what: str) -> Any:
    """Decode one CBOR item that must span all of `data` (trailing bytes are malformed).
    Arrays come back as lists and maps as dicts whatever the cbor2 version (agent.core.cbor)."""
    try:
        return cbor.loads_exact(data, what)
    except cbor.CBORError as exc:
        raise ProtocolError("malformed", str(exc)) from None


def _envelope(data: bytes, content_types: frozenset[str] = frozenset()
              ) -> tuple[bytes, bytes, bytes, bytes, str | None]:
    """COSE_Sign1 structure -> (protected, kid, payload, signature, content type). The one
    parser of COSE_Sign1 in the project: batches, commands and renewal requests all come
    through it. A content type (header 3) is allowed only where the caller names it."""
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
    if not isinstance(header, dict) or set(header) not in ({1, 4}, {1, 3, 4}):
        raise ProtocolError("malformed", "protected header keys")
    kid, content_type = header[4], header.get(3)
    if header[1] != ALG_EDDSA or not isinstance(kid, bytes) or len(kid) != KID_LEN:
        raise ProtocolError("malformed", "protected header alg/kid")
    if 3 in header and not (isinstance(content_type, str) and content_type in content_types):
        raise ProtocolError("malformed", "protected header content type")
    return protected, kid, payload, signature, content_type


def _open(data: bytes, key_for_kid: Callable[[bytes], Ed25519PublicKey | None],
          content_types: frozenset[str] = frozenset()) -> tuple[bytes, bytes, str | None]:
    protected, kid, payload, signature, content_type = _envelope(data, content_types)
    key = key_for_kid(kid)
    if key is None:
        raise ProtocolError("unknown-key", kid.hex())
    try:
        key.verify(signature, sig_structure(protected, payload))
    except InvalidSignature:
        raise ProtocolError("bad-signature", kid.hex()) from None
    return kid, payload, content_type


def open_sign1(data: bytes, key_for_kid: Callable[[bytes], Ed25519PublicKey | None]
               ) -> tuple[bytes, bytes]:
    """Check a COSE_Sign1's structure, key and signature, in that order; return (kid,
    payload). Raises ProtocolError ("malformed", "unknown-key", "bad-signature") only."""
    kid, payload, _ = guarded(lambda: _open(data, key_for_kid))
    return kid, payload


def open_sign1_typed(data: bytes, key_for_kid: Callable[[bytes], Ed25519PublicKey | None],
                     content_types: frozenset[str]) -> tuple[bytes, bytes, str | None]:
    """`open_sign1` for messages whose payload may carry one of `content_types` (header 3):
    (kid, payload as signed, content type or None)."""
    return guarded(lambda: _open(data, key_for_kid, content_types))


def decode_sign1(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """A COSE_Sign1's structure, unverified: (protected header bytes, kid, payload,
    signature). Raises ProtocolError ("malformed") only."""
    protected, kid, payload, signature, _ = guarded(lambda: _envelope(data))
    return protected, kid, payload, signature


def decode_sign1_typed(data: bytes, content_types: frozenset[str]
                       ) -> tuple[bytes, bytes, bytes, bytes, str | None]:
    """`decode_sign1` allowing `content_types`: (protected, kid, payload, signature, type)."""
    return guarded(lambda: _envelope(data, content_types))


def guarded(fn: Callable[[], _T]) -> _T:
    """Run `fn`; any exception but a ProtocolError becomes ProtocolError("malformed")."""
    try:
        return fn()
    except ProtocolError:
        raise
    except Exception as exc:  # e.g. RecursionError from a deeply nested value: still malformed
        raise ProtocolError("malformed", type(exc).__name__) from None
