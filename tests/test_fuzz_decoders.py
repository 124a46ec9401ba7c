"""Decoders of untrusted input, fuzzed: SenML from CoAP sensors, signed downlink commands and
their acks, the one COSE_Sign1 parser and the exact CBOR decoder under them all.

Each property holds for random bytes and for input that is well-formed but wrong: the decoder
returns a well-typed result or raises its one documented error (`decode_senml` raises nothing,
it answers with an error), and valid input round-trips. Where the documents say an input is
invalid (docs/COMMANDS.md's payload table, RFC 8428's field types) it must also be refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent.core import cbor
from agent.protocol.commands import (
    COMMANDS,
    MAX_COMMAND_BYTES,
    REJECT_REASONS,
    Command,
    CommandAck,
    CommandError,
    decode_ack,
    duration,
    encode_ack,
    encode_command,
    verify_command,
)
from agent.protocol.cose import (
    REASONS,
    ProtocolError,
    decode_sign1,
    kid_for,
    open_sign1,
    sign1,
)
from drivers.coap.senml import (
    CF_SENML_CBOR,
    CF_SENML_JSON,
    SenMLRecord,
    SenMLResult,
    decode_senml,
)
from tests.vectors.commands.make_vectors import OTHER, PLATFORM

# derandomize: the same examples on every run, so a red run is reproducible and a green one
# means the same thing everywhere. Random bytes are cheap; structured cases sign and verify.
RANDOM = settings(max_examples=600, deadline=None, derandomize=True)
STRUCTURED = settings(max_examples=300, deadline=None, derandomize=True)

NOW = 1_767_225_600.0
PLATFORM_PUB = PLATFORM.public_key()
PLATFORM_KID = kid_for(PLATFORM_PUB)
GATEWAY = OTHER  # acks are signed with the gateway's key: any key but the platform's does
GATEWAY_PUB = GATEWAY.public_key()
# cose.guarded turns any exception into ProtocolError("malformed", <its class name>): a net for
# what the parser did not foresee. Input must be refused by a check (whose words have spaces,
# or "what: why" from the CBOR decoder), not by the net.
NET_DETAIL = re.compile(r"[A-Za-z_]\w*\Z")


def _finite(x: object) -> bool:
    """A number a double can hold: not a bool, not NaN or infinite, not a 400-digit integer."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


# --- junk: every type CBOR (or JSON) can carry, at the edges

_BIG = st.integers(min_value=2**64, max_value=2**1100)  # CBOR bignums, 400-digit JSON integers
EXTREMES = st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e308, -1e308, 2**1100, -(2**1100), 2**1023, 0, -0.0, True]
)


def junk(*, binary: bool, nan: bool = True) -> st.SearchStrategy[Any]:
    """Nested values of any type; `binary` adds byte strings, tags and integer map keys (CBOR
    has them, JSON has not); without `nan` the values compare equal to themselves."""
    scalars: st.SearchStrategy[Any] = st.one_of(
        st.none(), st.booleans(), st.integers(), _BIG, _BIG.map(lambda n: -n),
        st.floats(allow_nan=nan), st.text(max_size=12),
    )
    keys: st.SearchStrategy[Any] = st.text(max_size=4)
    if binary:
        scalars = scalars | st.binary(max_size=12)
        keys = keys | st.integers(-8, 8) | st.booleans()

    def nest(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        containers = st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4)
        if not binary:
            return containers
        # tags cbor2 gives no meaning to, so they come back as CBORTag
        return containers | st.builds(cbor2.CBORTag, st.integers(6000, 6003), inner)

    return st.recursive(scalars, nest, max_leaves=10)


CBOR_JUNK = junk(binary=True)
JSON_JUNK = junk(binary=False)


def check_plain(value: Any) -> None:
    """Every array a list and every map a dict, at any depth (agent.core.cbor's promise)."""
    assert not isinstance(value, tuple), value
    if isinstance(value, cbor2.CBORTag):
        check_plain(value.value)
    elif isinstance(value, list):
        for item in value:
            check_plain(item)
    elif isinstance(value, dict):
        assert type(value) is dict, type(value)
        for item in value.values():
            check_plain(item)
    else:
        assert not hasattr(value, "keys"), type(value)  # no other mapping (cbor2's frozendict)


# --- SenML (RFC 8428)

# RFC 8428 table 4: JSON label -> CBOR label
LABELS = {"bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6, "n": 0, "u": 1, "v": 2,
          "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8}
NUMERIC = frozenset({"bt", "bv", "bs", "v", "s", "t", "ut"})
TEXT = frozenset({"bn", "bu", "n", "u", "vs"})
VALUES = ("v", "vs", "vb", "vd")
NAME_CHARS = re.compile(r"[-:./A-Za-z0-9_]*\Z")  # RFC 8428 section 4.5.1
NAME = re.compile(r"[A-Za-z0-9][-:./A-Za-z0-9_]*\Z")
NAME_HEAD = st.from_regex(r"[A-Za-z0-9][-:./A-Za-z0-9_]{0,12}", fullmatch=True)
NAME_TAIL = st.from_regex(r"[-:./A-Za-z0-9_]{0,8}", fullmatch=True)
BAD_NAME = st.text(min_size=1, max_size=8).filter(lambda s: not NAME_CHARS.match(s))
UNITS = st.sampled_from(["Cel", "V", "A", "W", "%RH", "/", "Pa"]) | st.text(max_size=6)
# quarters are exact in binary, so `bv + v` is the same number however the test splits it
QUARTERS = st.integers(-(2**40), 2**40) | st.integers(-(2**40), 2**40).map(lambda k: k / 4)
TIMES = st.integers(2**28, 2**32) | st.integers(2**28, 2**32).map(float)  # absolute
OFFSETS = st.integers(-(10**6), 10**6)  # relative to now when alone


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def senml_json(pack: Any) -> bytes:
    """RFC 8428 JSON; `vd` bytes as base64url without padding (section 4.3)."""
    return json.dumps(pack, default=lambda raw: _b64url(raw)).encode()


def _labelled(pack: Any) -> Any:
    """The pack with RFC 8428 table 4's integer labels for the names it knows."""
    if not isinstance(pack, list):
        return pack
    return [{LABELS.get(k, k) if isinstance(k, str) else k: v for k, v in rec.items()}
            if isinstance(rec, dict) else rec for rec in pack]


def senml_cbor(pack: Any) -> bytes:
    """RFC 8428 CBOR."""
    return cbor2.dumps(_labelled(pack))


def decode(pack: Any, fmt: str) -> SenMLResult:
    """decode_senml of the pack sent as SenML JSON or CBOR."""
    if fmt == "json":
        return decode_senml(senml_json(pack), CF_SENML_JSON, NOW)
    return decode_senml(senml_cbor(pack), CF_SENML_CBOR, NOW)


def as_decoder_sees(pack: Any, fmt: str) -> Any:
    """The pack as its fields read after decoding: in CBOR, integer labels are names again
    (an integer only: CBOR `true` is no label 1)."""
    if fmt == "json" or not isinstance(pack, list):
        return pack
    names = {v: k for k, v in LABELS.items()}
    return [{names.get(k, k) if type(k) is int else k: v for k, v in rec.items()}
            if isinstance(rec, dict) else rec for rec in _labelled(pack)]


@st.composite
def senml_packs(draw: st.DrawFn) -> tuple[list[dict[str, Any]], tuple[SenMLRecord, ...]]:
    """A valid pack (JSON labels) and the records RFC 8428 section 4.6 resolves it to."""
    pack: list[dict[str, Any]] = []
    out: list[SenMLRecord] = []
    base: dict[str, Any] = {}
    for i in range(draw(st.integers(1, 4))):
        rec: dict[str, Any] = {}
        if i == 0 and draw(st.booleans()):
            rec["bver"] = draw(st.integers(1, 10))
        for key, values in (("bn", NAME_HEAD), ("bt", TIMES), ("bu", UNITS), ("bv", QUARTERS),
                            ("bs", QUARTERS)):
            if draw(st.integers(0, 3)) == 0:
                rec[key] = base[key] = draw(values)
        bn = base.get("bn", "")
        if not bn or draw(st.booleans()):
            rec["n"] = draw(NAME_TAIL if bn else NAME_HEAD)
        if draw(st.booleans()):
            rec["t"] = draw(OFFSETS | TIMES)
        if draw(st.booleans()):
            rec["u"] = draw(UNITS)
        fields = draw(st.sampled_from([("v",), ("vs",), ("vb",), ("vd",), ("s",), ("v", "s")]))
        value: Any = None
        if "v" in fields:
            rec["v"] = draw(QUARTERS)
            value = base.get("bv", 0) + rec["v"]
        elif fields[0] != "s":
            strategy = {"vs": st.text(max_size=12), "vb": st.booleans(),
                        "vd": st.binary(max_size=12)}[fields[0]]
            rec[fields[0]] = value = draw(strategy)
        total = None
        if "s" in fields:
            rec["s"] = draw(QUARTERS)
            total = base.get("bs", 0) + rec["s"]
        t = base.get("bt", 0) + rec.get("t", 0)
        time = float(t if t >= 2**28 else NOW + t)
        out.append(SenMLRecord(bn + rec.get("n", ""), time, value, rec.get("u", base.get("bu")),
                               total))
        pack.append(rec)
    return pack, tuple(out)


def _field_ok(key: str, value: Any) -> bool:
    """RFC 8428's type for a field: numbers are finite doubles, `vb` a boolean, `vd` bytes or
    base64url text; an unknown field is ignored unless its name ends in `_`."""
    if key in NUMERIC:
        return _finite(value)
    if key in TEXT:
        return isinstance(value, str)
    if key == "vb":
        return isinstance(value, bool)
    if key == "vd":
        return isinstance(value, bytes) or (
            isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_-]*", value) is not None
            and len(value) % 4 != 1)
    if key == "bver":
        return type(value) is int and value <= 10
    return not key.endswith("_")


def senml_must_fail(pack: Any) -> bool:
    """What makes a pack invalid whatever else it holds (RFC 8428 sections 4 and 5)."""
    if not isinstance(pack, list) or not pack:
        return True
    for rec in pack:
        if not isinstance(rec, dict) or not all(isinstance(k, str) for k in rec):
            return True
        if not all(_field_ok(k, v) for k, v in rec.items()):
            return True
        if sum(k in rec for k in VALUES) > 1 or not any(k in rec for k in (*VALUES, "s")):
            return True
        if any(not NAME_CHARS.match(rec[k]) for k in ("bn", "n") if k in rec):
            return True
    return False


def check_senml(result: SenMLResult) -> None:
    """Either records that are well-formed, or no records and an error."""
    assert isinstance(result, SenMLResult)
    if result.error is not None:
        assert isinstance(result.error, str) and result.error and result.records == ()
        return
    assert result.records
    for rec in result.records:
        assert isinstance(rec.name, str) and NAME.match(rec.name), rec
        assert type(rec.time) is float and math.isfinite(rec.time), rec
        assert rec.unit is None or isinstance(rec.unit, str), rec
        assert rec.sum is None or _finite(rec.sum), rec
        if rec.value is None:
            assert rec.sum is not None, rec
        else:
            assert isinstance(rec.value, bool | str | bytes) or _finite(rec.value), rec


@RANDOM
@given(st.binary(max_size=300), st.sampled_from([CF_SENML_JSON, CF_SENML_CBOR, 0, 50, 60]))
def test_senml_random_bytes_never_raise(data: bytes, content_format: int) -> None:
    """Random bytes as SenML JSON or CBOR (or another format) give an error, never raise."""
    check_senml(decode_senml(data, content_format, NOW))


@STRUCTURED
@given(senml_packs(), st.sampled_from(["json", "cbor"]))
def test_senml_valid_packs_round_trip(
    case: tuple[list[dict[str, Any]], tuple[SenMLRecord, ...]], fmt: str
) -> None:
    """A valid pack with base fields, relative times and every value type resolves to exactly
    the records it was made from, in JSON and in CBOR."""
    pack, expected = case
    assert decode(pack, fmt) == SenMLResult(records=expected)


@st.composite
def wrong_senml(draw: st.DrawFn) -> tuple[Any, str]:
    """A valid pack with one to three things made wrong, and the format it goes in."""
    fmt = draw(st.sampled_from(["json", "cbor"]))
    any_value = CBOR_JUNK if fmt == "cbor" else JSON_JUNK
    pack: Any = draw(senml_packs())[0]
    for _ in range(draw(st.integers(1, 3))):
        if not (isinstance(pack, list) and pack and all(isinstance(r, dict) for r in pack)):
            break
        rec = pack[draw(st.integers(0, len(pack) - 1))]
        how = draw(st.sampled_from(["type", "extreme", "name", "vd", "bver",
                                    "value", "drop", "unknown", "label", "bool-label",
                                    "record", "pack"]))
        if how == "type":  # a known field of the wrong type, maybe nested junk
            rec[draw(st.sampled_from(sorted(LABELS)))] = draw(any_value)
        elif how == "extreme":  # NaN, infinities, beyond a double
            rec[draw(st.sampled_from(sorted(NUMERIC)))] = draw(EXTREMES)
        elif how == "name":
            rec[draw(st.sampled_from(["n", "bn"]))] = draw(BAD_NAME)
        elif how == "vd":
            rec["vd"] = draw(st.text(max_size=8))
        elif how == "bver":
            rec["bver"] = draw(st.integers(11, 2**70) | any_value)
        elif how == "value":  # a second value field
            rec[draw(st.sampled_from(VALUES))] = draw(any_value)
        elif how == "drop" and rec:
            del rec[draw(st.sampled_from(list(rec)))]
        elif how == "unknown":  # ignored, unless must-understand (a name ending in "_")
            rec[draw(st.text(max_size=4)) + draw(st.sampled_from(["", "_"]))] = draw(any_value)
        elif how == "label" and fmt == "cbor" and rec:  # a field under another label
            rec[draw(st.integers(-8, 9))] = rec.pop(draw(st.sampled_from(list(rec))))
        elif how == "bool-label" and fmt == "cbor" and {"n", "u"} & rec.keys():
            # CBOR false/true as the key: no label, though Python's False == 0 ("n"), True == 1
            field = draw(st.sampled_from(sorted({"n", "u"} & rec.keys())))
            rec[field == "u"] = rec.pop(field)
        elif how == "record":
            pack[pack.index(rec)] = draw(any_value)
        elif how == "pack":
            pack = draw(any_value)
    return pack, fmt


@STRUCTURED
@given(wrong_senml())
def test_senml_wrong_packs_are_errors(case: tuple[Any, str]) -> None:
    """Packs with wrong types, missing names or values, NaN, infinities, 400-digit numbers, bad
    base names, must-understand fields or nested junk are errors (never an exception), and
    whatever a pack still resolves to is well-formed."""
    pack, fmt = case
    result = decode(pack, fmt)
    check_senml(result)
    if senml_must_fail(as_decoder_sees(pack, fmt)):
        assert result.error is not None, (pack, result)


# a field that is no double, or a base and a field each a double whose sum is not
NOT_DOUBLES = st.tuples(st.sampled_from([(k,) for k in sorted(NUMERIC)]),
                        st.sampled_from([math.nan, math.inf, -math.inf, 2**1100, -(2**1100)]))
SUMS_BEYOND = st.tuples(st.sampled_from([("bt", "t"), ("bv", "v"), ("bs", "s")]),
                        st.sampled_from([1e308, -1e308, 2**1023, -(2**1023)]))


@STRUCTURED
@given(senml_packs(), NOT_DOUBLES | SUMS_BEYOND, st.sampled_from(["json", "cbor"]))
def test_senml_numbers_beyond_a_double_are_errors(
    case: tuple[list[dict[str, Any]], tuple[SenMLRecord, ...]],
    fields: tuple[tuple[str, ...], float], fmt: str
) -> None:
    """NaN, infinities and 400-digit integers in any numeric field (used or not), and a base
    plus a field whose sum no double holds (2e308, 2**1024, a time 2**1024 in the past), are
    an error: never an infinity in a record, never an OverflowError."""
    pack, (keys, big) = case[0], fields
    if "v" in keys:
        for key in VALUES:
            pack[0].pop(key, None)
    pack[0].update(dict.fromkeys(keys, big))
    result = decode(pack, fmt)
    assert result.error is not None and result.error.startswith("record 0:"), (pack, result)


# --- signed commands, acks, COSE_Sign1

BODY_KEYS = ("v", "gw", "seq", "iat", "exp", "cmd", "args")
UINT = st.integers(1, 2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def check_command(cmd: Command, data: bytes) -> None:
    """A command as docs/COMMANDS.md types it, from the pinned key, hashed over `data`."""
    assert cmd.kid == PLATFORM_KID and cmd.hash == hashlib.sha256(data).digest()
    assert isinstance(cmd.gw, str) and isinstance(cmd.cmd, str)
    assert type(cmd.seq) is int and 1 <= cmd.seq <= 2**63 - 1
    assert type(cmd.iat) is float and type(cmd.exp) is float
    assert math.isfinite(cmd.iat) and math.isfinite(cmd.exp)
    assert type(cmd.args) is dict and all(isinstance(k, str) for k in cmd.args)
    check_plain(cmd.args)


def check_ack(ack: CommandAck) -> None:
    """An acknowledgement as docs/COMMANDS.md types it."""
    assert isinstance(ack.gw, str) and type(ack.seq) is int and 0 <= ack.seq <= 2**63 - 1
    assert type(ack.h) is bytes and len(ack.h) == 32 and type(ack.ok) is bool
    assert _finite(ack.t)
    assert ack.err is None or isinstance(ack.err, str)
    assert ack.result is None or type(ack.result) is dict
    check_plain(ack.result)


def command_ok(body: Any) -> bool:
    """docs/COMMANDS.md's payload table: exactly these keys, `v` the uint 1, `gw` text, `seq`
    a uint >= 1, `iat`/`exp` finite numbers, `cmd` text, `args` a map with text keys."""
    if not (isinstance(body, dict) and set(body) == set(BODY_KEYS)):
        return False
    v, gw, seq, iat, exp, cmd, args = (body[k] for k in BODY_KEYS)
    return (type(v) is int and v == 1 and isinstance(gw, str) and type(seq) is int
            and 1 <= seq <= 2**63 - 1 and _finite(iat) and _finite(exp) and isinstance(cmd, str)
            and isinstance(args, dict) and all(isinstance(k, str) for k in args))


def ack_ok(doc: Any) -> bool:
    """docs/COMMANDS.md's acknowledgement: gw, seq (0 when unread), h the 32-byte SHA-256,
    ok, t, and maybe err (text) and result (a map)."""
    if not (isinstance(doc, dict) and {"v", "gw", "seq", "h", "ok", "t"} <= doc.keys()):
        return False
    seq, h, err, result = doc["seq"], doc["h"], doc.get("err"), doc.get("result")
    return (isinstance(doc["gw"], str) and type(seq) is int and 0 <= seq <= 2**63 - 1
            and isinstance(h, bytes) and len(h) == 32 and isinstance(doc["ok"], bool)
            and _finite(doc["t"]) and (err is None or isinstance(err, str))
            and (result is None or isinstance(result, dict)))


def _key_for(kid: bytes) -> Ed25519PublicKey | None:
    return PLATFORM_PUB if kid == PLATFORM_KID else None


def check_cose(data: bytes) -> None:
    """decode_sign1 and open_sign1 give well-typed parts or a ProtocolError their docstrings
    name, never one made by the catch-all net out of an unforeseen exception."""
    opened: list[tuple[str, Callable[[], Any], frozenset[str]]] = [
        ("decode", lambda: decode_sign1(data), frozenset({"malformed"})),
        ("open", lambda: open_sign1(data, _key_for),
         frozenset({"malformed", "unknown-key", "bad-signature"})),
    ]
    for what, fn, reasons in opened:
        try:
            parts = fn()
        except ProtocolError as exc:
            assert exc.reason in reasons and exc.reason in REASONS, (what, exc)
            assert exc.reason != "malformed" or not NET_DETAIL.match(exc.detail), (what, exc)
            continue
        if what == "decode":
            protected, kid, payload, signature = parts
            assert type(protected) is bytes and type(payload) is bytes
            assert type(kid) is bytes and len(kid) == 16
            assert type(signature) is bytes and len(signature) == 64
        else:
            assert parts == (PLATFORM_KID, decode_sign1(data)[2])


def command_or_error(data: bytes, reasons: frozenset[str] = REJECT_REASONS) -> Command | None:
    """verify_command's answer: a well-typed Command, or None for a CommandError of `reasons`."""
    try:
        cmd = verify_command(data, PLATFORM_PUB)
    except CommandError as exc:
        assert exc.reason in reasons, exc
        return None
    check_command(cmd, data)
    return cmd


def ack_or_error(data: bytes) -> CommandAck | None:
    """decode_ack's answer: a well-typed CommandAck, or None for a CommandError."""
    try:
        ack = decode_ack(data, GATEWAY_PUB)
    except CommandError as exc:
        assert exc.reason in REJECT_REASONS, exc
        return None
    check_ack(ack)
    return ack


def cbor_or_error(data: bytes) -> None:
    """loads_exact's answer: plain lists and dicts, or a CBORError."""
    try:
        value = cbor.loads_exact(data, "fuzz")
    except cbor.CBORError:
        return
    check_plain(value)


# the start of a COSE_Sign1 (tag 18, four elements) and of its protected header: random bytes
# after them reach the parser's later checks
PREFIXES = [b"", b"\xd2\x84", b"\xd2\x84\x55\xa2\x01\x27\x04\x50",
            b"\xd2\x84\x55\xa2\x01\x27\x04\x50" + PLATFORM_KID + b"\xa0", b"\x84", b"\xa7"]


@RANDOM
@given(st.sampled_from(PREFIXES), st.binary(max_size=300))
def test_command_decoders_random_bytes(prefix: bytes, tail: bytes) -> None:
    """Random bytes (bare, or after a COSE_Sign1 start) raise only CommandError from
    verify_command and decode_ack, ProtocolError from the COSE parser, CBORError from
    loads_exact."""
    data = prefix + tail
    assert command_or_error(data) is None
    ack_or_error(data)
    check_cose(data)
    cbor_or_error(data)


@st.composite
def command_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A command payload docs/COMMANDS.md accepts."""
    return {"v": 1, "gw": draw(st.text(max_size=16)), "seq": draw(UINT),
            "iat": draw(FLOATS), "exp": draw(FLOATS),
            "cmd": draw(st.sampled_from(sorted(COMMANDS)) | st.text(max_size=8)),
            "args": draw(st.dictionaries(st.text(max_size=8), CBOR_JUNK, max_size=3))}


def _same_cbor(a: Any, b: Any) -> bool:
    return bool(cbor2.dumps(a, canonical=True) == cbor2.dumps(b, canonical=True))  # NaN == NaN


def assert_reads_back(cmd: Command, body: dict[str, Any]) -> None:
    """The command holds what the signed payload said (times as floats)."""
    assert (cmd.gw, cmd.seq, cmd.iat, cmd.exp, cmd.cmd) == (
        body["gw"], body["seq"], float(body["iat"]), float(body["exp"]), body["cmd"])
    assert _same_cbor(cmd.args, body["args"])


@STRUCTURED
@given(command_bodies(), junk(binary=True, nan=False), st.booleans(), st.booleans())
def test_valid_commands_and_acks_round_trip(
    body: dict[str, Any], result: Any, ok: bool, with_err: bool
) -> None:
    """A signed command reads back as exactly what was signed; a signed ack likewise."""
    data = sign1(PLATFORM, encode_command(**{k: body[k] for k in BODY_KEYS if k != "v"}))
    cmd = command_or_error(data, frozenset())
    assert cmd is not None
    assert_reads_back(cmd, body)
    ack = CommandAck(gw=body["gw"], seq=body["seq"], h=cmd.hash, ok=ok, t=body["iat"],
                     err="replay" if with_err else None,
                     result={"r": result} if ok else None)
    assert ack_or_error(encode_ack(GATEWAY, ack)) == ack


def _not_a_list(value: Any) -> bool:
    return not isinstance(value, list)


@st.composite
def wrong_envelopes(draw: st.DrawFn) -> bytes:
    """A signed command whose COSE_Sign1 is made wrong in one way."""
    good = sign1(PLATFORM, encode_command(gw="gw-1", seq=7, iat=NOW, exp=NOW + 60, cmd="ping"))
    protected, _, payload, signature = cbor2.loads(good).value
    parts: list[Any] = [protected, {}, payload, signature]
    header: dict[Any, Any] = {1: -8, 4: PLATFORM_KID}
    how = draw(st.sampled_from(["slot", "length", "tag", "tag-content", "untagged",
                                "header-value", "header-keys", "header", "unprotected",
                                "signature", "payload", "huge"]))
    if how == "slot":
        i = draw(st.integers(0, 3))
        value = draw(CBOR_JUNK)
        assume(not _same_cbor(value, parts[i]))
        parts[i] = value
    elif how == "length":
        parts = parts[:draw(st.integers(0, 3))] if draw(st.booleans()) else \
            [*parts, draw(CBOR_JUNK)]
    elif how == "tag":
        return cbor2.dumps(cbor2.CBORTag(draw(st.sampled_from([16, 17, 98, 6000])), parts))
    elif how == "tag-content":  # tag 18 over a map, text, a number ...
        return cbor2.dumps(cbor2.CBORTag(18, draw(CBOR_JUNK.filter(_not_a_list))))
    elif how == "untagged":
        return cbor2.dumps(parts)
    elif how == "header-value":  # wrong algorithm, kid of the wrong type or length, another kid
        header[draw(st.sampled_from([1, 4]))] = draw(
            CBOR_JUNK | st.binary(min_size=16, max_size=16) | st.integers(-300, 300))
    elif how == "header-keys":
        if draw(st.booleans()):
            del header[draw(st.sampled_from([1, 4]))]
        else:
            header[draw(st.integers(-8, 8) | st.text(max_size=3))] = draw(CBOR_JUNK)
    elif how == "header":
        parts[0] = draw(CBOR_JUNK.map(cbor2.dumps) | st.binary(max_size=20))
    elif how == "unprotected":
        parts[1] = draw(st.dictionaries(st.integers(-8, 8), CBOR_JUNK, min_size=1, max_size=3))
    elif how == "signature":
        parts[3] = draw(st.binary(max_size=80))
    elif how == "payload":
        parts[2] = draw(st.binary(max_size=40))
    elif how == "huge":  # over MAX_COMMAND_BYTES, refused before it is read
        parts[2] = payload + bytes(MAX_COMMAND_BYTES)
    if how.startswith("header-"):
        parts[0] = cbor2.dumps(header, canonical=True)
    data = cbor2.dumps(cbor2.CBORTag(18, parts))
    assume(data != good)
    return data


@STRUCTURED
@given(wrong_envelopes())
def test_wrong_envelopes_are_refused(data: bytes) -> None:
    """A COSE_Sign1 with a wrong tag, length, slot type, header, kid or signature is refused
    with malformed, unknown-key or bad-signature, by checks and not by the catch-all."""
    assert command_or_error(data, frozenset({"malformed", "unknown-key", "bad-signature"})) \
        is None
    ack_or_error(data)
    check_cose(data)


@st.composite
def signed_wrong_payloads(draw: st.DrawFn) -> tuple[bytes, Any]:
    """A valid signature by the platform's key over a payload made wrong in one way; and the
    payload as a map when it is one (None when its bytes are not one CBOR map)."""
    body: Any = draw(command_bodies())
    how = draw(st.sampled_from(["bytes", "junk", "field", "drop", "extra", "trailing"]))
    if how == "bytes":
        return draw(st.binary(max_size=60)), None
    if how == "junk":
        body = draw(CBOR_JUNK)
    elif how == "field":
        body[draw(st.sampled_from(BODY_KEYS))] = draw(CBOR_JUNK)
    elif how == "drop":
        del body[draw(st.sampled_from(BODY_KEYS))]
    elif how == "extra":
        body[draw(st.text(max_size=4) | st.integers())] = draw(CBOR_JUNK)
    payload = cbor2.dumps(body, canonical=draw(st.booleans()))
    if how == "trailing":
        return payload + draw(st.binary(min_size=1, max_size=4)), None
    return payload, body


@STRUCTURED
@given(signed_wrong_payloads())
def test_signed_wrong_payloads_are_refused(case: tuple[bytes, Any]) -> None:
    """A valid signature over a payload with wrong types, missing or extra keys, NaN or
    bignum times, or bytes that are not one CBOR map is refused as malformed or version;
    a payload docs/COMMANDS.md accepts is read back exactly."""
    payload, body = case
    cmd = command_or_error(sign1(PLATFORM, payload), frozenset({"malformed", "version"}))
    if body is None or not command_ok(body):
        assert cmd is None, body
        return
    assert cmd is not None, body
    assert_reads_back(cmd, body)


@st.composite
def ack_docs(draw: st.DrawFn) -> dict[str, Any]:
    """An ack payload docs/COMMANDS.md accepts (without the optional err and result)."""
    return {"v": 1, "gw": draw(st.text(max_size=8)), "seq": draw(st.integers(0, 2**63 - 1)),
            "h": draw(st.binary(min_size=32, max_size=32)), "ok": draw(st.booleans()),
            "t": draw(FLOATS)}


@st.composite
def signed_wrong_acks(draw: st.DrawFn) -> tuple[bytes, Any]:
    """A gateway-signed ack with one field made wrong (or junk), and its payload."""
    doc: Any = draw(ack_docs())
    how = draw(st.sampled_from(["field", "drop", "optional", "junk"]))
    if how == "field":
        doc[draw(st.sampled_from(sorted(doc)))] = draw(CBOR_JUNK)
    elif how == "drop":
        del doc[draw(st.sampled_from(sorted(doc)))]
    elif how == "optional":
        doc[draw(st.sampled_from(["err", "result"]))] = draw(CBOR_JUNK)
    else:
        doc = draw(CBOR_JUNK)
    return sign1(GATEWAY, cbor2.dumps(doc, canonical=True)), doc


@STRUCTURED
@given(signed_wrong_acks())
def test_signed_wrong_acks_are_refused(case: tuple[bytes, Any]) -> None:
    """decode_ack refuses a validly signed ack with junk of any type in a field, a field
    missing, or junk for a payload, and reads a well-typed one back as it is."""
    data, doc = case
    ack = ack_or_error(data)
    if not ack_ok(doc):
        assert ack is None, doc
        return
    assert ack is not None, doc
    assert (ack.gw, ack.seq, ack.h, ack.ok, ack.t) == (
        doc["gw"], doc["seq"], doc["h"], doc["ok"], float(doc["t"]))
    assert _same_cbor([ack.err, ack.result], [doc.get("err"), doc.get("result")])


# one field of nearly the right kind: docs/COMMANDS.md refuses each of them
_NOT_A_TIME: list[Any] = [math.nan, math.inf, -math.inf, 2**1100, -(2**1100), True, "0", None,
                          b""]
COMMAND_NEAR_MISSES: dict[str, list[Any]] = {
    "v": [True, 1.0, 2, 0, -1, "1", None],
    "gw": [b"gw-1", None, 1],
    "seq": [0, -1, 2**63, True, 1.0, "1", None],
    "iat": _NOT_A_TIME,
    "exp": _NOT_A_TIME,
    "cmd": [b"ping", None, 1],
    "args": [[], {1: 2}, {b"k": 1}, {True: 1}, None, "x"],
}
ACK_NEAR_MISSES: dict[str, list[Any]] = {
    "gw": [b"gw-1", None, 1],
    "seq": [-1, 2**63, True, 1.0, "1", None],
    "h": [b"", bytes(31), bytes(33), "00" * 32, None],
    "ok": [0, 1, None, "true"],
    "t": _NOT_A_TIME,
    "err": [b"replay", 1, ["replay"]],
    "result": [[], "ok", 1, b""],
}


def near_misses(table: dict[str, list[Any]]) -> st.SearchStrategy[tuple[str, Any]]:
    return st.sampled_from([(field, x) for field, xs in table.items() for x in xs])


@STRUCTURED
@given(command_bodies(), near_misses(COMMAND_NEAR_MISSES))
def test_commands_with_a_near_miss_field_are_refused(
    body: dict[str, Any], miss: tuple[str, Any]
) -> None:
    """A validly signed command with v true or 1.0, seq 0 or 2**63, a NaN, infinite, bignum or
    boolean time, bytes for text or a non-text args key is refused as malformed or version;
    such a time is no duration either."""
    field, value = miss
    body[field] = value
    data = sign1(PLATFORM, cbor2.dumps(body, canonical=True))
    assert command_or_error(data, frozenset({"malformed", "version"})) is None, body
    if field in ("iat", "exp"):
        assert duration(value) is None


@STRUCTURED
@given(ack_docs(), near_misses(ACK_NEAR_MISSES))
def test_acks_with_a_near_miss_field_are_refused(
    doc: dict[str, Any], miss: tuple[str, Any]
) -> None:
    """A validly signed ack with a 31- or 33-byte h, a negative or boolean seq, a NaN or bignum
    time, an ok that is 0 or 1, or an err or result of the wrong type is refused."""
    field, value = miss
    doc[field] = value
    assert ack_or_error(sign1(GATEWAY, cbor2.dumps(doc, canonical=True))) is None, doc


@STRUCTURED
@given(CBOR_JUNK, st.binary(min_size=1, max_size=8))
def test_loads_exact_round_trips_and_refuses_trailing_bytes(value: Any, extra: bytes) -> None:
    """Any CBOR item decodes to itself with lists and dicts (tag contents too, which cbor2 6
    would make tuples); any bytes after it are a CBORError."""
    data = cbor2.dumps(value)
    decoded = cbor.loads_exact(data, "fuzz")
    check_plain(decoded)
    assert cbor2.dumps(decoded) == data
    with pytest.raises(cbor.CBORError):
        cbor.loads_exact(data + extra, "fuzz")
