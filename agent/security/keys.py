"""The gateway's Ed25519 signing key: generate, load, and refuse unsafe key files.

The private key never appears in a log or an exception message; only its `kid` and fingerprint
(both derived from the public key) do.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core.atomic import fsync_dir, write_atomic
from agent.core.errors import AgentError
from agent.protocol import kid_for

__all__ = [
    "PRIVATE_NAME",
    "PUBLIC_NAME",
    "KeyExistsError",
    "KeyFileError",
    "KeyInfo",
    "fingerprint",
    "generate_keypair",
    "install_next_key",
    "key_info",
    "load_private_key",
    "load_public_key",
]

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class KeyFileError(AgentError, ValueError):
    """A key file is missing, unreadable, of the wrong kind, or unsafely readable."""


class KeyExistsError(KeyFileError, FileExistsError):
    """`generate_keypair` would overwrite an existing key (pass force=True to replace it)."""


@dataclass(frozen=True)
class KeyInfo:
    kid: bytes
    fingerprint: str
    public_pem: bytes


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """"SHA256:" + hex of SHA-256 of the raw 32-byte public key (kid is its first 16 bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_info(public_key: Ed25519PublicKey) -> KeyInfo:
    return KeyInfo(kid_for(public_key), fingerprint(public_key), _public_pem(public_key))


def generate_keypair(dir: Path, force: bool = False) -> KeyInfo:
    """Create `signing.key` (PKCS8 PEM, 0600) and `signing.pub` (SPKI PEM, 0644) in `dir`."""
    dir = Path(dir)
    priv_path, pub_path = dir / PRIVATE_NAME, dir / PUBLIC_NAME
    if not force:
        for p in (priv_path, pub_path):
            if p.exists():
                raise KeyExistsError(
                    f"{p} already exists; refusing to replace the gateway's identity "
                    "(the platform would reject its batches). Use --force to replace it."
                )
    dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(priv_path, pem, 0o600)
    write_atomic(pub_path, _public_pem(key.public_key()), 0o644)
    return key_info(key.public_key())


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"{what} {path} does not exist; create one with `branch-agent keygen`"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load the signing key; refuse it if group or others may read or write the file."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0  # _read reports the missing file with its hint
    if mode & 0o077:
        raise KeyFileError(
            f"signing key {path} has mode {mode:04o}: it must be readable by the agent only. "
            f"Fix: chmod 600 {path}"
        )
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # The parser's message may quote the file; say only what kind of problem it is.
        raise KeyFileError(f"signing key {path} is not an unencrypted PKCS8 PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an SPKI PEM Ed25519 public key (the gateway's `signing.pub`)."""
    return public_key_from_pem(_read(Path(path), "public key"), str(path))


def public_key_from_pem(data: bytes, name: str = "public key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(f"{name} is not an SPKI PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{name} is not an Ed25519 public key")
    return key


def install_next_key(key_file: Path) -> None:
    """Make the pending key pair in `next/` beside `key_file` the gateway's signing key (after
    the platform acknowledged the rotation announced with the old one). Renames, then a
    directory fsync: the old key must not come back after a power cut."""
    nxt = key_file.parent / "next"
    os.replace(nxt / PRIVATE_NAME, key_file)
    os.replace(nxt / PUBLIC_NAME, key_file.with_name(PUBLIC_NAME))
    fsync_dir(key_file.parent)
