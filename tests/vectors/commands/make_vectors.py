"""Regenerate the command test vectors in this directory (docs/COMMANDS.md, "Test vectors").

    .venv/bin/python tests/vectors/commands/make_vectors.py

The keys come from fixed seeds and Ed25519 signatures are deterministic, so this always writes
identical bytes; tests/test_commands.py checks that our encoder still produces exactly these.
THE KEYS HERE ARE TEST-ONLY AND PUBLIC: never pin them on a gateway.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.commands import encode_command
from agent.protocol.cose import sign1

HERE = Path(__file__).resolve().parent
GW = "gw-vector-1"
NOW = 1767225600.0  # the processor's clock when the vectors are replayed in order
ALLOW_OUTPUTS = {"door_strike": 2.0}


def seeded(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


PLATFORM = seeded("branch-agent test platform command key")
OTHER = seeded("branch-agent test attacker key")


def cmd(seq: int, name: str, args: dict[str, Any] | None = None, *, gw: str = GW,
        iat: float = NOW - 10, exp: float = NOW + 290, key: Ed25519PrivateKey = PLATFORM
        ) -> bytes:
    return sign1(key, encode_command(gw=gw, seq=seq, iat=iat, exp=exp, cmd=name, args=args))


def make() -> dict[str, bytes]:
    """Every vector file's bytes, in the order the cases are replayed."""
    ping = cmd(1, "ping")
    flipped = bytearray(ping)
    flipped[-70] ^= 0x01  # inside the payload: the signature no longer matches
    return {
        "01-ping.cose": ping,
        "02-log-level.cose": cmd(2, "log-level", {"level": "debug", "seconds": 600}),
        "03-ping-replayed.cose": ping,
        "04-pulse.cose": cmd(4, "pulse", {"output": "door_strike", "seconds": 1.5}),
        "05-status-out-of-order.cose": cmd(3, "status"),
        "06-expired.cose": cmd(10, "ping", iat=NOW - 4000, exp=NOW - 3700),
        "07-bad-signature.cose": bytes(flipped),
        "08-unsigned.cbor": encode_command(gw=GW, seq=11, iat=NOW, exp=NOW + 60, cmd="ping"),
        "09-wrong-key.cose": cmd(12, "ping", key=OTHER),
        "10-wrong-gateway.cose": cmd(13, "ping", gw="gw-other"),
        "11-pulse-not-allowed.cose": cmd(14, "pulse", {"output": "vault_lock", "seconds": 1}),
        "12-too-long-valid.cose": cmd(15, "ping", exp=NOW + 30 * 24 * 3600),
    }


# The ack each case gets, replayed in order from a fresh state (last seq 0).
RESULTS = {
    "01-ping.cose": (True, None, 1),
    "02-log-level.cose": (True, None, 2),
    "03-ping-replayed.cose": (False, "replay", 1),
    "04-pulse.cose": (True, None, 4),
    "05-status-out-of-order.cose": (False, "out-of-order", 3),
    "06-expired.cose": (False, "expired", 10),
    "07-bad-signature.cose": (False, "bad-signature", 0),
    "08-unsigned.cbor": (False, "malformed", 0),
    "09-wrong-key.cose": (False, "unknown-key", 0),
    "10-wrong-gateway.cose": (False, "wrong-gateway", 13),
    "11-pulse-not-allowed.cose": (False, "not-allowed", 14),
    "12-too-long-valid.cose": (False, "too-long-valid", 15),
}


def pem_pair(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def expected() -> dict[str, Any]:
    return {
        "gw": GW, "now": NOW, "allow_outputs": ALLOW_OUTPUTS,
        "platform_key": "platform-test.key", "platform_pub": "platform-test.pub",
        "cases": [{"file": name, "ok": ok, "err": err, "seq": seq,
                   "h": hashlib.sha256(data).hexdigest()}
                  for (name, data), (ok, err, seq) in
                  ((item, RESULTS[item[0]]) for item in make().items())],
    }


def main() -> None:
    priv, pub = pem_pair(PLATFORM)
    (HERE / "platform-test.key").write_bytes(priv)
    (HERE / "platform-test.key").chmod(0o600)
    (HERE / "platform-test.pub").write_bytes(pub)
    for name, data in make().items():
        (HERE / name).write_bytes(data)
    (HERE / "expected.json").write_text(json.dumps(expected(), indent=2) + "\n")


if __name__ == "__main__":
    main()
