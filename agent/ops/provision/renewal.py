"""Renewing the MQTT client certificate: `renew` makes a new key and a CSR authenticated by the
gateway's signing key (waiting in tls/next/), `install_cert` checks the certificate the CA
returned and switches over to it."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent.config import AgentConfig
from agent.core.atomic import write_atomic
from agent.core.errors import OperatorError
from agent.ops.provision.clientkey import client_key, make_csr, next_dir
from agent.protocol import kid_for
from agent.protocol.renewal import renewal_request
from agent.security.keys import load_private_key
from agent.uplink.config import MqttTlsConfig

__all__ = ["InstallResult", "RenewResult", "install_cert", "renew"]


@dataclass(frozen=True)
class RenewResult:
    key: Path  # tls/next/client.key
    csr: Path  # tls/next/client.csr: send it to the bank's CA ...
    auth: Path  # ... with tls/next/client.csr.cose (COSE_Sign1 by the gateway's signing key)
    new_key: bool
    kid: str


@dataclass(frozen=True)
class InstallResult:
    cert: Path
    key: Path
    subject: str
    serial: str
    not_after: str
    sha256: str
    kept_prev: list[Path]


def _mqtt_tls(cfg: AgentConfig) -> MqttTlsConfig:
    mq = cfg.uplink.mqtt
    if mq is None or mq.tls is None:
        raise OperatorError("certificate renewal needs [uplink.mqtt.tls] (ca, cert, key) in "
                            "the config")
    return mq.tls


def _der_of_pem_cert(path: Path) -> bytes | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.public_bytes(serialization.Encoding.DER)


def renew(cfg: AgentConfig, now: Callable[[], float] = time.time) -> RenewResult:
    """A new MQTT client key (EC P-256, 0600) and its CSR in tls/next/, with
    tls/next/client.csr.cose: a COSE_Sign1 (EdDSA, kid of the gateway's registered signing key)
    over the canonical CBOR map {"type": "mqtt-csr-renewal", "gw": id, "csr": SHA-256 of the
    CSR's DER, "cur": SHA-256 of the current certificate's DER or null, "iat": seconds}.
    Running it again keeps a pending key and its CSR (the CA may already have them)."""
    tls = _mqtt_tls(cfg)
    signing = load_private_key(cfg.gateway.key_file)  # KeyFileError (ValueError) if unsafe
    nxt = next_dir(tls)
    nxt.mkdir(parents=True, exist_ok=True, mode=0o750)
    key, new_key = client_key(nxt / "client.key")
    csr_path, auth_path = nxt / "client.csr", nxt / "client.csr.cose"
    if new_key or not csr_path.exists() or not auth_path.exists():
        csr_pem = make_csr(key, cfg.gateway.id)
        der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
        cur = _der_of_pem_cert(Path(tls.cert))
        write_atomic(csr_path, csr_pem, 0o644)
        write_atomic(auth_path, renewal_request(signing, cfg.gateway.id, der, cur, now()),
                     0o644)
    return RenewResult(nxt / "client.key", csr_path, auth_path, new_key,
                       kid_for(signing.public_key()).hex())


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _chains_to(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
               anchors: Sequence[x509.Certificate], at: dt.datetime) -> bool:
    """Signature path from `leaf` through `intermediates` to one of `anchors`, each certificate
    in date. (cryptography's PolicyBuilder client verifier insists on a subjectAltName, which
    gateway client certificates issued for our CSR do not carry.)"""
    cert = leaf
    for _ in range(len(intermediates) + 1):
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            return False
        for issuer in anchors:
            with contextlib.suppress(ValueError, TypeError, InvalidSignature):
                cert.verify_directly_issued_by(issuer)
                return issuer.not_valid_before_utc <= at <= issuer.not_valid_after_utc
        for issuer in intermediates:
            with contextlib.suppress(ValueError, TypeError, InvalidSignature):
                cert.verify_directly_issued_by(issuer)
                cert = issuer
                break
        else:
            return False
    return False


def _keep_prev(path: Path, mode: int) -> Path | None:
    if not path.exists():
        return None
    prev = path.with_name(path.name + ".prev")
    write_atomic(prev, path.read_bytes(), mode)
    return prev


def install_cert(cfg: AgentConfig, cert_path: Path,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
                 ) -> InstallResult:
    """Check that `cert_path` (PEM, leaf first, optional intermediates) is for the pending key
    in tls/next/ and chains to the configured CA, then switch over: the current key and
    certificate are kept as `.prev`, each new file replaces the old one with one atomic rename
    (key first: the agent reads both at its next connect). Raises ValueError when the
    certificate is wrong; running it again after an interruption completes the switch."""
    tls = _mqtt_tls(cfg)
    try:
        chain = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except ValueError:
        raise OperatorError(f"{cert_path}: not a PEM certificate") from None
    leaf, intermediates = chain[0], chain[1:]
    key_path, cur_cert = Path(tls.key), Path(tls.cert)
    pending = next_dir(tls) / "client.key"
    want = _spki(leaf.public_key())

    def key_spki(p: Path) -> bytes | None:
        try:
            return _spki(serialization.load_pem_private_key(p.read_bytes(), None).public_key())
        except (OSError, ValueError, TypeError):
            return None

    if pending.exists() and key_spki(pending) == want:
        new_key: Path | None = pending
    elif key_spki(key_path) == want:
        new_key = None  # the key is already in place (an interrupted or repeated install)
    else:
        raise OperatorError(f"{cert_path} was not issued for the pending key {pending} (was "
                            f"it issued for {pending.parent / 'client.csr'}?)")
    try:
        anchors = x509.load_pem_x509_certificates(Path(tls.ca).read_bytes())
    except (OSError, ValueError) as exc:
        raise OperatorError(f"cannot read the configured CA {tls.ca}: {exc}") from None
    if not _chains_to(leaf, intermediates, anchors, now()):
        raise OperatorError(f"{cert_path} does not chain to the configured CA {tls.ca}, or is "
                            "not in date")
    kept = [p for p in (_keep_prev(key_path, 0o600) if new_key else None,
                        _keep_prev(cur_cert, 0o644)) if p is not None]
    if new_key is not None:
        os.replace(new_key, key_path)  # same directory tree and file system: atomic
    write_atomic(cur_cert, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
                 0o644)
    nxt = next_dir(tls)
    if nxt.exists():
        for name in ("client.csr", "client.csr.cose"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(nxt / name, key_path.parent / name)
        shutil.rmtree(nxt)
    return InstallResult(cur_cert, key_path, leaf.subject.rfc4514_string(),
                         format(leaf.serial_number, "x"),
                         leaf.not_valid_after_utc.isoformat(timespec="seconds"),
                         hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
                         kept)
