"""The test PKI lives in the simulator (the demo uses it too); re-exported for the tests, with
what the bank's CA does with a gateway's CSR."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from branchsim.pki import Pki, make_pki

__all__ = ["Pki", "certify", "issue", "make_pki"]


def issue(pki: Pki, csr_path: Path, out: Path, *, ca_key_path: Path | None = None,
          days: int = 365) -> Path:
    """What the bank's CA does with the CSR: a client certificate for its key."""
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    return certify(pki, csr.subject, csr.public_key(), out, ca_key_path=ca_key_path, days=days)


def certify(pki: Pki, subject: x509.Name, public_key: CertificatePublicKeyTypes, out: Path,
            *, ca_key_path: Path | None = None, days: int = 365,
            san: Sequence[x509.GeneralName] = ()) -> Path:
    """A certificate from the test CA (or another CA key) for `public_key`, valid `days`; with
    `san`, a subjectAltName of those names (a server certificate for another host)."""
    ca_key = serialization.load_pem_private_key((ca_key_path or pki.ca_key).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=days)))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out
