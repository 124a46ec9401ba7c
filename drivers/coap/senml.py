"""SenML (RFC 8428) as CoAP ingest receives it: JSON (content-format 110) or CBOR (112), resolved
into records (base fields applied, relative times made absolute). Pure: bytes in, records out,
never raises; a malformed pack is a result with an error that says why in our own words.

The SenML packages on PyPI have been unmaintained since 2016/2018, hence our own.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.core import cbor
from agent.core.types import Value

__all__ = [
    "CF_SENML_CBOR",
    "CF_SENML_JSON",
    "SenMLRecord",
    "SenMLResult",
    "decode_senml",
    "resolve_senml",
]

log = structlog.get_logger(__name__)

CF_SENML_JSON = 110
CF_SENML_CBOR = 112

# RFC 8428 section 4.5.1: a time below 2**28 is relative to "now".
_RELATIVE_TIME_LIMIT = 2**28
# RFC 8428 section 4.5.1: name characters.
_NAME_RE = re.compile(r"[A-Za-z0-9][-:./A-Za-z0-9_]*\Z")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*\Z")

# RFC 8428 table 4: CBOR integer labels -> JSON labels.
_CBOR_LABELS: dict[int, str] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}

# field -> accepted Python types (bool is an int in Python: excluded from numbers below)
_NUMBER = (int, float)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "bver": (int,),
    "bn": (str,),
    "bt": _NUMBER,
    "bu": (str,),
    "bv": _NUMBER,
    "bs": _NUMBER,
    "n": (str,),
    "u": (str,),
    "v": _NUMBER,
    "vs": (str,),
    "vb": (bool,),
    "s": _NUMBER,
    "t": _NUMBER,
    "ut": _NUMBER,
    "vd": (str, bytes),
}
_VALUE_FIELDS = ("v", "vs", "vb", "vd")
_BASE_FIELDS = ("bn", "bt", "bu", "bv", "bs")


@dataclass(frozen=True, slots=True)
class SenMLRecord:
    """One resolved SenML record (RFC 8428 section 4.6): full name, absolute time, unit, value.

    `sum` is set when the record carried a sum (with the base sum added); `value` is None then
    unless the record also carried a value.
    """

    name: str
    time: float
    value: Value | bytes
    unit: str | None = None
    sum: float | None = None


@dataclass(frozen=True, slots=True)
class SenMLResult:
    """`records` when the pack is valid, else `error` says why (the 4.00 diagnostic)."""

    records: tuple[SenMLRecord, ...] = ()
    error: str | None = None


def _fail(why: str, payload: bytes | None = None) -> SenMLResult:
    if payload is not None:
        log.debug("senml.malformed", why=why, payload=payload[:256].hex())
    return SenMLResult(error=why)


def decode_senml(
    payload: bytes, content_format: int, now: float, max_records: int | None = None
) -> SenMLResult:
    """Decode a SenML pack (JSON 110 or CBOR 112) and resolve it. Never raises."""
    pack: object
    try:
        if content_format == CF_SENML_JSON:
            pack = json.loads(payload.decode("utf-8"))
        elif content_format == CF_SENML_CBOR:
            pack = cbor.loads_exact(payload, "SenML-CBOR")  # arrays are lists in any cbor2
        else:
            return _fail(f"unsupported content format {content_format}", payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # CBORError is a ValueError
        # the parser's own message goes to the log only: peers get our fixed words
        log.debug("senml.undecodable", error=str(exc)[:200])
        return _fail(f"not valid {'JSON' if content_format == 110 else 'CBOR'}", payload)
    if content_format == CF_SENML_CBOR and isinstance(pack, list):
        pack = [_relabel(r) for r in pack]
    result = resolve_senml(pack, now, max_records=max_records)
    if result.error is not None:
        log.debug("senml.malformed", why=result.error, payload=payload[:256].hex())
    return result


def _relabel(record: object) -> object:
    if not isinstance(record, Mapping):
        return record
    # type(k) is int: CBOR `true` is no label, although Python's True == 1
    return {_CBOR_LABELS.get(k, k) if type(k) is int else k: v for k, v in record.items()}


def _finite(x: object) -> bool:
    """A number a double holds, neither infinite nor NaN. A JSON or CBOR integer can be longer
    than any double (300 digits, a bignum): float() of it raises OverflowError."""
    try:
        return isinstance(x, int | float) and math.isfinite(x)
    except OverflowError:
        return False


def resolve_senml(pack: object, now: float, max_records: int | None = None) -> SenMLResult:
    """Resolve a decoded pack (list of JSON-labelled maps) as RFC 8428 section 4.6 says.

    Base fields carry over to the following records until replaced; a name is ``bn + n``; a
    time is ``bt + t``, relative to `now` when below 2**28; a numeric value is ``bv + v``.
    Unknown fields ending in ``_`` are must-understand and make the pack invalid.
    """
    if not isinstance(pack, list):
        return _fail("a SenML pack is an array of records")
    if not pack:
        return _fail("empty SenML pack")
    if max_records is not None and len(pack) > max_records:
        return _fail(f"too many records: {len(pack)} > {max_records}")
    base: dict[str, Any] = {}
    out: list[SenMLRecord] = []
    for i, rec in enumerate(pack):
        if not isinstance(rec, Mapping):
            return _fail(f"record {i}: not a map")
        for key, val in rec.items():
            if not isinstance(key, str):
                return _fail(f"record {i}: unknown label")
            types = _FIELD_TYPES.get(key)
            if types is None:
                if key.endswith("_"):
                    return _fail(f"record {i}: must-understand field not supported")
                continue  # RFC 8428 section 4.4: unknown fields are ignored
            if isinstance(val, bool) and bool not in types:
                return _fail(f"record {i}: {key} has the wrong type")
            if not isinstance(val, types):
                return _fail(f"record {i}: {key} has the wrong type")
            if types is _NUMBER and not _finite(val):
                return _fail(f"record {i}: {key} is not finite")
        if "bver" in rec and rec["bver"] > 10:
            return _fail(f"record {i}: SenML version {rec['bver']} not supported")
        for key in _BASE_FIELDS:
            if key in rec:
                base[key] = rec[key]
        name = base.get("bn", "") + rec.get("n", "")
        if not _NAME_RE.match(name):
            return _fail(f"record {i}: invalid name")
        t = base.get("bt", 0) + rec.get("t", 0)
        if not _finite(t):  # each part is finite, their sum may not be
            return _fail(f"record {i}: time out of range")
        if t < _RELATIVE_TIME_LIMIT:
            t = now + t
        present = [k for k in _VALUE_FIELDS if k in rec]
        if len(present) > 1:
            return _fail(f"record {i}: more than one value field")
        value: Value | bytes = None
        if present == ["v"]:
            value = base.get("bv", 0) + rec["v"]
            if not _finite(value):
                return _fail(f"record {i}: v out of range")
        elif present == ["vd"]:
            raw = rec["vd"]
            if isinstance(raw, str):
                # RFC 8428 section 4.3: base64url without padding in JSON.
                if not _B64URL_RE.match(raw):
                    return _fail(f"record {i}: vd is not base64url")
                try:
                    raw = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
                except (binascii.Error, ValueError):
                    return _fail(f"record {i}: vd is not base64url")
            value = raw
        elif present:
            value = rec[present[0]]
        total: float | None = None
        if "s" in rec:
            total = base.get("bs", 0) + rec["s"]
            if not _finite(total):
                return _fail(f"record {i}: s out of range")
        elif not present:
            return _fail(f"record {i}: no value and no sum")
        out.append(SenMLRecord(name, float(t), value, rec.get("u", base.get("bu")), total))
    return SenMLResult(records=tuple(out))
