"""The wire protocol (docs/PROTOCOL.md): pure, bytes in and bytes out, importing no transport.

- `cose`: COSE_Sign1 with EdDSA, the one signer and parser of every signed message;
- `batches`: events, signed hash-chained batches, acks;
- `commands`: signed downlink commands and their acks;
- `renewal`: the signed certificate-renewal request.

The names of `cose` and `batches` are re-exported here (`from agent import protocol`).
"""

from agent.protocol.batches import (
    ALARM_LANE,
    BULK_LANE,
    EPOCH_LEN,
    FORMAT_VERSION,
    LANES,
    MAX_INT,
    MAX_PAYLOAD,
    ZERO_HASH,
    ZSTD,
    Ack,
    Batch,
    batch_hash,
    build_batch,
    decode_ack,
    decode_batch,
    encode_ack,
    encode_event,
    verify_batch,
)
from agent.protocol.cose import (
    ALG_EDDSA,
    COSE_SIGN1_TAG,
    KID_LEN,
    REASONS,
    SIG_LEN,
    ProtocolError,
    decode_sign1,
    kid_for,
    loads_exact,
    open_sign1,
    sig_structure,
    sign1,
)

__all__ = [
    "ALARM_LANE",
    "ALG_EDDSA",
    "BULK_LANE",
    "COSE_SIGN1_TAG",
    "EPOCH_LEN",
    "FORMAT_VERSION",
    "KID_LEN",
    "LANES",
    "MAX_INT",
    "MAX_PAYLOAD",
    "REASONS",
    "SIG_LEN",
    "ZERO_HASH",
    "ZSTD",
    "Ack",
    "Batch",
    "ProtocolError",
    "batch_hash",
    "build_batch",
    "decode_ack",
    "decode_batch",
    "decode_sign1",
    "encode_ack",
    "encode_event",
    "kid_for",
    "loads_exact",
    "open_sign1",
    "sig_structure",
    "sign1",
    "verify_batch",
]
