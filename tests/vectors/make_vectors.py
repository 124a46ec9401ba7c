"""Regenerate the protocol test vectors in this directory (docs/PROTOCOL.md, "Test vectors").

    .venv/bin/python tests/vectors/make_vectors.py          # rewrite vectors with the stored key
    .venv/bin/python tests/vectors/make_vectors.py --new-key

Ed25519 signatures are deterministic, so with the same key this writes identical bytes;
tests/test_vectors.py checks that our encoder still produces exactly these files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import (
    ALARM_LANE,
    ZERO_HASH,
    ZSTD,
    Ack,
    batch_hash,
    build_batch,
    encode_ack,
    encode_event,
    kid_for,
)

HERE = Path(__file__).resolve().parent
KEY = HERE / "test-signing.key"  # TEST ONLY: public in the repository, never use it on a gateway
PUB = HERE / "test-signing.pub"
GW = "gw-vector-1"

BATCH1_EVENTS: list[dict[str, Any]] = [
    {"id": 1, "t": 1767225600.25, "tq": 0, "src": "gpio.vault_door", "type": "contact",
     "v": True, "prio": 0},
    {"id": 2, "t": 1767225601.5, "tq": 0, "src": "ble.atm_room", "type": "temperature",
     "v": 21.5, "u": "Cel", "prio": 2, "attrs": {"rssi": -67}},
    {"id": 3, "t": 1767225602.0, "tq": 1, "src": "ups.main", "type": "ups.on_battery",
     "v": False, "prio": 1},
]
BATCH2_EVENTS: list[dict[str, Any]] = [
    {"id": 6, "t": 1767225700.0, "tq": 0, "src": "agent", "type": "gateway.dropped",
     "v": {"reason": "quota", "count": 2, "ids": [[4, 5]]}, "prio": 1},
    {"id": 7, "t": 1767225701.125, "tq": 0, "src": "serial.meter", "type": "energy",
     "v": 123456, "u": "Wh", "prio": 3},
]


# Batch 3, compressed (docs/PROTOCOL.md 3.1): the payload is a zstd frame, content type
# "application/zstd" in the protected header, the signature over the compressed bytes.
BATCH3_EVENTS: list[dict[str, Any]] = [
    {"id": 8 + i, "t": 1767225800.0 + i, "tq": 0, "src": f"ble.room{i % 4}",
     "type": "temperature", "v": 21.0 + i / 10, "u": "Cel", "prio": 2} for i in range(12)
]

# A gateway that lost its state (a new card, its key restored) rejoins: a new chain epoch from
# seq 1 with a zero prev, ids from 1 again (docs/PROTOCOL.md 3.2, 4.2).
EPOCH = bytes(range(0x10, 0x20))
EPOCH1_EVENTS: list[dict[str, Any]] = [
    {"id": 1, "t": 1767312000.5, "tq": 1, "src": "gpio.vault_door", "type": "contact",
     "v": False, "prio": 0},
]


# The alarm lane (docs/PROTOCOL.md 3.2): the same gateway and epoch, a chain of its own from seq
# 1 with a zero prev, alarms only; ids from the one sequence the bulk lane uses too.
ALARM1_EVENTS: list[dict[str, Any]] = [
    {"id": 20, "t": 1767225900.125, "tq": 0, "src": "gpio.vault_door", "type": "contact",
     "v": True, "prio": 0},
]
ALARM2_EVENTS: list[dict[str, Any]] = [
    {"id": 21, "t": 1767225901.0, "tq": 0, "src": "gpio.panic_1", "type": "panic", "v": True,
     "prio": 0},
    {"id": 22, "t": 1767225901.0, "tq": 0, "src": "gpio.panic_2", "type": "panic", "v": True,
     "prio": 0},
]
# Signed, but an alarm lane batch holding a telemetry event: refused as malformed.
ALARM_BAD_EVENTS: list[dict[str, Any]] = [
    {"id": 23, "t": 1767225902.0, "tq": 0, "src": "ble.atm_room", "type": "temperature",
     "v": 21.5, "u": "Cel", "prio": 2},
]


def load_or_create_key(new: bool) -> Ed25519PrivateKey:
    if new or not KEY.exists():
        key = Ed25519PrivateKey.generate()
        KEY.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        PUB.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    loaded = serialization.load_pem_private_key(KEY.read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    return loaded


def make(key: Ed25519PrivateKey) -> tuple[dict[str, bytes], dict[str, Any]]:
    """All vector files (name -> bytes) and the expected.json document."""
    kid = kid_for(key.public_key())
    b1 = build_batch(key=key, kid=kid, gw=GW, seq=1, prev=ZERO_HASH, created=1767225603.0,
                     encoded_events=[encode_event(**e) for e in BATCH1_EVENTS])
    b2 = build_batch(key=key, kid=kid, gw=GW, seq=2, prev=batch_hash(b1), created=1767225702.0,
                     encoded_events=[encode_event(**e) for e in BATCH2_EVENTS])
    b3 = build_batch(key=key, kid=kid, gw=GW, seq=3, prev=batch_hash(b2), created=1767225812.0,
                     encoded_events=[encode_event(**e) for e in BATCH3_EVENTS], compress=True)
    e1 = build_batch(key=key, kid=kid, gw=GW, seq=1, prev=ZERO_HASH, created=1767312001.0,
                     encoded_events=[encode_event(**e) for e in EPOCH1_EVENTS], epoch=EPOCH)
    a1 = build_batch(key=key, kid=kid, gw=GW, seq=1, prev=ZERO_HASH, created=1767225900.5,
                     encoded_events=[encode_event(**e) for e in ALARM1_EVENTS], lane=ALARM_LANE)
    a2 = build_batch(key=key, kid=kid, gw=GW, seq=2, prev=batch_hash(a1), created=1767225901.25,
                     encoded_events=[encode_event(**e) for e in ALARM2_EVENTS], lane=ALARM_LANE)
    a_bad = build_batch(key=key, kid=kid, gw=GW, seq=3, prev=batch_hash(a2),
                        created=1767225902.5, lane=ALARM_LANE,
                        encoded_events=[encode_event(**e) for e in ALARM_BAD_EVENTS])
    tampered = bytearray(b2)
    # Flip a bit inside the payload (the value 123456 of event 7): still decodes, bad signature.
    at = bytes(b2).index((123456).to_bytes(4, "big"))
    tampered[at + 3] ^= 0x01
    ack1 = encode_ack(Ack(seq=1, h=batch_hash(b1), ok=True))
    ack_replay = encode_ack(Ack(seq=2, h=batch_hash(b2), ok=False, err="replay"))
    files = {
        "batch-1.cose": b1,
        "batch-2.cose": b2,
        "batch-2-tampered.cose": bytes(tampered),
        "batch-3-zstd.cose": b3,
        "batch-epoch-1.cose": e1,
        "batch-alarm-1.cose": a1,
        "batch-alarm-2.cose": a2,
        "batch-alarm-3-telemetry.cose": a_bad,
        "ack-1.cbor": ack1,
        "ack-2-replay.cbor": ack_replay,
    }
    expected = {
        "gw": GW,
        "kid": kid.hex(),
        "public_key": "test-signing.pub",
        "batches": [
            {"file": "batch-1.cose", "result": "ok", "seq": 1, "prev": ZERO_HASH.hex(),
             "hash": batch_hash(b1).hex(), "events": BATCH1_EVENTS},
            {"file": "batch-2.cose", "result": "ok", "seq": 2, "prev": batch_hash(b1).hex(),
             "hash": batch_hash(b2).hex(), "events": BATCH2_EVENTS},
            {"file": "batch-2-tampered.cose", "result": "bad-signature",
             "hash": batch_hash(bytes(tampered)).hex()},
            {"file": "batch-3-zstd.cose", "result": "ok", "seq": 3, "prev": batch_hash(b2).hex(),
             "content_type": ZSTD, "hash": batch_hash(b3).hex(), "events": BATCH3_EVENTS},
            {"file": "batch-epoch-1.cose", "result": "ok", "seq": 1, "prev": ZERO_HASH.hex(),
             "epoch": EPOCH.hex(), "hash": batch_hash(e1).hex(), "events": EPOCH1_EVENTS},
            {"file": "batch-alarm-1.cose", "result": "ok", "seq": 1, "lane": ALARM_LANE,
             "prev": ZERO_HASH.hex(), "hash": batch_hash(a1).hex(), "events": ALARM1_EVENTS},
            {"file": "batch-alarm-2.cose", "result": "ok", "seq": 2, "lane": ALARM_LANE,
             "prev": batch_hash(a1).hex(), "hash": batch_hash(a2).hex(),
             "events": ALARM2_EVENTS},
            {"file": "batch-alarm-3-telemetry.cose", "result": "malformed", "lane": ALARM_LANE,
             "hash": batch_hash(a_bad).hex(), "events": ALARM_BAD_EVENTS},
        ],
        "acks": [
            {"file": "ack-1.cbor", "seq": 1, "h": batch_hash(b1).hex(), "ok": True},
            {"file": "ack-2-replay.cbor", "seq": 2, "h": batch_hash(b2).hex(), "ok": False,
             "err": "replay"},
        ],
    }
    return files, expected


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-key", action="store_true")
    args = ap.parse_args(argv)
    files, expected = make(load_or_create_key(args.new_key))
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(f"wrote {len(files)} vectors and expected.json to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
