"""Signing key files: created private (0600) and atomically, refused when unsafe; and no
private key in the repository but the TEST-ONLY ones under tests/."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from agent.protocol import kid_for
from agent.security.keys import (
    KeyExistsError,
    KeyFileError,
    generate_keypair,
    load_private_key,
    load_public_key,
)


def test_generate_and_load(tmp_path: Path) -> None:
    """generate_keypair writes a 0600 PKCS8 key and an SPKI public key that load back."""
    with capture_logs() as logs:
        info = generate_keypair(tmp_path)
    priv = tmp_path / "signing.key"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    key = load_private_key(priv)
    pub = load_public_key(tmp_path / "signing.pub")
    assert kid_for(key.public_key()) == kid_for(pub) == info.kid
    assert info.fingerprint.startswith("SHA256:") and len(info.fingerprint) == 7 + 64
    assert info.fingerprint[7:].startswith(info.kid.hex())
    assert info.public_pem == (tmp_path / "signing.pub").read_bytes()
    assert not any("PRIVATE" in str(entry) for entry in logs)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_key_private_even_with_permissive_umask(tmp_path: Path) -> None:
    """With umask 000 the private key is still created 0600 (never world-readable)."""
    old = os.umask(0)
    try:
        generate_keypair(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "signing.key").stat().st_mode) == 0o600


def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    """An existing key is kept unless force=True; the error is a FileExistsError too."""
    first = generate_keypair(tmp_path)
    with pytest.raises(KeyExistsError) as exc:
        generate_keypair(tmp_path)
    assert isinstance(exc.value, FileExistsError) and "--force" in str(exc.value)
    assert kid_for(load_private_key(tmp_path / "signing.key").public_key()) == first.kid
    second = generate_keypair(tmp_path, force=True)
    assert second.kid != first.kid


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_refuses_group_or_world_access(tmp_path: Path, mode: int) -> None:
    """A key readable or writable by group/others is refused with a chmod hint."""
    generate_keypair(tmp_path)
    priv = tmp_path / "signing.key"
    priv.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(priv)


def test_missing_and_wrong_files(tmp_path: Path) -> None:
    """Missing or non-key files give KeyFileError without quoting the file's content."""
    with pytest.raises(KeyFileError, match="does not exist"):
        load_private_key(tmp_path / "nope.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"secret-looking junk")
    junk.chmod(0o600)
    with pytest.raises(KeyFileError) as exc:
        load_private_key(junk)
    assert "secret-looking" not in str(exc.value)
    with pytest.raises(KeyFileError):
        load_public_key(junk)


# --- ETSI EN 303 645 5.4-2: no private key in what ships; the test keys say TEST-ONLY

ROOT = Path(__file__).resolve().parents[1]
MARKER = "TEST-ONLY"
_NL = rb"(?:\r?\n|\\n)"  # a newline, or "\n" inside a string literal
# The armour around a base64 body: prose naming the armour (docs, this file) is no finding.
# Any kind: PKCS#8, encrypted PKCS#8, RSA/EC/DSA (with RFC 1421 headers when encrypted), OpenSSH.
_PEM = re.compile(
    rb"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----" + _NL
    + rb"(?:[A-Za-z-]+: [^\r\n\\]*" + _NL + rb")*(?:" + _NL + rb")?"
    + rb"(?:[A-Za-z0-9+/=]{4,}" + _NL + rb")+-----END \1PRIVATE KEY-----"
)
_PUTTY = re.compile(rb"(?m)^PuTTY-User-Key-File-\d+: ")
# An Ed25519 PKCS#8 key without armour: RFC 8410's fixed 16-byte DER prefix and the 32-byte
# seed, as raw bytes, hex or base64.
_PKCS8_ED25519 = re.compile(
    rb"(?s)\x30\x2e\x02\x01\x00\x30\x05\x06\x03\x2b\x65\x70\x04\x22\x04\x20.{32}"
    rb"|302e020100300506032b657004220420[0-9a-fA-F]{64}"
    rb"|MC4CAQAwBQYDK2VwBCIEI[A-Za-z0-9+/]{43}"
)
# 32 bytes (an Ed25519 seed) written as 64 hex digits, base64 (43 characters and "="; or
# unpadded base64url) or 32 "\xNN" escapes, assigned to a name that says key, seed, secret or
# private, maybe through bytes.fromhex(...) or b64decode(...).
_SEED = re.compile(
    rb"""(?i)(?P<name>[\w.-]*(?:key|seed|secret|priv)[\w.-]*)["']?\s*[:=]\s*"""
    rb"""(?:[\w.]+\(\s*)?b?["']?"""
    rb"""(?:[0-9a-f]{64}|[a-z0-9+/]{43}=|[a-z0-9_-]{43}|(?:\\x[0-9a-f]{2}){32})(?![\w+/=-])"""
)
# 32 bytes under these names are public: a public key, a hash, a fingerprint
_PUBLIC_NAME = re.compile(rb"(?i)pub|hash|digest|sha|fingerprint|kid")


def private_keys_in(paths: Iterable[Path]) -> list[str]:
    """Each private key in the files, as "path: what": PEM (any kind), PuTTY, a bare Ed25519
    PKCS#8 key (DER, hex or base64), or a 32-byte seed assigned to a key/seed/secret name."""
    found: list[str] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):  # deleted in the work tree, a submodule
            continue
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for what, pattern in (("PEM private key", _PEM), ("PuTTY private key", _PUTTY),
                              ("Ed25519 PKCS#8 key", _PKCS8_ED25519)):
            if pattern.search(data):
                found.append(f"{shown}: {what}")
        for m in _SEED.finditer(data):
            if not _PUBLIC_NAME.search(m["name"]):
                found.append(f"{shown}: 32-byte secret assigned to {m['name'].decode()}")
                break
    return found


def tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                         timeout=60).stdout.decode()
    return [ROOT / name for name in out.split("\0") if name]


def test_no_private_key_outside_tests() -> None:
    """No tracked file outside tests/ holds a private key or a raw Ed25519 seed: keys are
    generated on the gateway (ETSI EN 303 645 5.4-2)."""
    outside = [p for p in tracked_files() if not p.is_relative_to(ROOT / "tests")]
    assert outside, "git ls-files listed nothing"
    assert private_keys_in(outside) == []


def test_test_keys_are_marked_test_only() -> None:
    """Every private key under tests/ says TEST-ONLY: in its own file, or in a tracked file
    beside it that names it (a README, the script that makes it)."""
    tests = [p for p in tracked_files() if p.is_relative_to(ROOT / "tests")]
    keys = sorted({ROOT / f.split(": ")[0] for f in private_keys_in(tests)})
    assert {ROOT / "tests/vectors/test-signing.key",
            ROOT / "tests/vectors/commands/platform-test.key"} <= set(keys), keys
    unmarked = []
    for key in keys:
        notes = [key] + [p for p in tests if p.parent == key.parent and p != key]
        if not any(MARKER in note.read_text(errors="replace")
                   and (note == key or key.name in note.read_text(errors="replace"))
                   for note in notes):
            unmarked.append(str(key.relative_to(ROOT)))
    assert unmarked == [], f"mark these {MARKER} (or move them out of the repository)"


def _seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def test_scanner_finds_each_kind_of_private_key(tmp_path: Path) -> None:
    """The scanner names each file holding a generated key, PEM (PKCS#8, encrypted, EC,
    OpenSSH, inside a string literal), bare PKCS#8 or a seed in code or config; and finds
    nothing in public keys, hashes, kids or prose about PEM armour."""
    key = Ed25519PrivateKey.from_private_bytes(_seed("scanner test key"))
    enc, fmt = serialization.Encoding, serialization.PrivateFormat
    none = serialization.NoEncryption()
    pem = key.private_bytes(enc.PEM, fmt.PKCS8, none)
    der = key.private_bytes(enc.DER, fmt.PKCS8, none)
    seed = _seed("scanner test key")
    ec_pem = ec.derive_private_key(12345, ec.SECP256R1()).private_bytes(
        enc.PEM, fmt.TraditionalOpenSSL, none)
    public = key.public_key().public_bytes(enc.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    raw_pub = key.public_key().public_bytes(enc.Raw, serialization.PublicFormat.Raw)
    leaks = {
        "pkcs8.key": pem,
        "encrypted.pem": key.private_bytes(enc.PEM, fmt.PKCS8,
                                           serialization.BestAvailableEncryption(b"pw")),
        "ec.pem": ec_pem,
        "id_ed25519": key.private_bytes(enc.PEM, fmt.OpenSSH, none),
        "literal.py": b"KEY_PEM = " + repr(ec_pem.decode()).encode() + b"\n",  # "\n" escapes
        "bare.der": der,
        "bare.txt": b"key material: " + der.hex().encode() + b"\n",
        "seed.py": b'SIGNING_SEED = bytes.fromhex("' + seed.hex().encode() + b'")\n',
        "agent.toml": b'private_key = "' + base64.b64encode(seed) + b'"\n',
        "escaped.py": b'secret = b"' + "".join(f"\\x{b:02x}" for b in seed).encode() + b'"\n',
        "putty.ppk": b"PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n",
    }
    clean = {
        "signing.pub": public,
        "pub.py": b'public_key = "' + raw_pub.hex().encode() + b'"\nkid = "' +
                  raw_pub[:16].hex().encode() + b'"\n',
        "hash.py": b'key_sha256 = "' + seed.hex().encode() + b'"\n',
        "prose.md": b"The file starts with `-----BEGIN PRIVATE KEY-----` (PKCS#8 PEM).\n",
        "short.py": b'key = "' + seed[:16].hex().encode() + b'"\n',
    }
    for name, data in {**leaks, **clean}.items():
        (tmp_path / name).write_bytes(data)
    found = private_keys_in(sorted(tmp_path / name for name in {**leaks, **clean}))
    assert sorted({f.split(": ")[0] for f in found}) == sorted(str(tmp_path / n) for n in leaks)
