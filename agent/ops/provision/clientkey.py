"""The MQTT client key (EC P-256, 0600) and its CSR for the bank's CA, each created once and
never overwritten: what provisioning and renewal share, and where a renewed key waits."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.core.atomic import write_atomic
from agent.core.errors import OperatorError
from agent.uplink.config import MqttTlsConfig

__all__ = ["client_key", "make_csr", "next_dir", "write_new"]


def write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create `path` with `mode` from the first byte on (O_EXCL); False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data, mode, exclusive=True)


def client_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The key at `path`, created if missing; True if it was created."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise OperatorError(
                f"{path} is not an EC private key; move it aside and provision again")
        return key, False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return key, write_new(path, pem, 0o600)


def make_csr(key: ec.EllipticCurvePrivateKey, gateway_id: str) -> bytes:
    """The CSR (PEM) of `key` for the gateway's client certificate."""
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, gateway_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "branch gateways"),
        ]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return req.public_bytes(serialization.Encoding.PEM)


def next_dir(tls: MqttTlsConfig) -> Path:
    """tls/next/: where a renewed key and its CSR wait for the CA's certificate."""
    return Path(tls.key).parent / "next"
