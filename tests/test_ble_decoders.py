"""BLE decoders (golden vectors, fuzz), config validation and the presence counter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from branchsim.bluez import Advert as SimAdvert
from branchsim.bluez import BTHomeSensor, IBeaconTag, RuuviTag
from drivers.ble import BleConfig
from drivers.ble.decoders import (
    BTHOME_UUID,
    Advert,
    BTHomeDecoder,
    Decoded,
    IBeaconDecoder,
    Measurement,
    RuuviDecoder,
    make_decoder,
)
from drivers.ble.privacy import PresenceCounter

KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")


def to_driver(a: SimAdvert, t: float = 0.0) -> Advert:
    return Advert(
        a.address,
        a.rssi,
        a.manufacturer_data,
        a.service_data,
        a.service_uuids,
        a.tx_power,
        a.alias,
        t,
    )


GOLDEN = [
    # (encoder output, expected bytes): pins the simulator to the published formats
    (
        BTHomeSensor(
            "A4:C1:38:00:00:01", temperature=21.5, humidity=45.25, battery=87, packet_id=1
        ).payload(),
        bytes.fromhex("400001015702660803ad11"),
    ),
    (
        RuuviTag(
            "C8:25:2D:8E:9C:01",
            temperature=4.5,
            humidity=60.5,
            pressure_pa=100400,
            acceleration_mg=(10, -20, 990),
            battery_mv=2950,
            movement=3,
            sequence=1,
        ).payload(),
        bytes.fromhex("0503845e88c4e0000affec03dea8d6030001c8252d8e9c01"),
    ),
]


@pytest.mark.parametrize(("payload", "expected"), GOLDEN)
def test_simulator_encoders_match_golden_bytes(payload: bytes, expected: bytes) -> None:
    """The simulated BTHome and Ruuvi frames are byte-for-byte the published formats."""
    assert payload == expected


DECODE_CASES = [
    (
        "bthome",
        None,
        BTHomeSensor(
            "A4:C1:38:00:00:01",
            temperature=21.5,
            humidity=45.25,
            battery=87,
            door=True,
            motion=False,
        ),
        (
            Measurement("battery", 87.0, "%"),
            Measurement("temperature", 21.5, "Cel"),
            Measurement("humidity", 45.25, "%RH"),
            Measurement("door", "open"),
            Measurement("motion", False),
        ),
    ),
    (
        "bthome",
        KEY,
        BTHomeSensor("54:48:E6:8F:80:A5", temperature=-3.2, window=False, bindkey=KEY),
        (Measurement("temperature", -3.2, "Cel"), Measurement("window", "closed")),
    ),
    (
        "ruuvi",
        None,
        RuuviTag(
            "C8:25:2D:8E:9C:01",
            temperature=-10.25,
            humidity=80.0,
            pressure_pa=99000,
            acceleration_mg=(0, 0, 1000),
            battery_mv=2400,
            movement=9,
        ),
        (
            Measurement("temperature", -10.25, "Cel"),
            Measurement("humidity", 80.0, "%RH"),
            Measurement("pressure", 99000.0, "Pa"),
            Measurement("battery_voltage", 2.4, "V"),
            Measurement("movement", 9),
            Measurement("acceleration", 9.81, "m/s2"),
        ),
    ),
    ("ibeacon", None, IBeaconTag("DC:0D:30:00:00:07"), ()),
]


@pytest.mark.parametrize(("kind", "key", "device", "expected"), DECODE_CASES)
def test_decoders_map_values_and_units(
    kind: str,
    key: bytes | None,
    device: BTHomeSensor | RuuviTag | IBeaconTag,
    expected: tuple[Measurement, ...],
) -> None:
    """Each decoder turns its frame into our reading types, values and SenML-style units."""
    assert make_decoder(kind, key).decode(to_driver(device.next(), 1.0)) == Decoded(expected)


def test_bthome_duplicate_packet_id_is_not_an_error() -> None:
    """The same BTHome packet id heard again yields nothing, and is not counted as an error."""
    sensor, decoder = BTHomeSensor("A4:C1:38:00:00:01", temperature=20.0), BTHomeDecoder()
    assert decoder.decode(to_driver(sensor.next(), 1.0)).measurements
    assert decoder.decode(to_driver(sensor.advert(), 1.5)) == Decoded()


def test_bthome_encryption_outcomes_are_named() -> None:
    """Wrong key, plaintext from a keyed sensor and an older counter are errors by name."""
    sensor = BTHomeSensor("54:48:E6:8F:80:A5", temperature=19.0, bindkey=KEY, counter=500)
    assert BTHomeDecoder(bytes(16)).decode(to_driver(sensor.next(), 1)).error == "decrypt_failed"
    plain = BTHomeSensor("54:48:E6:8F:80:A5", temperature=19.0)
    assert BTHomeDecoder(KEY).decode(to_driver(plain.next(), 1)).error == "plaintext_with_key"
    decoder = BTHomeDecoder(KEY)
    assert decoder.decode(to_driver(sensor.next(), 1)).measurements
    sensor.counter = 200
    assert decoder.decode(to_driver(sensor.next(), 30)).error == "replayed"


def test_truncated_frames_are_malformed() -> None:
    """Truncated BTHome / Ruuvi / iBeacon frames decode to a 'malformed' error, not readings."""
    addr = "A4:C1:38:00:00:01"
    assert (
        BTHomeDecoder().decode(Advert(addr, service_data={BTHOME_UUID: b"\x40\x02"})).error
        == "malformed"
    )
    assert (
        RuuviDecoder().decode(Advert(addr, manufacturer_data={0x0499: b"\x05\x01"})).error
        == "malformed"
    )
    assert (
        IBeaconDecoder().decode(Advert(addr, manufacturer_data={0x004C: b"\x02\x15"})).error
        == "malformed"
    )


def _fuzz_advert(data: bytes, company: int) -> Advert:
    return Advert(
        "A4:C1:38:00:00:01",
        service_data={BTHOME_UUID: data},
        manufacturer_data={company: data},
        time=1.0,
    )


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["bthome", "ruuvi", "ibeacon"]),
    key=st.sampled_from([None, KEY]),
    data=st.binary(max_size=40),
    company=st.sampled_from([0x0499, 0x004C, 0x0006]),
)
def test_decoders_never_raise_on_random_bytes(
    kind: str, key: bytes | None, data: bytes, company: int
) -> None:
    """Random service/manufacturer data never raises out of any decoder."""
    result = make_decoder(kind, key if kind == "bthome" else None).decode(
        _fuzz_advert(data, company)
    )
    assert isinstance(result, Decoded)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=30), temp=st.floats(-40, 80), hum=st.floats(0, 100))
def test_decoders_never_raise_on_truncated_valid_frames(cut: int, temp: float, hum: float) -> None:
    """Valid frames cut at any length never raise out of the decoders."""
    frames = [
        ("bthome", BTHomeSensor("A4:C1:38:00:00:01", temperature=temp, humidity=hum).next()),
        ("ruuvi", RuuviTag("C8:25:2D:8E:9C:01", temperature=temp, humidity=hum).next()),
        ("ibeacon", IBeaconTag("DC:0D:30:00:00:07").next()),
    ]
    for kind, sim in frames:
        adv = to_driver(sim, 1.0)
        cut_adv = Advert(
            adv.address,
            service_data={k: v[:cut] for k, v in adv.service_data.items()},
            manufacturer_data={k: v[:cut] for k, v in adv.manufacturer_data.items()},
        )
        assert isinstance(make_decoder(kind).decode(cut_adv), Decoded)


def test_config_toml_shape_and_validation() -> None:
    """The [ble] table validates addresses and keys, normalises case, and rejects typos."""
    cfg = BleConfig.model_validate(
        {
            "adapter": "hci0",
            "presence": {"enabled": True, "window_s": 60},
            "sensors": [
                {
                    "name": "vault",
                    "address": "54:48:e6:8f:80:a5",
                    "decoder": "bthome",
                    "bindkey": KEY.hex(),
                    "missing_after_s": 600,
                }
            ],
        }
    )
    assert cfg.sensors[0].address == "54:48:E6:8F:80:A5"
    assert cfg.sensors[0].bindkey_bytes() == KEY
    assert KEY.hex() not in repr(cfg)
    bad = [
        {"sensors": [{"name": "x", "address": "nope", "decoder": "bthome"}]},
        {
            "sensors": [
                {
                    "name": "x",
                    "address": "54:48:E6:8F:80:A5",
                    "decoder": "ruuvi",
                    "bindkey": KEY.hex(),
                }
            ]
        },
        {
            "sensors": [
                {"name": "x", "address": "54:48:E6:8F:80:A5", "decoder": "bthome", "bindkey": "abc"}
            ]
        },
        {"watchdg_s": 5},
        {
            "sensors": [
                {"name": "a", "address": "54:48:E6:8F:80:A5", "decoder": "ruuvi"},
                {"name": "b", "address": "54:48:E6:8F:80:A5", "decoder": "ruuvi"},
            ]
        },
    ]
    for raw in bad:
        with pytest.raises(ValidationError):
            BleConfig.model_validate(raw)


def test_presence_counter_counts_distinct_and_rotates_key_daily() -> None:
    """Distinct addresses per window are counted; the hash key changes with the UTC day."""
    now = [86_400.0 * 20_000 + 10]
    keys: list[bytes] = []

    def key_source(n: int) -> bytes:
        keys.append(bytes([len(keys)]) * n)
        return keys[-1]

    counter = PresenceCounter(lambda: now[0], key_source)
    for address in ["AA:00:00:00:00:01", "aa:00:00:00:00:01", "AA:00:00:00:00:02"]:
        counter.observe(address)
    assert counter.take() == 2
    assert counter.take() == 0
    counter.observe("AA:00:00:00:00:01")
    now[0] += 86_400
    counter.observe("AA:00:00:00:00:01")
    assert len(keys) == 2
    assert counter.take() == 2  # unlinkable across the key change, by design
