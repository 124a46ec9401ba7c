"""Signing key files: created private (0600) and atomically, refused when unsafe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
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
