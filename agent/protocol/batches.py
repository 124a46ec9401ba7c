"""Wire protocol v1: signed batches (COSE_Sign1, Ed25519; agent.protocol.cose) and acks. Pure:
bytes in, bytes out.

docs/PROTOCOL.md is the specification; this module is its reference implementation. It imports
no transport. cbor2 + cryptography are used directly (the hot path needs only the
Sig_structure); the test suite cross-verifies our batches with cwt, an independent COSE library.

Events are encoded once, when the outbox commits them (`encode_event`), and a batch is built by
concatenating those bytes (`build_batch`), so a retry or a rebuild yields identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.protocol.cose import (
    KID_LEN,
    ProtocolError,
    decode_sign1_typed,
    guarded,
    loads_exact,
    open_sign1_typed,
    sign1,
)

__all__ = [
    "ALARM_LANE",
    "BULK_LANE",
    "EPOCH_LEN",
    "FORMAT_VERSION",
    "LANES",
    "MAX_INT",
    "MAX_PAYLOAD",
    "ZERO_HASH",
    "ZSTD",
    "Ack",
    "Batch",
    "batch_hash",
    "build_batch",
    "decode_ack",
    "decode_batch",
    "encode_ack",
    "encode_event",
    "verify_batch",
]

FORMAT_VERSION = 1
ZERO_HASH = bytes(32)
MAX_INT = 2**63 - 1  # ids and seqs are stored as SQLite INTEGER on both sides

_EVENT_REQUIRED = frozenset({"id", "t", "tq", "src", "type", "v", "prio"})
_EVENT_KEYS = _EVENT_REQUIRED | {"u", "attrs"}
_PAYLOAD_KEYS = frozenset({"v", "gw", "seq", "prev", "created", "events"})
_PAYLOAD_OPTIONAL = frozenset({"epoch", "lane"})
EPOCH_LEN = 16  # bytes of a chain epoch (random, chosen by the gateway when its chain starts)
# Lanes (docs/PROTOCOL.md 3.2): a gateway's batches form one hash chain per lane in an epoch.
# Lane 1 carries only alarms, so that an alarm's batch is verified and stored without waiting
# for the bulk batches ahead of it; lane 0 (the payload has no `lane` key) carries the rest.
BULK_LANE, ALARM_LANE = 0, 1
LANES = (BULK_LANE, ALARM_LANE)
ZSTD = "application/zstd"  # content type (COSE header 3) of a compressed batch's payload
MAX_PAYLOAD = 16 * 1024 * 1024  # largest payload a compressed batch may expand to
ZSTD_LEVEL = 3
_BATCH_CONTENT_TYPES = frozenset({ZSTD})
_ACK_REQUIRED = frozenset({"seq", "h", "ok"})


def batch_hash(cose: bytes) -> bytes:
    """SHA-256 of a batch's complete COSE bytes: the chain link (`prev`) and the ack's `h`."""
    return hashlib.sha256(cose).digest()


def encode_event(
    *,
    id: int,
    t: float,
    tq: int,
    src: str,
    type: str,
    v: object,
    prio: int,
    u: str | None = None,
    attrs: Mapping[str, object] | None = None,
) -> bytes:
    """Canonical CBOR (RFC 7049 §3.9: keys sorted length-first) of one event map.

    Assembled from pre-encoded keys in canonical order (t, u, v, id, tq, src, prio, type,
    attrs): byte for byte what ``cbor2.dumps(event, canonical=True)`` gives (the test vectors
    pin it), at a fraction of the cost; this runs once per event on the outbox's commit path.
    """
    parts = [_MAP_HEAD[7 + (u is not None) + (attrs is not None)], _K_T, _canonical(float(t))]
    if u is not None:
        parts += (_K_U, _text(u))
    parts += (
        _K_VAL, _text(v) if isinstance(v, str) else _canonical(v),
        _K_ID, _uint(id),
        _K_TQ, _uint(tq),
        _K_SRC, _text(src),
        _K_PRIO, _uint(prio),
        _K_TYPE, _text(type),
    )
    if attrs is not None:
        parts += (_K_ATTRS, _canonical(dict(attrs)))
    return b"".join(parts)


_local = threading.local()


def _canonical(value: object) -> bytes:
    """``cbor2.dumps(value, canonical=True)`` with one encoder per thread: constructing a
    CBOREncoder costs ~3 us, ten times the encoding of a small value (bench/outbox.py)."""
    state: tuple[io.BytesIO, cbor2.CBOREncoder] | None = getattr(_local, "enc", None)
    if state is None:
        fp = io.BytesIO()
        state = _local.enc = (fp, cbor2.CBOREncoder(fp, canonical=True))
    fp, enc = state
    fp.seek(0)
    fp.truncate()
    enc.encode(value)
    return fp.getvalue()


def _head(major: int, length: int) -> bytes:
    """A CBOR initial byte and argument (RFC 8949 §3.1), shortest form."""
    mt = major << 5
    if length < 24:
        return bytes((mt | length,))
    if length < 0x100:
        return bytes((mt | 24, length))
    if length < 0x10000:
        return struct.pack(">BH", mt | 25, length)
    if length < 0x100000000:
        return struct.pack(">BI", mt | 26, length)
    return struct.pack(">BQ", mt | 27, length)


def _uint(n: int) -> bytes:
    if n.__class__ is int and 0 <= n < 2**64:
        return _head(0, n)
    return _canonical(n)  # bools, negatives: whatever cbor2 makes of them


_TEXT_CACHE: dict[str, bytes] = {}


def _text(s: str) -> bytes:
    """Encoded text, cached: sources, types and units repeat on every event."""
    out = _TEXT_CACHE.get(s)
    if out is None:
        if not isinstance(s, str):
            return _canonical(s)
        raw = s.encode()
        out = _head(3, len(raw)) + raw
        if len(_TEXT_CACHE) >= 4096:  # bounded: free-text values must not grow it forever
            _TEXT_CACHE.clear()
        _TEXT_CACHE[s] = out
    return out


_K_T, _K_U, _K_VAL, _K_ID, _K_TQ, _K_SRC, _K_PRIO, _K_TYPE, _K_ATTRS = (
    cbor2.dumps(k) for k in ("t", "u", "v", "id", "tq", "src", "prio", "type", "attrs")
)
_MAP_HEAD = {n: _head(5, n) for n in (7, 8, 9)}


# The payload map's keys in canonical order (length-first, then bytewise):
# v, gw, seq, lane, prev, epoch, events, created.
_K_V, _K_GW, _K_SEQ, _K_LANE, _K_PREV, _K_EPOCH, _K_EVENTS, _K_CREATED = (
    cbor2.dumps(k) for k in ("v", "gw", "seq", "lane", "prev", "epoch", "events", "created")
)


def build_batch(
    *,
    key: Ed25519PrivateKey,
    kid: bytes,
    gw: str,
    seq: int,
    prev: bytes,
    created: float,
    encoded_events: Sequence[bytes],
    epoch: bytes = b"",
    compress: bool = False,
    lane: int = BULK_LANE,
) -> bytes:
    """Sign one batch. The payload is assembled from the pre-encoded events (no re-encoding).
    `epoch`: the chain's epoch (`EPOCH_LEN` bytes), or empty for a chain started without one
    (stores made before epochs existed): then the payload has no ``epoch`` key. `compress`:
    the payload as a zstd frame (content type "application/zstd", docs/PROTOCOL.md 3.1).
    `lane`: the chain the batch belongs to (`ALARM_LANE` or `BULK_LANE`, which has no
    ``lane`` key, as before lanes existed)."""
    if len(prev) != 32:
        raise ValueError("prev must be 32 bytes")
    if len(kid) != KID_LEN:
        raise ValueError("kid must be 16 bytes")
    if epoch and len(epoch) != EPOCH_LEN:
        raise ValueError(f"epoch must be {EPOCH_LEN} bytes or empty")
    if lane not in LANES:
        raise ValueError(f"lane must be one of {LANES}")
    payload = b"".join(
        (
            _head(5, 6 + bool(epoch) + bool(lane)),
            _K_V, cbor2.dumps(FORMAT_VERSION),
            _K_GW, cbor2.dumps(gw),
            _K_SEQ, cbor2.dumps(seq),
            *((_K_LANE, cbor2.dumps(lane)) if lane else ()),
            _K_PREV, cbor2.dumps(prev),
            *((_K_EPOCH, cbor2.dumps(epoch)) if epoch else ()),
            _K_EVENTS, _head(4, len(encoded_events)), *encoded_events,
            _K_CREATED, cbor2.dumps(float(created), canonical=True),
        )
    )
    if compress:  # signed as sent: the platform verifies before it decompresses anything
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True,
                                          write_checksum=False).compress(payload)
        return sign1(key, packed, kid, content_type=ZSTD)
    return sign1(key, payload, kid)


@dataclass(frozen=True)
class Batch:
    """A decoded batch. `hash` is `batch_hash` of the bytes it came from."""

    kid: bytes
    gw: str
    seq: int
    prev: bytes
    created: float
    events: list[dict[str, Any]]
    hash: bytes
    epoch: bytes = b""  # empty: the chain started without an epoch (docs/PROTOCOL.md 3.2)
    lane: int = BULK_LANE  # the chain within the epoch (docs/PROTOCOL.md 3.2)


@dataclass(frozen=True)
class Ack:
    """The platform's answer to one batch. `h` names the exact bytes it verified."""

    seq: int
    h: bytes
    ok: bool
    err: str | None = None


# --- decoding untrusted bytes: everything below raises ProtocolError and nothing else ---------


def _is_uint(x: object, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= MAX_INT


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_value(x: object, depth: int = 0) -> bool:
    """JSON-compatible: null, bool, number, text, and (nested) maps with text keys and arrays."""
    if depth > 16:
        return False
    if x is None or isinstance(x, bool | str):
        return True
    if isinstance(x, int):
        return -(2**63) <= x <= MAX_INT
    if isinstance(x, float):
        return True
    if isinstance(x, dict):
        return all(isinstance(k, str) and _is_value(v, depth + 1) for k, v in x.items())
    if isinstance(x, list) and depth > 0:  # arrays only inside maps (e.g. drop-record id ranges)
        return all(_is_value(v, depth + 1) for v in x)
    return False


def _check_event(ev: object) -> dict[str, Any]:
    if not isinstance(ev, dict) or not _EVENT_REQUIRED <= ev.keys() <= _EVENT_KEYS:
        raise ProtocolError("malformed", "event keys")
    ok = (
        _is_uint(ev["id"], 1)
        and _is_number(ev["t"])
        and ev["tq"] in (0, 1) and not isinstance(ev["tq"], bool)
        and isinstance(ev["src"], str)
        and isinstance(ev["type"], str)
        and _is_value(ev["v"])
        and _is_uint(ev["prio"]) and ev["prio"] <= 3
        and isinstance(ev.get("u", ""), str)
        and (("attrs" not in ev) or (isinstance(ev["attrs"], dict) and _is_value(ev["attrs"])))
    )
    if not ok:
        raise ProtocolError("malformed", f"event fields (id={ev.get('id')!r})")
    return ev


def _unpack(payload: bytes, content_type: str | None) -> bytes:
    """The payload map's bytes: as sent, or out of one zstd frame whose declared content size
    is checked against MAX_PAYLOAD before anything is decompressed (no memory bomb). Bytes
    after the frame are refused, as trailing bytes are in an uncompressed payload (zstd
    checks that the frame holds exactly its declared size)."""
    if content_type is None:
        return payload
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError:
        raise ProtocolError("malformed", "not a zstd frame") from None
    if size < 0 or size > MAX_PAYLOAD:
        raise ProtocolError("malformed", f"zstd frame content size {size} not in 0..{MAX_PAYLOAD}")
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ProtocolError("malformed", f"zstd: {exc}") from None
    return bytes(out)


def _decode_payload(payload: bytes, kid: bytes, digest: bytes,
                    content_type: str | None = None) -> Batch:
    body = loads_exact(_unpack(payload, content_type), "payload")
    if not isinstance(body, dict):
        raise ProtocolError("malformed", "payload is not a map")
    if "v" in body and body["v"] != FORMAT_VERSION:
        raise ProtocolError("version", f"format version {body['v']!r}")
    if not _PAYLOAD_KEYS <= body.keys() <= _PAYLOAD_KEYS | _PAYLOAD_OPTIONAL:
        raise ProtocolError("malformed", "payload keys")
    gw, seq, prev, created, events = (body[k] for k in ("gw", "seq", "prev", "created", "events"))
    epoch = body.get("epoch", b"")
    lane = body.get("lane", BULK_LANE)
    if not (
        isinstance(gw, str) and gw and _is_uint(seq, 1)
        and isinstance(prev, bytes) and len(prev) == 32
        and _is_number(created) and isinstance(events, list)
        and isinstance(epoch, bytes) and len(epoch) == (EPOCH_LEN if "epoch" in body else 0)
        # lane 0 is written by leaving the key out (canonical: one encoding per batch)
        and (lane == ALARM_LANE if "lane" in body else True) and not isinstance(lane, bool)
    ):
        raise ProtocolError("malformed", "payload fields")
    checked = [_check_event(ev) for ev in events]
    if lane == ALARM_LANE and any(ev["prio"] != 0 for ev in checked):
        raise ProtocolError("malformed", "alarm lane batch holds an event that is not an alarm")
    return Batch(kid=kid, gw=gw, seq=seq, prev=prev, created=float(created), events=checked,
                 hash=digest, epoch=epoch, lane=lane)


def decode_batch(data: bytes) -> tuple[Batch, bytes, bytes]:
    """Decode without checking the signature: (batch, protected header bytes, signature)."""

    def run() -> tuple[Batch, bytes, bytes]:
        protected, kid, payload, signature, ctype = decode_sign1_typed(data, _BATCH_CONTENT_TYPES)
        return (_decode_payload(payload, kid, batch_hash(bytes(data)), ctype), protected,
                signature)

    return guarded(run)


def verify_batch(data: bytes, key_for_kid: Callable[[bytes], Ed25519PublicKey | None]) -> Batch:
    """Check structure, key and signature (in that order), then decode the payload."""

    def run() -> Batch:
        kid, payload, ctype = open_sign1_typed(data, key_for_kid, _BATCH_CONTENT_TYPES)
        return _decode_payload(payload, kid, batch_hash(bytes(data)), ctype)

    return guarded(run)


def encode_ack(ack: Ack) -> bytes:
    """Canonical CBOR of an ack; "err" only when ok is false."""
    doc: dict[str, object] = {"seq": ack.seq, "h": ack.h, "ok": ack.ok}
    if not ack.ok:
        doc["err"] = ack.err or "malformed"
    return cbor2.dumps(doc, canonical=True)


def decode_ack(data: bytes) -> Ack:
    """Decode an ack from the platform; anything unexpected is ProtocolError("malformed")."""
    doc = loads_exact(data, "ack")
    if not isinstance(doc, dict):
        raise ProtocolError("malformed", "ack is not a map")
    ok = doc.get("ok")
    allowed = _ACK_REQUIRED if ok is True else _ACK_REQUIRED | {"err"}
    if not _ACK_REQUIRED <= doc.keys() <= allowed:
        raise ProtocolError("malformed", "ack keys")
    seq, h, err = doc["seq"], doc["h"], doc.get("err")
    if not (
        _is_uint(seq) and isinstance(h, bytes) and len(h) == 32 and isinstance(ok, bool)
        and (ok or isinstance(err, str))
    ):
        raise ProtocolError("malformed", "ack fields")
    return Ack(seq=seq, h=h, ok=ok, err=err)
