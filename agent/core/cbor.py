"""Decoding untrusted CBOR into one set of Python types, whatever the cbor2 version.

cbor2 5.x decodes every CBOR array as a ``list`` and every map as a ``dict``. cbor2 6.x
decodes the content of a tag (a COSE_Sign1 is tag 18) immutably: arrays as ``tuple`` and
maps as ``cbor2.frozendict``, which is not a ``dict``. A check such as
``isinstance(x, list)`` on decoded data therefore says something about the library, not
about the bytes, and a gateway that resolved cbor2 6 had every batch refused as malformed.

`loads_exact` answers with what the bytes say instead: a CBOR array (major type 4) is always
a ``list``, a map (major type 5) always a ``dict``, a tag a ``cbor2.CBORTag`` whose value is
converted the same way. Every decoder of the project's wire messages (batches, acks,
commands, renewal requests, SenML-CBOR) goes through it; tests/test_cbor_compat.py runs the
protocol tests under cbor2 5.x and 6.x.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import cbor2

__all__ = ["CBORError", "loads_exact", "plain"]

_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})
# cbor2 5.x returns a stray "break" byte (0xff outside an indefinite-length item) as a value,
# cbor2 6.x refuses it: it is not well-formed CBOR (RFC 8949 section 3.2.1), so neither do we.
_BREAK = getattr(cbor2, "break_marker", object())


class CBORError(ValueError):
    """Bytes that are not exactly one well-formed CBOR item. The message is ours (fixed
    words and the decoder's exception type), never the raw input."""


def plain(value: Any) -> Any:
    """`value` with every array as a list and every map as a dict, recursively.

    Flat maps of scalars (most events) are returned as they are, without a copy."""
    cls = value.__class__
    if cls in _SCALARS:
        return value
    if cls is dict:
        for v in value.values():
            if v.__class__ not in _SCALARS:
                return {k: plain(v) for k, v in value.items()}
        return value
    if cls is list or cls is tuple:
        return [v if v.__class__ in _SCALARS else plain(v) for v in value]
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, plain(value.value))
    if isinstance(value, Mapping):  # cbor2 6's frozendict, and any other read-only map
        # keys stay as decoded: they must be hashable (an array key is a tuple in both
        # versions), and every message's own checks accept only text or integer keys
        return {k: plain(v) for k, v in value.items()}
    if value is _BREAK:
        raise CBORError("a break outside an indefinite-length item")
    return value


def loads_exact(data: bytes | bytearray | memoryview, what: str) -> Any:
    """Decode one CBOR item that spans all of `data` (trailing bytes are an error), with
    arrays as lists and maps as dicts. Raises `CBORError` and nothing else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CBORError(f"{what}: not bytes")
    fp = io.BytesIO(data)
    try:
        value = plain(cbor2.CBORDecoder(fp).decode())
    except CBORError as exc:
        raise CBORError(f"{what}: {exc}") from None
    except Exception as exc:  # cbor2 raises many types (and RecursionError) on hostile input
        raise CBORError(f"{what}: {type(exc).__name__}") from None
    if fp.tell() != len(data):
        raise CBORError(f"{what}: trailing bytes")
    return value
