"""Pure serial decoders: golden vectors compared with ==, and random garbage never raises."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.core.types import ALERT, DIAGNOSTIC, TELEMETRY, Reading
from drivers.serial import LineConfig, ModbusConfig, Q1Status, SerialConfig, parse_q1
from drivers.serial.config import ModbusRegister
from drivers.serial.line import LineDecoder, LineSplitter, decode_line
from drivers.serial.megatec import q1_readings
from drivers.serial.modbus import ReadBlock, decode_registers, plan_reads

GARBAGE = settings(max_examples=10_000, deadline=None)
# words and chunk cuts are not bytes from the wire; fewer examples cover them
STRUCTURED = settings(max_examples=2_000, deadline=None)

NUT_Q1 = b"(215.0 195.0 230.0 014 49.0 22.7 30.0 00000000\r"  # NUT blazer test table
NUT_STATUS = Q1Status(
    input_voltage=215.0,
    fault_voltage=195.0,
    output_voltage=230.0,
    load=14,
    frequency=49.0,
    battery_voltage=22.7,
    temperature=30.0,
    utility_fail=False,
    battery_low=False,
    bypass=False,
    ups_failed=False,
    standby=False,
    test=False,
    shutdown=False,
    beeper=False,
)


def test_q1_golden_vector() -> None:
    """NUT's Q1 test reply parses to exactly these values."""
    assert parse_q1(NUT_Q1) == NUT_STATUS


def test_q1_status_bits_in_order() -> None:
    """Bit 7 is utility fail ... bit 0 beeper, per-cell battery voltage accepted."""
    status = parse_q1(b"(000.0 195.0 229.0 014 50.0 2.05 35.0 11001001\r")
    assert status == Q1Status(
        input_voltage=0.0,
        fault_voltage=195.0,
        output_voltage=229.0,
        load=14,
        frequency=50.0,
        battery_voltage=2.05,
        temperature=35.0,
        utility_fail=True,
        battery_low=True,
        bypass=False,
        ups_failed=False,
        standby=True,
        test=False,
        shutdown=False,
        beeper=True,
    )


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"Q1\r",  # an echoed command (unit did not understand)
        b"#230.0 000 024.0 50.0\r",  # ratings, not status
        b"215.0 195.0 230.0 014 49.0 22.7 30.0 00000000\r",  # no '('
        b"(215.0 195.0 230.0 014 49.0 22.7 30.0\r",  # bits missing
        b"(215.0 195.0 230.0 014 49.0 22.7 30.0 0000000\r",  # 7 bits
        b"(215.0 195.0 230.0 014 49.0 22.7 30.0 00000002\r",  # not a bit
        b"(215.0 19x.0 230.0 014 49.0 22.7 30.0 00000000\r",  # not a number
        b"(nan 195.0 230.0 014 49.0 22.7 30.0 00000000\r",  # not finite
        b"(\xff15.0 195.0 230.0 014 49.0 22.7 30.0 00000000\r",  # not ASCII
    ],
)
def test_q1_malformed_is_none(line: bytes) -> None:
    """Anything that is not a Q1 status line gives None, not an exception."""
    assert parse_q1(line) is None


def test_q1_readings_flags_on_change_only() -> None:
    """Measurements every time with units; flags first time and then only when they change."""
    first = q1_readings(NUT_STATUS, None, "ups.main", 1.0)
    assert [(r.type, r.value, r.unit, r.priority) for r in first] == [
        ("ups.input_voltage", 215.0, "V", TELEMETRY),
        ("ups.output_voltage", 230.0, "V", TELEMETRY),
        ("ups.load", 14, "%", TELEMETRY),
        ("ups.frequency", 49.0, "Hz", TELEMETRY),
        ("ups.battery_voltage", 22.7, "V", TELEMETRY),
        ("ups.temperature", 30.0, "Cel", TELEMETRY),
        ("ups.on_battery", False, None, ALERT),
        ("ups.battery_low", False, None, ALERT),
        ("ups.bypass", False, None, TELEMETRY),
        ("ups.fault", False, None, ALERT),
        ("ups.shutdown_active", False, None, ALERT),
        ("ups.test", False, None, DIAGNOSTIC),
    ]
    on_battery = parse_q1(b"(000.0 195.0 230.0 014 49.0 22.7 30.0 10000000\r")
    assert on_battery is not None
    again = q1_readings(on_battery, NUT_STATUS, "ups.main", 2.0)
    assert [r for r in again if not r.unit] == [
        Reading("ups.main", "ups.on_battery", True, None, 2.0, ALERT)
    ]


@pytest.mark.parametrize(
    ("line", "fmt", "columns", "expected"),
    [
        (b"temp=21.5 hum=40", "kv", (), ({"temp": 21.5, "hum": 40.0}, None)),
        (b"door=open ok=true", "kv", (), ({"door": "open", "ok": True}, None)),
        (b"temp=21.5 hum", "kv", (), (None, "malformed")),
        (b"=3", "kv", (), (None, "malformed")),
        (b"21.5,40", "csv", ("temp", "hum"), ({"temp": 21.5, "hum": 40.0}, None)),
        (b"temp,hum", "csv", ("temp", "hum"), (None, "malformed")),  # header line
        (b"21.5,40,7", "csv", ("temp", "hum"), (None, "malformed")),
        (
            b'{"temp":21.5,"hum":40,"id":"a"}',
            "json",
            (),
            ({"temp": 21.5, "hum": 40.0, "id": "a"}, None),
        ),
        (b'{"temp":21.5,"nested":{"x":1}}', "json", (), ({"temp": 21.5}, None)),
        (b"[1,2]", "json", (), (None, "malformed")),
        (b'{"temp":', "json", (), (None, "malformed")),
        (b"\xf4\xe5\xed\xf0=21.5", "kv", (), (None, "framing")),  # high bit set
        (b"temp=21.5\rhum=40", "kv", (), (None, "framing")),  # bare CR inside
    ],
)
def test_decode_line_table(
    line: bytes, fmt: str, columns: tuple[str, ...], expected: object
) -> None:
    """Each line format decodes to named values, or to the kind of error it is."""
    assert decode_line(line, fmt, columns) == expected  # type: ignore[arg-type]  # fmt is a literal from the table


def test_line_decoder_maps_fields_with_units_and_scale() -> None:
    """Configured fields become typed readings with SenML units; unlisted fields are ignored."""
    cfg = LineConfig.model_validate(
        {
            "name": "env",
            "port": "/dev/null",
            "fields": {
                "temp": {"type": "temperature", "unit": "Cel"},
                "hum": {"type": "humidity", "unit": "%RH", "scale": 0.1},
            },
        }
    )
    decoder = LineDecoder(cfg, "line.env")
    assert decoder.decode(b"temp=21.5 hum=400 extra=1", 5.0) == [
        Reading("line.env", "temperature", 21.5, "Cel", 5.0),
        Reading("line.env", "humidity", 40.0, "%RH", 5.0),
    ]
    assert decoder.decode(b"\xff\xfe", 6.0) == []
    assert decoder.errors == {"framing": 1}


def test_line_splitter_chunks_crlf_and_overlong() -> None:
    """Lines are reassembled across chunks, CRLF accepted, over-long lines dropped whole."""
    splitter = LineSplitter(b"\n", max_len=16)
    assert splitter.feed(b"a=1\r\nb=") == [b"a=1"]
    assert splitter.feed(b"2\n" + b"x" * 40) == [b"b=2"]
    assert splitter.feed(b"y" * 40 + b"\nc=3\n") == [b"c=3"]
    assert splitter.errors == {"overlong": 1}


def _reg(name: str, address: int, type_: str, **kw: object) -> ModbusRegister:
    return ModbusRegister.model_validate({"name": name, "address": address, "type": type_, **kw})


def test_modbus_decode_golden_words() -> None:
    """float32/uint32/int16 words decode per type, word order and scale."""
    regs = [
        _reg("voltage", 0, "float32", unit="V"),
        _reg("energy", 2, "uint32", word_order="little", unit="Wh"),
        _reg("temperature", 4, "int16", scale=0.1, unit="Cel"),
    ]
    (block,) = plan_reads(regs)
    assert block == ReadBlock("holding", 0, 5, tuple(regs))
    words = [0x4366, 0x8000, 0xE240, 0x0001, 0xFF38]  # 230.5 ; 123456 little ; -200
    assert decode_registers(block, words, "modbus.m", 1.0) == [
        Reading("modbus.m", "voltage", 230.5, "V", 1.0),
        Reading("modbus.m", "energy", 123456, "Wh", 1.0),
        Reading("modbus.m", "temperature", -20.0, "Cel", 1.0),
    ]
    assert struct.unpack(">f", bytes.fromhex("43668000"))[0] == 230.5


def test_modbus_plan_splits_functions_and_long_spans() -> None:
    """Holding and input registers are read separately; spans over 125 registers are split."""
    regs = [
        _reg("a", 0, "uint16"),
        _reg("b", 200, "uint16"),
        _reg("c", 0, "uint16", function="input"),
    ]
    assert [(b.function, b.address, b.count) for b in plan_reads(regs)] == [
        ("holding", 0, 1),
        ("holding", 200, 1),
        ("input", 0, 1),
    ]


def test_serial_config_rejects_duplicates_unknown_keys_and_csv_without_columns() -> None:
    """Config errors are clear: duplicate names, shared ports, unknown keys, csv columns."""
    line = {"name": "a", "port": "/dev/ttyA"}
    with pytest.raises(ValidationError, match=r"duplicate serial\.line names: a"):
        SerialConfig.model_validate({"line": [line, {**line, "port": "/dev/ttyB"}]})
    with pytest.raises(ValidationError, match="more than one device: /dev/ttyA"):
        SerialConfig.model_validate({"line": [line, {**line, "name": "b"}]})
    with pytest.raises(ValidationError, match="baudrat"):
        SerialConfig.model_validate({"ups": [{**line, "baudrat": 2400}]})
    with pytest.raises(ValidationError, match="needs 'columns'"):
        LineConfig.model_validate({**line, "format": "csv"})
    with pytest.raises(ValidationError, match="duplicate register names: v"):
        ModbusConfig.model_validate(
            {**line, "registers": [{"name": "v", "address": 0}, {"name": "v", "address": 1}]}
        )


@GARBAGE
@given(st.binary(max_size=80))
def test_q1_garbage_never_raises(data: bytes) -> None:
    """Random bytes into parse_q1 give a status or None, never an exception."""
    assert parse_q1(data) is None or isinstance(parse_q1(data), Q1Status)


@GARBAGE
@given(st.binary(max_size=120), st.sampled_from(["kv", "csv", "json"]))
def test_line_garbage_never_raises(data: bytes, fmt: str) -> None:
    """Random bytes into each line format give fields or an error kind, never an exception."""
    fields, error = decode_line(data, fmt, ("temp", "hum"))  # type: ignore[arg-type]  # fmt sampled from the literals
    assert (fields is None) != (error is None)


@STRUCTURED
@given(st.lists(st.integers(0, 0xFFFF), max_size=12))
def test_modbus_garbage_words_never_raise(words: list[int]) -> None:
    """Any register words (short replies too) decode without an exception."""
    regs = [
        _reg("a", 0, "float32"),
        _reg("b", 2, "int32", word_order="little"),
        _reg("c", 4, "int16", scale=0.1),
        _reg("d", 5, "uint32"),
    ]
    (block,) = plan_reads(regs)
    readings = decode_registers(block, words, "modbus.m", None)
    assert len(readings) <= len(regs)


@STRUCTURED
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20))
def test_line_splitter_random_chunks(data: bytes, cuts: list[int]) -> None:
    """Fed in random chunks, the splitter yields the same bounded lines as fed at once."""
    whole = LineSplitter(b"\n", max_len=64).feed(data)
    splitter = LineSplitter(b"\n", max_len=64)
    got: list[bytes] = []
    pos = 0
    for cut in cuts:
        got += splitter.feed(data[pos : pos + cut])
        pos += cut
    got += splitter.feed(data[pos:])
    assert got == whole
    assert all(len(line) <= 64 and b"\n" not in line for line in got)
