"""Simulated advertisers: BTHome v2 sensors, RuuviTag RAWv2, iBeacon asset tags, and a crowd
of random-address "phones". Each one turns its current state into an `Advert` for `FakeBluez`.

Encoders are the mirror of the decoders the driver uses (bthome-ble, ruuvitag-ble); the golden
vectors in tests/test_ble_decoders.py pin both sides. BTHome encryption is AES-CCM from
`cryptography` (bthome-ble's reference `encrypt_payload` prints the key to stdout).
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from branchsim.bluez.service import Advert, FakeBluez

__all__ = [
    "APPLE_COMPANY_ID",
    "BTHOME_UUID",
    "RUUVI_COMPANY_ID",
    "BTHomeSensor",
    "IBeaconTag",
    "PhoneCrowd",
    "RuuviTag",
    "broadcast",
    "random_address",
]

BTHOME_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
RUUVI_COMPANY_ID = 0x0499
APPLE_COMPANY_ID = 0x004C

# BTHome v2 object ids (https://bthome.io/format/), in the ascending order the format requires.
_BTHOME_OBJECTS: tuple[tuple[str, int, str, float], ...] = (
    # (field, object id, struct format, factor)
    ("packet_id", 0x00, "<B", 1),
    ("battery", 0x01, "<B", 1),
    ("temperature", 0x02, "<h", 0.01),
    ("humidity", 0x03, "<H", 0.01),
    ("door", 0x1A, "<B", 1),
    ("motion", 0x21, "<B", 1),
    ("window", 0x2D, "<B", 1),
)


def random_address(rng: random.Random) -> str:
    """A random resolvable-private-style address (top bits 01), as phones use."""
    first = (rng.randrange(256) & 0x3F) | 0x40
    rest = [rng.randrange(256) for _ in range(5)]
    return ":".join(f"{b:02X}" for b in [first, *rest])


@dataclass
class BTHomeSensor:
    """A BTHome v2 sensor. Fields left `None` are not sent; `bindkey` turns encryption on."""

    address: str
    temperature: float | None = None
    humidity: float | None = None
    battery: int | None = None
    door: bool | None = None
    motion: bool | None = None
    window: bool | None = None
    bindkey: bytes | None = None
    packet_id: int = 0
    counter: int = 1
    rssi: int = -65

    def payload(self) -> bytes:
        """The service data for UUID 0xFCD2 (advertising info byte + objects)."""
        objects = bytearray()
        for name, obj_id, fmt, factor in _BTHOME_OBJECTS:
            value = self.packet_id if name == "packet_id" else getattr(self, name)
            if value is None:
                continue
            objects.append(obj_id)
            objects += struct.pack(fmt, round(float(value) / factor))
        if self.bindkey is None:
            return bytes([0x40]) + bytes(objects)
        info = 0x41
        mac = bytes.fromhex(self.address.replace(":", ""))
        count = struct.pack("<I", self.counter)
        # nonce: MAC (6) + UUID16 (2) + advertising info (1) + counter (4); MIC is 4 bytes
        nonce = mac + b"\xd2\xfc" + bytes([info]) + count
        sealed = AESCCM(self.bindkey, tag_length=4).encrypt(nonce, bytes(objects), None)
        return bytes([info]) + sealed[:-4] + count + sealed[-4:]

    def advert(self) -> Advert:
        return Advert(
            self.address,
            rssi=self.rssi,
            service_data={BTHOME_UUID: self.payload()},
            service_uuids=(BTHOME_UUID,),
            alias="SBBT-002C",
        )

    def next(self) -> Advert:
        """The next transmission: a new packet id (and encryption counter)."""
        self.packet_id = (self.packet_id + 1) % 256
        self.counter += 1
        return self.advert()


@dataclass
class RuuviTag:
    """A RuuviTag sending data format 5 (RAWv2). Acceleration in mG; movement counts moves."""

    address: str
    temperature: float = 21.0
    humidity: float = 40.0
    pressure_pa: int = 101325
    acceleration_mg: tuple[int, int, int] = (0, 0, 1000)
    battery_mv: int = 3000
    tx_power_dbm: int = 4
    movement: int = 0
    sequence: int = 0
    rssi: int = -70

    def payload(self) -> bytes:
        mac = bytes.fromhex(self.address.replace(":", ""))
        power = ((self.battery_mv - 1600) << 5) | ((self.tx_power_dbm + 40) // 2)
        return struct.pack(
            ">BhHHhhhHBH6B",
            5,
            round(self.temperature * 200),
            round(self.humidity * 400),
            self.pressure_pa - 50000,
            *self.acceleration_mg,
            power,
            self.movement % 256,
            self.sequence % 65536,
            *mac,
        )

    def advert(self) -> Advert:
        return Advert(
            self.address,
            rssi=self.rssi,
            manufacturer_data={RUUVI_COMPANY_ID: self.payload()},
            alias="Ruuvi " + self.address.replace(":", "")[-4:],
        )

    def next(self) -> Advert:
        self.sequence += 1
        return self.advert()

    def move(self, acceleration_mg: tuple[int, int, int]) -> Advert:
        """The tagged asset is moved: the tag counts a movement and reports the new vector."""
        self.acceleration_mg = acceleration_mg
        self.movement += 1
        return self.next()


@dataclass
class IBeaconTag:
    """An iBeacon asset tag (Apple manufacturer data, type 0x02 0x15)."""

    address: str
    uuid: bytes = bytes.fromhex("e2c56db5dffb48d2b060d0f5a71096e0")
    major: int = 1
    minor: int = 1
    measured_power: int = -59
    rssi: int = -75

    def advert(self) -> Advert:
        data = (
            b"\x02\x15"
            + self.uuid
            + struct.pack(">HHb", self.major, self.minor, self.measured_power)
        )
        return Advert(
            self.address,
            rssi=self.rssi,
            manufacturer_data={APPLE_COMPANY_ID: data},
            address_type="public",
        )

    def next(self) -> Advert:
        return self.advert()


@dataclass
class PhoneCrowd:
    """Customers' phones: random private addresses, arbitrary manufacturer data, churn."""

    rng: random.Random = field(default_factory=random.Random)
    size: int = 20
    addresses: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    def next(self) -> Advert:
        """One advert from a phone; now and then a phone leaves and a new one arrives."""
        if len(self.addresses) < self.size or self.rng.random() < 0.1:
            self.addresses.append(random_address(self.rng))
            if len(self.addresses) > self.size:
                self.addresses.pop(0)
        address = self.rng.choice(self.addresses)
        company = self.rng.choice([APPLE_COMPANY_ID, 0x0006, 0x0075, 0x00E0])
        payload = self.rng.randbytes(self.rng.randint(4, 24))
        self.payloads.append(payload)
        return Advert(
            address,
            rssi=self.rng.randint(-95, -40),
            manufacturer_data={company: payload},
            address_type="random",
        )


async def broadcast(bluez: FakeBluez, adverts: Iterable[Advert], *, gap: float = 0.0) -> int:
    """Play adverts into the fake BlueZ; returns how many were on air."""
    sent = 0
    for advert in adverts:
        sent += bluez.advertise(advert)
        await asyncio.sleep(gap)  # yield to the bus between adverts, as a radio would pace them
    return sent
