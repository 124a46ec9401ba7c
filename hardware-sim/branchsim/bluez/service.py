"""A fake BlueZ: a dbus-fast service that owns `org.bluez` and exports what bleak's BlueZ
backend uses (facts checked against bleak 3.1, see tests/test_ble_conformance.py):

- `GetManagedObjects` at `/` (dbus-fast's built-in ObjectManager answers it),
- `org.bluez.Adapter1` at `/org/bluez/hci0` with `Roles` containing "central" and `Powered`,
  and `SetDiscoveryFilter`, `StartDiscovery`, `StopDiscovery`,
- one `org.bluez.Device1` per advertiser at `/org/bluez/hci0/dev_XX_XX_...`: a new device is
  `InterfacesAdded`, a repeated advert `PropertiesChanged`, a vanished device is unexported.

Faults it can play: adapter powered off (and rfkill-blocked so it refuses power-on), adapter
removed and re-added, `StartDiscovery` failing with `org.bluez.Error.InProgress` / `NotReady`,
and (with `PrivateSystemBus.stop`) the whole bus going away.
"""

# No `from __future__ import annotations`: dbus-fast reads the D-Bus signatures from the
# evaluated `Annotated[...]` hints of the decorated methods.

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
from dbus_fast import BusType, DBusError, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusDict,
    DBusInt16,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

__all__ = [
    "BLUEZ_SERVICE",
    "Advert",
    "FakeAdapter",
    "FakeBluez",
    "FakeDevice",
    "device_path",
]

BLUEZ_SERVICE = "org.bluez"
ERROR_IN_PROGRESS = "org.bluez.Error.InProgress"
ERROR_NOT_READY = "org.bluez.Error.NotReady"
ERROR_FAILED = "org.bluez.Error.Failed"
ERROR_BLOCKED = "org.bluez.Error.Blocked"

DBusStrList = Annotated[list[str], DBusSignature("as")]
DBusManufacturerData = Annotated[dict[int, Variant], DBusSignature("a{qv}")]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Advert:
    """One advertisement as BlueZ would report it. `service_data` is keyed by 128-bit UUID."""

    address: str
    rssi: int = -60
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    service_data: dict[str, bytes] = field(default_factory=dict)
    service_uuids: tuple[str, ...] = ()
    tx_power: int = 0
    alias: str | None = None
    address_type: str = "public"


def device_path(adapter_path: str, address: str) -> str:
    return f"{adapter_path}/dev_{address.upper().replace(':', '_')}"


class FakeAdapter(ServiceInterface):
    """`org.bluez.Adapter1`. Do not assign `self.name`: dbus-fast uses it for the interface."""

    def __init__(self, bluez: "FakeBluez", address: str) -> None:
        super().__init__("org.bluez.Adapter1")
        self._bluez = bluez
        self._address = address
        self.powered = True
        self.blocked = False
        self.discovering = False
        self.discovery_filter: dict[str, Any] = {}
        # Errors the next StartDiscovery calls answer with, in order.
        self.start_errors: list[str] = []
        self.start_calls = 0

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return self._address

    @dbus_property(access=PropertyAccess.READ)
    def AddressType(self) -> DBusStr:
        return "public"

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> DBusStr:
        return "branchsim"

    @dbus_property(access=PropertyAccess.READ)
    def Roles(self) -> DBusStrList:
        return ["central", "peripheral"]

    @dbus_property(access=PropertyAccess.READ)
    def Discovering(self) -> DBusBool:
        return self.discovering

    @dbus_property()
    def Powered(self) -> DBusBool:
        return self.powered

    # dbus-fast's setter idiom (like `property`) reuses the name, which mypy calls a redefinition
    @Powered.setter  # type: ignore[no-redef]
    def Powered(self, value: DBusBool) -> None:
        if value and self.blocked:
            raise DBusError(ERROR_BLOCKED, "Blocked through rfkill")
        self.set_powered(value)

    def set_powered(self, value: bool) -> None:
        self.powered = value
        changed: dict[str, Any] = {"Powered": value}
        if not value and self.discovering:
            self.discovering = False
            changed["Discovering"] = False
        self.emit_properties_changed(changed)

    @dbus_method()
    def SetDiscoveryFilter(
        self, properties: Annotated[dict[str, Variant], DBusSignature("a{sv}")]
    ) -> None:
        if not self.powered:
            raise DBusError(ERROR_NOT_READY, "Resource Not Ready")
        self.discovery_filter = {k: v.value for k, v in properties.items()}

    @dbus_method()
    def StartDiscovery(self) -> None:
        self.start_calls += 1
        if self.start_errors:
            raise DBusError(self.start_errors.pop(0), "injected by branchsim")
        if not self.powered:
            raise DBusError(ERROR_NOT_READY, "Resource Not Ready")
        if not self.discovering:
            self.discovering = True
            self.emit_properties_changed({"Discovering": True})

    @dbus_method()
    def StopDiscovery(self) -> None:
        if not self.powered:
            raise DBusError(ERROR_NOT_READY, "Resource Not Ready")
        if not self.discovering:
            raise DBusError(ERROR_FAILED, "No discovery started")
        self.discovering = False
        self.emit_properties_changed({"Discovering": False})

    @dbus_method()
    def RemoveDevice(self, device: DBusObjectPath) -> None:
        self._bluez.remove_device_path(device)


class FakeDevice(ServiceInterface):
    """`org.bluez.Device1` carrying the last advertisement of one remote device."""

    def __init__(self, adapter_path: str, advert: Advert) -> None:
        super().__init__("org.bluez.Device1")
        self._adapter_path = adapter_path
        self.advert = advert

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return self.advert.address

    @dbus_property(access=PropertyAccess.READ)
    def AddressType(self) -> DBusStr:
        return self.advert.address_type

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> DBusStr:
        return self.advert.alias or self.advert.address.replace(":", "-")

    @dbus_property(access=PropertyAccess.READ)
    def Adapter(self) -> DBusObjectPath:
        return self._adapter_path

    @dbus_property(access=PropertyAccess.READ)
    def Paired(self) -> DBusBool:
        return False

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> DBusBool:
        return False

    @dbus_property(access=PropertyAccess.READ)
    def ServicesResolved(self) -> DBusBool:
        return False

    @dbus_property(access=PropertyAccess.READ)
    def RSSI(self) -> DBusInt16:
        return self.advert.rssi

    @dbus_property(access=PropertyAccess.READ)
    def TxPower(self) -> DBusInt16:
        return self.advert.tx_power

    @dbus_property(access=PropertyAccess.READ)
    def UUIDs(self) -> DBusStrList:
        return list(self.advert.service_uuids)

    @dbus_property(access=PropertyAccess.READ)
    def ManufacturerData(self) -> DBusManufacturerData:
        return {k: Variant("ay", v) for k, v in self.advert.manufacturer_data.items()}

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> DBusDict:
        return {k: Variant("ay", v) for k, v in self.advert.service_data.items()}

    def update(self, advert: Advert) -> None:
        """A repeated advert: PropertiesChanged with what changed (RSSI always, as BlueZ does
        for every report when DuplicateData is on)."""
        old, self.advert = self.advert, advert
        changed: dict[str, Any] = {"RSSI": advert.rssi}
        if advert.manufacturer_data != old.manufacturer_data:
            changed["ManufacturerData"] = self.ManufacturerData
        if advert.service_data != old.service_data:
            changed["ServiceData"] = self.ServiceData
        if advert.service_uuids != old.service_uuids:
            changed["UUIDs"] = list(advert.service_uuids)
        if advert.tx_power != old.tx_power:
            changed["TxPower"] = advert.tx_power
        self.emit_properties_changed(changed)


class FakeBluez:
    """Owns `org.bluez` on the bus at `address` and plays adverts into it.

    `advertise()` only reaches clients while the adapter is powered and discovering, as with a
    real radio; it returns whether the advert was "on air".
    """

    def __init__(
        self, address: str, adapter: str = "hci0", adapter_address: str = "00:1A:7D:DA:71:13"
    ) -> None:
        self.address = address
        self.adapter_path = f"/org/bluez/{adapter}"
        self.adapter = FakeAdapter(self, adapter_address)
        self.devices: dict[str, FakeDevice] = {}
        self.adapter_present = True
        self._bus: MessageBus | None = None

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    async def start(self) -> None:
        """Connect, export the adapter and own `org.bluez` (clients must wait for the name)."""
        async with asyncio.timeout(10.0):
            bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        self._bus = bus
        # Devices do not survive a bluetoothd restart; the adapter state does.
        self.devices.clear()
        self.adapter.discovering = False
        if self.adapter_present:
            bus.export(self.adapter_path, self.adapter)
        reply = await bus.request_name(BLUEZ_SERVICE)
        if reply is not RequestNameReply.PRIMARY_OWNER:
            raise RuntimeError(f"could not own {BLUEZ_SERVICE}: {reply}")
        log.debug("bluez.started", bus=self.address)

    async def stop(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        bus.disconnect()

    async def restart(self) -> None:
        """Reconnect (after the bus came back)."""
        await self.stop()
        await self.start()

    # -- adverts -------------------------------------------------------------------------------

    @property
    def on_air(self) -> bool:
        return (
            self.connected
            and self.adapter_present
            and self.adapter.powered
            and self.adapter.discovering
        )

    def advertise(self, advert: Advert) -> bool:
        if not self.on_air:
            return False
        assert self._bus is not None
        path = device_path(self.adapter_path, advert.address)
        device = self.devices.get(path)
        if device is None:
            device = self.devices[path] = FakeDevice(self.adapter_path, advert)
            self._bus.export(path, device)
        else:
            device.update(advert)
        return True

    def remove_device(self, address: str) -> None:
        self.remove_device_path(device_path(self.adapter_path, address))

    def remove_device_path(self, path: str) -> None:
        if self.devices.pop(path, None) is not None and self._bus is not None:
            self._bus.unexport(path)

    # -- adapter faults ------------------------------------------------------------------------

    def power(self, on: bool, *, blocked: bool | None = None) -> None:
        """Power the adapter on or off; `blocked=True` makes it refuse power-on (rfkill)."""
        if blocked is not None:
            self.adapter.blocked = blocked
        self.adapter.set_powered(on)

    def fail_start_discovery(self, *errors: str) -> None:
        """The next StartDiscovery calls fail with these D-Bus error names, in order."""
        self.adapter.start_errors.extend(errors)

    def remove_adapter(self) -> None:
        """The USB dongle is unplugged: the adapter and its devices vanish."""
        if not self.adapter_present:
            return
        for path in list(self.devices):
            self.remove_device_path(path)
        self.adapter_present = False
        self.adapter.discovering = False
        if self._bus is not None:
            self._bus.unexport(self.adapter_path)

    def add_adapter(self) -> None:
        if self.adapter_present:
            return
        self.adapter_present = True
        self.adapter.discovering = False
        if self._bus is not None:
            self._bus.export(self.adapter_path, self.adapter)

    async def __aenter__(self) -> "FakeBluez":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
