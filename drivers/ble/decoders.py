"""Advert decoders: one advertisement in, measurements out. No I/O, never raise.

Decoding is done by the well-kept libraries (bthome-ble, ruuvitag-ble, both built on
habluetooth's `BluetoothServiceInfoBleak`); this module maps their keys and units onto ours with
one table and turns every failure into a `Decoded` with an error name the scanner counts.
iBeacon frames are checked here (Apple type 0x02 0x15, 23 bytes): the one parser package for
them (ibeacon-ble) drags in a MAC-vendor database for a 5-field struct.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from bleak.backends.device import BLEDevice
from bthome_ble import BTHomeBluetoothDeviceData
from habluetooth import BluetoothServiceInfoBleak
from ruuvitag_ble import RuuvitagBluetoothDeviceData

from agent.core.types import Value

__all__ = [
    "BTHOME_UUID",
    "DECODERS",
    "Advert",
    "BTHomeDecoder",
    "Decoded",
    "Decoder",
    "IBeaconDecoder",
    "Measurement",
    "RuuviDecoder",
    "make_decoder",
]

log = structlog.get_logger(__name__)

BTHOME_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
RUUVI_COMPANY_ID = 0x0499
APPLE_COMPANY_ID = 0x004C


@dataclass(frozen=True, slots=True)
class Advert:
    """What the scanner hands a decoder: the parts of a bleak advertisement we use."""

    address: str
    rssi: int = -127
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_data: Mapping[str, bytes] = field(default_factory=dict)
    service_uuids: tuple[str, ...] = ()
    tx_power: int | None = None
    name: str | None = None
    time: float = 0.0  # monotonic seconds: bthome-ble's duplicate window is 4 s of this clock

    def payload(self) -> bytes:
        """All advertised data, for duplicate detection and hex logging."""
        parts = [k.encode() + v for k, v in sorted(self.service_data.items())]
        parts += [k.to_bytes(2, "little") + v for k, v in sorted(self.manufacturer_data.items())]
        return b"|".join(parts)


@dataclass(frozen=True, slots=True)
class Measurement:
    type: str
    value: Value
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class Decoded:
    """`error` names why nothing was decoded ("malformed", "decrypt_failed", ...); an empty
    `measurements` with no error is a duplicate or a frame with nothing new."""

    measurements: tuple[Measurement, ...] = ()
    error: str | None = None


class Decoder(Protocol):
    def decode(self, advert: Advert) -> Decoded: ...


# Library key -> (our type, our unit, conversion). Keys not listed are ignored on purpose
# (signal_strength, packet_id, tx power: radio details, not observations).
def _same(v: Any) -> Value:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def _open_closed(v: Any) -> Value:
    return "open" if v else "closed"


_KEYS: dict[str, tuple[str, str | None, Callable[[Any], Value]]] = {
    "temperature": ("temperature", "Cel", _same),
    "humidity": ("humidity", "%RH", _same),
    "battery": ("battery", "%", _same),
    "pressure": ("pressure", "Pa", lambda v: round(float(v) * 100.0, 1)),  # hPa -> SenML Pa
    "voltage": ("battery_voltage", "V", lambda v: round(float(v) / 1000.0, 3)),  # mV -> V
    "acceleration_total": ("acceleration", "m/s2", _same),
    "movement_counter": ("movement", None, lambda v: int(v)),
    "door": ("door", None, _open_closed),
    "window": ("window", None, _open_closed),
    "opening": ("door", None, _open_closed),
    "motion": ("motion", None, lambda v: bool(v)),
    "moving": ("motion", None, lambda v: bool(v)),
}


def _service_info(advert: Advert) -> BluetoothServiceInfoBleak:
    name = advert.name or advert.address
    return BluetoothServiceInfoBleak(
        name,
        advert.address,
        advert.rssi,
        dict(advert.manufacturer_data),
        dict(advert.service_data),
        list(advert.service_uuids),
        "local",
        BLEDevice(advert.address, advert.name, None),
        None,
        False,
        advert.time,
        advert.tx_power,
    )


def _measurements(update: Any, before: Mapping[Any, Any]) -> tuple[Measurement, ...]:
    """The values this advert set. sensor-state-data's `SensorUpdate` is cumulative (it holds
    every value ever seen), but each update stores a new value object: identity tells them apart."""
    out: list[Measurement] = []
    for values in (update.entity_values, update.binary_entity_values):
        for key, sensor_value in values.items():
            mapped = _KEYS.get(key.key)
            if (
                mapped is None
                or sensor_value.native_value is None
                or before.get(key) is sensor_value
            ):
                continue
            type_, unit, convert = mapped
            out.append(Measurement(type_, convert(sensor_value.native_value), unit))
    return tuple(out)


class _LibraryDecoder:
    """Runs a sensor-state-data parser; a library exception is a malformed frame, not a crash."""

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self._last: dict[Any, Any] = {}

    def _precheck(self, advert: Advert) -> str | None:
        return None

    def decode(self, advert: Advert) -> Decoded:
        error = self._precheck(advert)
        if error is not None:
            return Decoded(error=error)
        try:
            update = self._parser.update(_service_info(advert))
        except Exception:  # any library failure on hostile bytes is counted, never raised
            return Decoded(error="malformed")
        measurements = _measurements(update, self._last)
        self._last = {**update.entity_values, **update.binary_entity_values}
        return Decoded(measurements) if measurements else Decoded(error="malformed")


class BTHomeDecoder(_LibraryDecoder):
    """BTHome v2 service data, encrypted with a per-sensor bindkey when configured.
    bthome-ble drops repeated/older packet ids and replayed encryption counters itself; this
    class only names the outcome so the scanner can count it."""

    def __init__(self, bindkey: bytes | None = None) -> None:
        self._data = BTHomeBluetoothDeviceData(bindkey=bindkey)
        super().__init__(self._data)

    def _precheck(self, advert: Advert) -> str | None:
        data = advert.service_data.get(BTHOME_UUID)
        if not data:
            return "not_bthome"
        if self._data.bindkey and not data[0] & 0x01:
            # a plaintext frame from a sensor we hold a key for: a downgrade attempt
            return "plaintext_with_key"
        return None

    def decode(self, advert: Advert) -> Decoded:
        counter_before = self._data.encryption_counter
        decoded = super().decode(advert)
        if decoded.measurements or decoded.error != "malformed":
            return decoded
        data = advert.service_data[BTHOME_UUID]
        if self._data.bindkey:
            if self._data.decryption_failed:
                return Decoded(error="decrypt_failed")
            # frame: info, ciphertext, counter (4, LE), MIC (4)
            counter = int.from_bytes(data[-8:-4], "little") if len(data) >= 9 else -1
            return Decoded(error="replayed") if counter < counter_before else Decoded()
        # Objects are in ascending id order, so a packet id (object 0x00) comes first.
        if len(data) >= 3 and data[1] == 0x00 and data[2] == self._data.packet_id:
            return Decoded()  # the same packet heard again
        return decoded


class RuuviDecoder(_LibraryDecoder):
    """RuuviTag manufacturer data (RAWv2 = format 5, and 3/6/E1) through ruuvitag-ble."""

    def __init__(self) -> None:
        super().__init__(RuuvitagBluetoothDeviceData())

    def _precheck(self, advert: Advert) -> str | None:
        data = advert.manufacturer_data.get(RUUVI_COMPANY_ID)
        if not data:
            return "not_ruuvi"
        return None


_IBEACON = struct.Struct(">2s16sHHb")


class IBeaconDecoder:
    """An iBeacon asset tag carries no measurement: being heard is the observation (missing and
    back are raised by the scanner). The frame is still checked so garbage is counted."""

    def decode(self, advert: Advert) -> Decoded:
        data = advert.manufacturer_data.get(APPLE_COMPANY_ID, b"")
        if len(data) < _IBEACON.size or data[:2] != b"\x02\x15":
            return Decoded(error="malformed")
        return Decoded()


DECODERS: dict[str, Callable[[bytes | None], Decoder]] = {
    "bthome": lambda key: BTHomeDecoder(key),
    "ruuvi": lambda key: RuuviDecoder(),
    "ibeacon": lambda key: IBeaconDecoder(),
}


def make_decoder(kind: str, bindkey: bytes | None = None) -> Decoder:
    return DECODERS[kind](bindkey)
