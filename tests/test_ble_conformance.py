"""The installed bleak still has what the fake BlueZ and the BLE driver rely on."""

from __future__ import annotations

import inspect
import typing

from bleak.backends.bluezdbus import defs, manager, scanner
from bleak.exc import BleakBluetoothNotAvailableReason

from branchsim.bluez import FakeDevice


def test_bleak_bluez_backend_uses_what_the_fake_exports() -> None:
    """bleak's BlueZ manager reads GetManagedObjects, Roles/Powered and calls the discovery trio."""
    source = inspect.getsource(manager.BlueZManager)
    for needle in [
        '"GetManagedObjects"',
        '"Roles"',
        '"Powered"',
        '"central"',
        '"SetDiscoveryFilter"',
        '"StartDiscovery"',
        '"StopDiscovery"',
        '"InterfacesAdded"',
        '"InterfacesRemoved"',
        '"PropertiesChanged"',
    ]:
        assert needle in source, needle
    assert defs.BLUEZ_SERVICE == "org.bluez"
    assert defs.ADAPTER_INTERFACE == "org.bluez.Adapter1"
    assert defs.DEVICE_INTERFACE == "org.bluez.Device1"
    assert callable(manager.get_global_bluez_manager)


def test_fake_device_exports_every_property_bleak_scanner_reads() -> None:
    """Every Device1 property bleak's scanner reads is a property of the fake Device1."""
    source = inspect.getsource(scanner.BleakScannerBlueZDBus._handle_advertising_data)
    declared = set(typing.get_type_hints(defs.Device1))
    read = {name for name in declared if f'"{name}"' in source}
    assert {"Address", "UUIDs", "ManufacturerData", "ServiceData", "RSSI", "TxPower"} <= read
    fake = {name for name, _ in inspect.getmembers(FakeDevice) if name[:1].isupper()}
    assert read - {"Name"} <= fake  # BlueZ omits Name for devices that advertise none, as we do
    assert {"Adapter", "Alias"} <= fake


def test_not_available_reasons_the_driver_classifies_exist() -> None:
    """The BleakBluetoothNotAvailableReason members the driver maps to advice still exist."""
    for name in ["NO_BLUETOOTH", "POWERED_OFF", "NO_BLE_CENTRAL_ROLE", "DENIED_BY_SYSTEM"]:
        assert hasattr(BleakBluetoothNotAvailableReason, name), name
