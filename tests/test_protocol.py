"""Wire protocol v1: batch and ack round trips, canonical encoding, hostile input."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import cbor2
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import (
    MAX_PAYLOAD,
    ZERO_HASH,
    ZSTD,
    Ack,
    ProtocolError,
    batch_hash,
    build_batch,
    decode_ack,
    decode_batch,
    encode_ack,
    encode_event,
    kid_for,
    open_sign1,
    sign1,
    verify_batch,
)
from agent.protocol import batches as batches_module

KEY = Ed25519PrivateKey.generate()
KID = kid_for(KEY.public_key())


def keys(kid: bytes) -> Ed25519PublicKey | None:
    return KEY.public_key() if kid == KID else None


def events(n: int, start: int = 1) -> list[bytes]:
    return [encode_event(id=i, t=1767225600.0 + i, tq=0, src="ble.t1", type="temperature",
                         v=20.0 + i / 10, u="Cel", prio=2) for i in range(start, start + n)]


def batch(seq: int = 1, prev: bytes = ZERO_HASH, evs: list[bytes] | None = None,
          gw: str = "gw1") -> bytes:
    return build_batch(key=KEY, kid=KID, gw=gw, seq=seq, prev=prev, created=1767225700.5,
                       encoded_events=events(3) if evs is None else evs)


def test_round_trip() -> None:
    """A built batch verifies and decodes to the same fields and events."""
    attrs = {"rssi": -60, "ids": [1, 2]}
    evs = [encode_event(id=9, t=1.5, tq=1, src="gpio.door", type="contact", v=True, prio=0,
                        attrs=attrs),
           encode_event(id=10, t=2.0, tq=0, src="x", type="note", v=None, prio=3)]
    data = batch(seq=7, prev=b"\x01" * 32, evs=evs)
    b = verify_batch(data, keys)
    assert (b.gw, b.seq, b.prev, b.created, b.kid) == ("gw1", 7, b"\x01" * 32, 1767225700.5, KID)
    assert b.hash == batch_hash(data)
    assert b.events == [
        {"id": 9, "t": 1.5, "tq": 1, "src": "gpio.door", "type": "contact", "v": True,
         "prio": 0, "attrs": attrs},
        {"id": 10, "t": 2.0, "tq": 0, "src": "x", "type": "note", "v": None, "prio": 3},
    ]
    decoded, protected, signature = decode_batch(data)
    assert decoded == b
    assert cbor2.loads(protected) == {1: -8, 4: KID}
    assert len(signature) == 64


def test_cose_structure() -> None:
    """The batch is tag 18 over [protected bstr, {}, payload bstr, 64-byte signature]."""
    msg = cbor2.loads(batch())
    assert msg.tag == 18
    _protected, unprotected, payload, sig = msg.value
    assert unprotected == {}
    body = cbor2.loads(payload)
    assert list(body) == ["v", "gw", "seq", "prev", "events", "created"]  # canonical order
    assert body["v"] == 1 and len(sig) == 64


def test_payload_is_canonical_cbor() -> None:
    """build_batch's concatenated payload equals cbor2's canonical encoding of the same map."""
    msg = cbor2.loads(batch())
    payload = msg.value[2]
    assert cbor2.dumps(cbor2.loads(payload), canonical=True) == payload


def test_encode_event_omits_absent_optionals() -> None:
    """`u` and `attrs` are left out when absent; the encoding is deterministic."""
    raw = encode_event(id=1, t=1.0, tq=0, src="s", type="t", v=1, prio=2)
    assert set(cbor2.loads(raw)) == {"id", "t", "tq", "src", "type", "v", "prio"}
    assert raw == encode_event(prio=2, v=1, type="t", src="s", tq=0, t=1.0, id=1)


def test_kid_is_sha256_prefix_of_raw_key() -> None:
    """kid = first 16 bytes of SHA-256 of the raw public key."""
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert hashlib.sha256(raw).digest()[:16] == KID


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:-1], "malformed"),
        (lambda d: d + b"\x00", "malformed"),
        (lambda d: b"\x01\x02", "malformed"),
        (lambda d: cbor2.dumps(cbor2.CBORTag(98, cbor2.loads(d).value)), "malformed"),
    ],
)
def test_structural_damage_is_malformed(mutate: Any, reason: str) -> None:
    """Truncated, padded, foreign or re-tagged bytes are rejected as malformed."""
    with pytest.raises(ProtocolError) as exc:
        verify_batch(mutate(batch()), keys)
    assert exc.value.reason == reason


def test_unknown_key_and_bad_signature() -> None:
    """An unregistered kid is unknown-key; a flipped payload byte is bad-signature."""
    data = batch()
    with pytest.raises(ProtocolError) as exc:
        verify_batch(data, lambda kid: None)
    assert exc.value.reason == "unknown-key"
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ProtocolError) as exc:
        verify_batch(data, lambda kid: other)
    assert exc.value.reason == "bad-signature"


def _resign(body: dict[str, Any]) -> bytes:
    """Sign an arbitrary payload map correctly (to test payload checks behind the signature)."""
    payload = cbor2.dumps(body, canonical=True)
    protected = cbor2.dumps({1: -8, 4: KID}, canonical=True)
    sig = KEY.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, sig]))


def _body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "gw": "gw1", "seq": 1, "prev": ZERO_HASH, "created": 1.0,
                            "events": [cbor2.loads(e) for e in events(1)]}
    body.update(over)
    return body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_body(v=2), "version"),
        (_body(seq=0), "malformed"),
        (_body(seq=True), "malformed"),
        (_body(prev=b"\x00" * 31), "malformed"),
        (_body(gw=""), "malformed"),
        (_body(extra=1), "malformed"),
        (_body(events=[{"id": 1}]), "malformed"),
        (_body(events=[{**cbor2.loads(events(1)[0]), "prio": 4}]), "malformed"),
        (_body(events=[{**cbor2.loads(events(1)[0]), "tq": 2}]), "malformed"),
        (_body(events=[{**cbor2.loads(events(1)[0]), "v": b"bytes"}]), "malformed"),
        (_body(events=[{**cbor2.loads(events(1)[0]), "id": 2**64}]), "malformed"),
    ],
)
def test_signed_but_invalid_payload(body: dict[str, Any], reason: str) -> None:
    """A correctly signed payload with a bad shape or version is rejected with that reason."""
    with pytest.raises(ProtocolError) as exc:
        verify_batch(_resign(body), keys)
    assert exc.value.reason == reason


def test_ack_round_trip() -> None:
    """Acks encode and decode; err only appears on negative acks."""
    h = batch_hash(b"x")
    ok = Ack(seq=3, h=h, ok=True)
    assert decode_ack(encode_ack(ok)) == ok
    assert set(cbor2.loads(encode_ack(ok))) == {"seq", "h", "ok"}
    bad = Ack(seq=3, h=h, ok=False, err="replay")
    assert decode_ack(encode_ack(bad)) == bad


@pytest.mark.parametrize(
    "doc",
    [
        {"seq": 1, "h": bytes(32)},
        {"seq": 1, "h": bytes(31), "ok": True},
        {"seq": -1, "h": bytes(32), "ok": True},
        {"seq": 1, "h": bytes(32), "ok": False},
        {"seq": 1, "h": bytes(32), "ok": True, "err": "x"},
        {"seq": 1, "h": bytes(32), "ok": 1},
        [1, 2, 3],
    ],
)
def test_bad_acks_are_malformed(doc: object) -> None:
    """Acks with missing, extra or mistyped fields are ProtocolError("malformed")."""
    with pytest.raises(ProtocolError) as exc:
        decode_ack(cbor2.dumps(doc))
    assert exc.value.reason == "malformed"


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=6) | st.integers(), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    """Random bytes never raise anything but ProtocolError from the decoders."""
    for fn in (lambda: decode_batch(data), lambda: verify_batch(data, keys),
               lambda: decode_ack(data)):
        with contextlib.suppress(ProtocolError):
            fn()


@settings(max_examples=300, deadline=None)
@given(cbor_values, st.integers(0, 3))
def test_fuzz_structured(value: Any, where: int) -> None:
    """Well-formed CBOR of the wrong shape, in any slot of a batch, is only ProtocolError."""
    parts: list[Any] = [cbor2.dumps({1: -8, 4: KID}), {}, cbor2.dumps(_body()), bytes(64)]
    parts[where] = value
    data = cbor2.dumps(cbor2.CBORTag(18, parts))
    with pytest.raises(ProtocolError):
        verify_batch(data, keys)
    with contextlib.suppress(ProtocolError):
        decode_ack(cbor2.dumps(value))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(0, 7))
def test_fuzz_bit_flips(pos: int, bit: int) -> None:
    """Any single flipped bit in a valid batch is detected (never accepted, only ProtocolError)."""
    data = bytearray(batch())
    data[pos % len(data)] ^= 1 << bit
    with pytest.raises(ProtocolError):
        verify_batch(bytes(data), keys)


def test_build_batch_speed() -> None:
    """Building a 500-event batch costs well under a millisecond plus one signature."""
    evs = events(500)
    build_batch(key=KEY, kid=KID, gw="gw1", seq=1, prev=ZERO_HASH, created=1.0,
                encoded_events=evs)
    runs = 50
    start = time.perf_counter()
    for _ in range(runs):
        build_batch(key=KEY, kid=KID, gw="gw1", seq=1, prev=ZERO_HASH, created=1.0,
                    encoded_events=evs)
    per = (time.perf_counter() - start) / runs
    assert per < 0.005, f"{per * 1000:.2f} ms per 500-event batch"  # generous for a loaded CI


# --- compressed batches (docs/PROTOCOL.md 3.1: content type "application/zstd") --------------


def zstd_batch(payload: bytes, content_type: str = ZSTD) -> bytes:
    """A signed batch whose payload is `payload` as given (already a zstd frame, or not)."""
    return sign1(KEY, payload, KID, content_type=content_type)


def test_compressed_batch_round_trip_and_size() -> None:
    """A compressed batch verifies to exactly the events of the same batch uncompressed, takes
    a fraction of its bytes, and says so in its protected header (content type 3)."""
    plain = build_batch(key=KEY, kid=KID, gw="gw-1", seq=1, prev=ZERO_HASH, created=1.0,
                        encoded_events=events(100))
    packed = build_batch(key=KEY, kid=KID, gw="gw-1", seq=1, prev=ZERO_HASH, created=1.0,
                         encoded_events=events(100), compress=True)
    a, b = verify_batch(plain, keys), verify_batch(packed, keys)
    assert (b.events, b.seq, b.gw) == (a.events, a.seq, a.gw)
    assert len(packed) < len(plain) / 3
    protected = cbor2.loads(cbor2.loads(packed).value[0])
    assert protected == {1: -8, 3: ZSTD, 4: KID}


def test_compressed_payload_is_checked_before_it_is_expanded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A payload declaring more than MAX_PAYLOAD is refused from its frame header, before any
    decompression (a 17 MiB bomb in a few hundred bytes: no decompressor is even made); a
    frame without a declared size, a frame that is not zstd, or one that ends early are
    malformed, and so are bytes after the frame (a second frame, or anything else: signed,
    they would be stored unparsed); a bit flipped in the compressed bytes is a bad signature;
    an unknown content type is malformed."""
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(MAX_PAYLOAD + 1))
    assert len(bomb) < 4096
    made: list[int] = []
    real = zstandard.ZstdDecompressor

    def counting() -> zstandard.ZstdDecompressor:
        made.append(1)
        return real()

    monkeypatch.setattr(batches_module.zstandard, "ZstdDecompressor", counting)
    with pytest.raises(ProtocolError):
        verify_batch(zstd_batch(bomb), keys)
    assert made == [], "a decompressor was made for a payload over the limit"
    monkeypatch.undo()
    unsized = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    no_size = unsized.compress(cbor2.dumps({"v": 1})) + unsized.flush()
    good = zstandard.ZstdCompressor(write_content_size=True).compress(cbor2.dumps({"v": 1}))
    plain = build_batch(key=KEY, kid=KID, gw="gw-1", seq=1, prev=ZERO_HASH, created=1.0,
                        encoded_events=events(3))
    whole = zstandard.ZstdCompressor(write_content_size=True).compress(
        cbor2.loads(plain).value[2])  # a whole, valid payload
    assert verify_batch(zstd_batch(whole), keys).seq == 1
    cases = {"bomb": zstd_batch(bomb), "no size": zstd_batch(no_size),
             "not zstd": zstd_batch(b"\x00" * 32), "short": zstd_batch(good[:-3]),
             "trailing bytes": zstd_batch(whole + b"garbage"),
             "two frames": zstd_batch(whole + whole),
             "other type": zstd_batch(good, "application/gzip")}
    for what, data in cases.items():
        with pytest.raises(ProtocolError) as exc:
            verify_batch(data, keys)
        assert exc.value.reason == "malformed", what
    packed = bytearray(build_batch(key=KEY, kid=KID, gw="gw-1", seq=1, prev=ZERO_HASH,
                                   created=1.0, encoded_events=events(20), compress=True))
    packed[-80] ^= 1
    with pytest.raises(ProtocolError) as exc:
        verify_batch(bytes(packed), keys)
    assert exc.value.reason == "bad-signature"


def test_content_type_is_refused_outside_batches() -> None:
    """Only batches may be compressed: a command or renewal envelope carrying a content type
    is malformed (one parser, each caller names what it allows)."""
    with pytest.raises(ProtocolError) as exc:
        open_sign1(zstd_batch(b"x"), keys)
    assert exc.value.reason == "malformed"
