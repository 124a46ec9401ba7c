"""Renewal of the gateway's MQTT client certificate, authenticated by its registered signing
key (docs/OPERATIONS.md, "Certificate renewal"): the request the gateway signs beside its CSR,
and the check the bank's CA (or the platform, which holds the registered key) runs before
signing the CSR.

The request is a COSE_Sign1 (agent.protocol.cose) over the canonical CBOR map {"type":
"mqtt-csr-renewal", "gw": id, "csr": SHA-256 of the CSR's DER, "cur": SHA-256 of the current
certificate's DER or null, "iat": seconds}.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from agent.protocol.cose import ProtocolError, kid_for, loads_exact, open_sign1, sign1

__all__ = ["RENEWAL_TYPE", "renewal_request", "verify_renewal"]

RENEWAL_TYPE = "mqtt-csr-renewal"


def renewal_request(key: Ed25519PrivateKey, gateway_id: str, csr_der: bytes,
                    current_cert_der: bytes | None, now: float) -> bytes:
    """The signed request that goes to the CA with the CSR (`client.csr.cose`)."""
    payload = cbor2.dumps({"type": RENEWAL_TYPE, "gw": gateway_id,
                           "csr": hashlib.sha256(csr_der).digest(),
                           "cur": (hashlib.sha256(current_cert_der).digest()
                                   if current_cert_der else None),
                           "iat": int(now)}, canonical=True)
    return sign1(key, payload)


def verify_renewal(csr_pem: bytes, cose: bytes, public_key: Ed25519PublicKey,
                   gateway_id: str) -> dict[str, Any]:
    """What the bank's CA (or the platform, which holds the gateway's registered public key)
    runs before signing a renewal CSR: the COSE_Sign1 verifies with `public_key`, names this
    gateway and this CSR's hash, and the CSR is self-signed and for the gateway id. Returns the
    signed claims; raises ValueError saying what is wrong."""
    pinned = kid_for(public_key)
    try:
        _kid, payload = open_sign1(cose, lambda kid: public_key if kid == pinned else None)
        claims = loads_exact(payload, "renewal claims")
    except ProtocolError as exc:
        why = {"unknown-key": "signed by another key (kid differs)",
               "bad-signature": "bad signature"}.get(exc.reason, f"malformed: {exc.detail}")
        raise ValueError(f"renewal authentication: {why}") from None
    csr = x509.load_pem_x509_csr(csr_pem)
    der = csr.public_bytes(serialization.Encoding.DER)
    if not isinstance(claims, dict) or claims.get("type") != RENEWAL_TYPE:
        raise ValueError("renewal authentication: wrong type")
    if claims.get("gw") != gateway_id:
        raise ValueError(f"renewal authentication: for gateway {claims.get('gw')!r}")
    if claims.get("csr") != hashlib.sha256(der).digest():
        raise ValueError("renewal authentication: signs another CSR")
    if not csr.is_signature_valid:
        raise ValueError("CSR: bad self-signature")
    cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != gateway_id:
        raise ValueError("CSR: common name is not the gateway id")
    return claims
