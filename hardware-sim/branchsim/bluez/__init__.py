"""Simulated BlueZ: a private dbus-daemon, a fake `org.bluez` service, and advertisers.

    async with PrivateSystemBus() as bus, FakeBluez(bus.address) as bluez:
        # run bleak with DBUS_SYSTEM_BUS_ADDRESS=bus.address
        bluez.advertise(BTHomeSensor("A4:C1:38:00:00:01", temperature=21.5).next())
"""

from branchsim.bluez.advertisers import (
    BTHOME_UUID,
    BTHomeSensor,
    IBeaconTag,
    PhoneCrowd,
    RuuviTag,
    broadcast,
    random_address,
)
from branchsim.bluez.daemon import PrivateSystemBus
from branchsim.bluez.service import Advert, FakeAdapter, FakeBluez, FakeDevice

__all__ = [
    "BTHOME_UUID",
    "Advert",
    "BTHomeSensor",
    "FakeAdapter",
    "FakeBluez",
    "FakeDevice",
    "IBeaconTag",
    "PhoneCrowd",
    "PrivateSystemBus",
    "RuuviTag",
    "broadcast",
    "random_address",
]
