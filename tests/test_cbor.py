"""agent.core.cbor decodes by what the bytes say: a CBOR array is a list and a map a dict, also
inside tags, whatever the cbor2 version. `make test` runs this module under the runtime
lock's cbor2 (6.x) and again under cbor2 5.x (`make test-compat`)."""

from __future__ import annotations

from importlib.metadata import version

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.cbor import CBORError, loads_exact, plain
from agent.protocol import open_sign1, sign1

NESTED = {"a": [1, [2, {"b": [3]}]], "m": {"k": [b"x", None, 1.5]}}


def test_arrays_are_lists_and_maps_dicts_inside_a_tag() -> None:
    """A tag's content is decoded like everything else (cbor2 6 decodes it immutably)."""
    data = cbor2.dumps(cbor2.CBORTag(18, [b"p", {}, NESTED, [1, 2]]))
    value = loads_exact(data, "test")
    assert isinstance(value, cbor2.CBORTag) and value.tag == 18
    assert value.value == [b"p", {}, NESTED, [1, 2]]
    assert type(value.value) is list and type(value.value[1]) is dict
    assert type(value.value[2]["a"][1]) is list and type(value.value[2]["a"][1][1]) is dict


def test_top_level_structures_are_plain() -> None:
    """Outside tags too: what cbor2 5 and 6 agree on stays as it is."""
    value = loads_exact(cbor2.dumps(NESTED), "test")
    assert value == NESTED and type(value["m"]["k"]) is list


def test_plain_leaves_flat_maps_alone_and_converts_read_only_ones() -> None:
    """A flat map of scalars is returned without a copy; tuples and read-only maps become
    lists and dicts (the shapes cbor2 6 produces inside tags)."""
    flat = {"id": 1, "v": 2.5, "src": "x"}
    assert plain(flat) is flat
    raw = cbor2.loads(cbor2.dumps(cbor2.CBORTag(1000, {"a": [1, {"b": [2]}]})))
    converted = plain(raw.value)
    assert converted == {"a": [1, {"b": [2]}]}
    assert type(converted) is dict and type(converted["a"]) is list
    assert plain((1, (2,))) == [1, [2]]


@pytest.mark.parametrize("data,why", [
    (cbor2.dumps([1]) + b"\x00", "trailing bytes"),
    (b"\x9f" * 3000, "test: "),       # unterminated, deeply nested indefinite arrays
    (b"\x81" * 5000 + b"\x00", "test: "),  # nesting far past any limit
    (b"\xff", "test: "),                 # a stray break: cbor2 5 returns it as a value
    (b"\x82\x01\xff", "test: "),
    (b"\xa1\x01\xff", "test: "),
    (b"", "test: "),
])
def test_bad_input_is_a_cbor_error(data: bytes, why: str) -> None:
    """Hostile or truncated bytes raise CBORError (a ValueError), never anything else."""
    with pytest.raises(CBORError, match=why):
        loads_exact(data, "test")
    assert issubclass(CBORError, ValueError)


def test_not_bytes_is_refused() -> None:
    """A str is not CBOR."""
    with pytest.raises(CBORError, match="not bytes"):
        loads_exact("a1", "test")  # type: ignore[arg-type]  # the point of the test


def test_sign1_round_trip_under_this_cbor2() -> None:
    """A COSE_Sign1 made here opens here: the envelope is a 4-element array inside tag 18,
    the container that cbor2 6 decodes as a tuple."""
    key = Ed25519PrivateKey.generate()
    msg = sign1(key, cbor2.dumps({"x": [1, 2]}))
    kid, payload = open_sign1(msg, lambda _kid: key.public_key())
    assert loads_exact(payload, "payload") == {"x": [1, 2]} and len(kid) == 16
    print(f"cbor2 {version('cbor2')}: raw envelope type {type(cbor2.loads(msg).value).__name__}")
