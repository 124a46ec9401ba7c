"""The published test vectors: our code agrees with them (tests/compat/test_cwt.py checks them
with the independent cwt library too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.protocol import ProtocolError, decode_ack, kid_for, verify_batch
from agent.security.keys import load_public_key
from tests.vectors.make_vectors import make

VECTORS = Path(__file__).parent / "vectors"
EXPECTED: dict[str, Any] = json.loads((VECTORS / "expected.json").read_text())
PUB = load_public_key(VECTORS / EXPECTED["public_key"])


def key_for_kid(kid: bytes) -> Ed25519PublicKey | None:
    return PUB if kid == kid_for(PUB) else None


def test_kid_matches() -> None:
    """The published kid is derived from the published public key."""
    assert kid_for(PUB).hex() == EXPECTED["kid"]


@pytest.mark.parametrize("case", EXPECTED["batches"], ids=lambda c: c["file"])
def test_batches_with_our_code(case: dict[str, Any]) -> None:
    """Each vector verifies (fields and events as published) or fails with the published reason."""
    data = (VECTORS / case["file"]).read_bytes()
    if case["result"] != "ok":
        with pytest.raises(ProtocolError) as exc:
            verify_batch(data, key_for_kid)
        assert exc.value.reason == case["result"]
        return
    b = verify_batch(data, key_for_kid)
    assert (b.gw, b.seq, b.prev.hex(), b.hash.hex(), b.epoch.hex(), b.lane) == (
        EXPECTED["gw"], case["seq"], case["prev"], case["hash"], case.get("epoch", ""),
        case.get("lane", 0))
    assert b.events == case["events"]


@pytest.mark.parametrize("case", EXPECTED["acks"], ids=lambda c: c["file"])
def test_acks(case: dict[str, Any]) -> None:
    """Ack vectors decode to the published fields."""
    ack = decode_ack((VECTORS / case["file"]).read_bytes())
    assert (ack.seq, ack.h.hex(), ack.ok, ack.err) == (
        case["seq"], case["h"], case["ok"], case.get("err"))


def test_encoder_still_produces_the_vectors() -> None:
    """Regenerating with the stored key yields byte-identical files (the encoding is stable)."""
    loaded = serialization.load_pem_private_key(
        (VECTORS / "test-signing.key").read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    files, expected = make(loaded)
    for name, data in files.items():
        assert (VECTORS / name).read_bytes() == data, name
    assert expected == EXPECTED
