"""The BLE source: one bleak scanner, an allowlist, decoders, and a supervisor that keeps the
scan alive (restart on errors and on silence, back off, power-cycle the adapter, alert).

Field evidence behind the shape (ThingsBoard gateway #639, #688): a BLE gateway that does not
restart its scanner after an error, or gives up when the adapter is absent at start, goes
silent for good. Here every failure is classified, counted, logged with advice, and retried.

Floods: anyone nearby can send adverts with an allowlisted sensor's address. The scanner
callback therefore checks a token bucket per sensor, then one for all sensors together, before
an advert is copied, queued or decoded; refusals are counted (``rate_limited``, ``flooded``,
``queue_full``) and logged at most once per `REJECT_LOG_INTERVAL` per kind and sensor.
Adverts of devices that are not allowlisted are not rate limited: dropping them already costs
no more than refusing them would, and letting them use up a shared budget would let a crowd of
phones (or random addresses) crowd out the sensors.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog
from bleak import BleakScanner
from bleak.args.bluez import BlueZScannerArgs
from bleak.backends.bluezdbus.manager import get_global_bluez_manager
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakBluetoothNotAvailableReason,
    BleakDBusError,
    BleakError,
)
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from agent.core.backoff import Backoff
from agent.core.clock import Clock
from agent.core.errors import RefusedError
from agent.core.types import ALERT, TELEMETRY, Reading
from drivers.base import Sink, SourceContext, SourceHealth, SourceState
from drivers.ble.config import BleConfig, BleSensorConfig
from drivers.ble.decoders import Advert, Decoder, make_decoder
from drivers.ble.privacy import PresenceCounter
from drivers.ratelimit import LogGates, TokenBucket

__all__ = ["BleSource", "classify_error"]

log = structlog.get_logger(__name__)

# error class -> advice for the operator (shown in the log and the status detail)
_ADVICE: dict[str, str] = {
    "adapter_missing": "no Bluetooth adapter: check the dongle and `bluetoothctl list`",
    "adapter_off": "adapter powered off: `bluetoothctl power on`, check `rfkill list`",
    "no_central": "adapter has no BLE central role: use a BLE-capable adapter",
    "bus_down": "cannot reach BlueZ on D-Bus: `systemctl status bluetooth dbus`",
    "denied": "D-Bus denied access to BlueZ: add the service user to the bluetooth group",
    "busy": "BlueZ reports discovery in progress or not ready; retrying",
    "timeout": "BlueZ did not answer in time; retrying",
    "scan_error": "unexpected scanner error; retrying",
}

_REASONS: dict[BleakBluetoothNotAvailableReason, str] = {
    BleakBluetoothNotAvailableReason.NO_BLUETOOTH: "adapter_missing",
    BleakBluetoothNotAvailableReason.POWERED_OFF: "adapter_off",
    BleakBluetoothNotAvailableReason.NO_BLE_CENTRAL_ROLE: "no_central",
    BleakBluetoothNotAvailableReason.DENIED_BY_SYSTEM: "denied",
}

_DBUS_ERRORS: dict[str, str] = {
    "org.bluez.Error.InProgress": "busy",
    "org.bluez.Error.NotReady": "adapter_off",
    "org.bluez.Error.Failed": "busy",
    "org.freedesktop.DBus.Error.ServiceUnknown": "bus_down",
    "org.freedesktop.DBus.Error.NameHasNoOwner": "bus_down",
    "org.freedesktop.DBus.Error.UnknownObject": "adapter_missing",
    "org.freedesktop.DBus.Error.UnknownMethod": "adapter_missing",
}


def classify_error(exc: BaseException) -> str:
    """Map a scanner start failure to an error class (a key of the advice table)."""
    if isinstance(exc, BleakBluetoothNotAvailableError):
        return _REASONS.get(exc.reason, "adapter_missing")
    if isinstance(exc, BleakDBusError):
        return _DBUS_ERRORS.get(exc.dbus_error, "scan_error")
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError | EOFError):
        return "bus_down"
    if isinstance(exc, BleakError) and "not found" in str(exc):
        return "adapter_missing"
    return "scan_error"


@dataclass(slots=True)
class _Sensor:
    cfg: BleSensorConfig
    source: str
    decoder: Decoder
    bucket: TokenBucket
    last_seen: float
    missing: bool = False
    battery_low: bool = False
    last_payload: bytes | None = None


class BleSource:
    """The `ble` source. Sensor readings carry source `ble.<name>`; the scanner's own alerts
    (`ble.adapter_lost`, `ble.adapter_back`, `ble.presence`) carry source `ble`."""

    def __init__(self, cfg: BleConfig, ctx: SourceContext) -> None:
        self.cfg = cfg
        self.name = "ble"
        self.health = SourceHealth(name="ble", kind="ble")
        # Not errors: how many adverts were dropped by the privacy filter, decoded, duplicates
        # (shown in status.json with the source's health).
        self.stats: dict[str, int] = {"dropped_unknown": 0, "adverts": 0, "duplicates": 0}
        self.health.stats = self.stats
        self._clock: Clock = ctx.clock
        mono = self._clock.monotonic
        now = mono()
        self._sensors: dict[str, _Sensor] = {
            s.address: _Sensor(
                s,
                f"ble.{s.name}",
                make_decoder(s.decoder, s.bindkey_bytes()),
                TokenBucket(
                    s.rate_limit_hz or cfg.rate_limit_hz, s.rate_burst or cfg.rate_burst, mono
                ),
                now,
            )
            for s in cfg.sensors
        }
        self._global_bucket = TokenBucket(cfg.global_rate_hz, cfg.global_burst, mono)
        self._gates = LogGates(mono)
        self._presence = PresenceCounter(self._clock.time) if cfg.presence.enabled else None
        self._queue: asyncio.Queue[Advert] = asyncio.Queue(cfg.queue_size)
        self._last_advert = now
        self._adapter_lost = False
        self._log = log.bind(source="ble")

    # -- the bleak callback: the privacy boundary ------------------------------------------------

    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """Runs in the event loop for every advert heard. Nothing of a non-allowlisted device
        goes past this function: not into the queue, not into a log line."""
        self._last_advert = self._clock.monotonic()  # any advert shows the scan is alive
        address = device.address.upper()
        sensor = self._sensors.get(address)
        if sensor is None:
            if self._presence is not None:
                self._presence.observe(address)
            else:
                self.stats["dropped_unknown"] += 1
            return
        # Sensor first: a flood with one sensor's address must not use up the shared budget.
        if not sensor.bucket.take():
            self._refused("rate_limited", sensor, sensor.bucket.rate)
            return
        if not self._global_bucket.take():
            self._refused("flooded", None, self._global_bucket.rate)
            return
        advert = Advert(
            address=address,
            rssi=adv.rssi,
            manufacturer_data=dict(adv.manufacturer_data),
            service_data=dict(adv.service_data),
            service_uuids=tuple(adv.service_uuids),
            tx_power=adv.tx_power,
            name=adv.local_name,
            time=self._last_advert,
        )
        try:
            self._queue.put_nowait(advert)
        except asyncio.QueueFull:
            self._refused("queue_full", sensor, None)

    def _refused(self, what: str, sensor: _Sensor | None, rate_hz: float | None) -> None:
        """Count an allowlisted sensor's advert that was not queued; log it unless one of its
        kind (and sensor) was logged lately. Only configured names reach the log."""
        self.health.count(what)
        name = sensor.cfg.name if sensor is not None else None
        held = self._gates.open(what if name is None else f"{what}:{name}")
        if held is not None:
            self._log.warning(
                "ble.advert_refused",
                what=what,
                sensor=name,
                rate_hz=rate_hz,
                not_logged_since_last=held,
                total=self.health.errors[what],
            )

    # -- run ------------------------------------------------------------------------------------

    async def run(self, sink: Sink) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._supervise(sink), name="ble.supervise")
                tg.create_task(self._consume(sink), name="ble.consume")
                tg.create_task(self._housekeeping(sink), name="ble.housekeeping")
        finally:
            self.health.state = SourceState.STOPPED

    async def _submit(self, sink: Sink, reading: Reading) -> None:
        try:
            await sink.submit(reading)
        except RefusedError:
            self.health.count("refused")

    def _reading(
        self,
        source: str,
        type_: str,
        value: Any,
        unit: str | None = None,
        priority: int = TELEMETRY,
        attrs: dict[str, Any] | None = None,
    ) -> Reading:
        return Reading(
            source=source,
            type=type_,
            value=value,
            unit=unit,
            ts=self._clock.time(),
            priority=priority,
            attrs=attrs,
        )

    async def _supervise(self, sink: Sink) -> None:
        backoff = Backoff(self.cfg.backoff_base_s, self.cfg.backoff_cap_s)
        failures = 0
        bluez: BlueZScannerArgs = {"adapter": self.cfg.adapter} if self.cfg.adapter else {}
        while True:
            scanner = BleakScanner(
                detection_callback=self._on_advert, scanning_mode="active", bluez=bluez
            )
            try:
                await asyncio.wait_for(scanner.start(), self.cfg.start_timeout_s)
            except Exception as exc:  # every start failure is classified, counted and retried
                failures += 1
                kind = classify_error(exc)
                self.health.count(kind)
                self.health.detail = _ADVICE[kind]
                self._log.warning(
                    "ble.scan_start_failed",
                    error=kind,
                    failures=failures,
                    advice=_ADVICE[kind],
                    exc_type=type(exc).__name__,
                )
                await self._stop(scanner)
                if failures >= self.cfg.lost_after_failures:
                    await self._set_lost(sink, kind)
                if self.cfg.reset_after_failures and failures % self.cfg.reset_after_failures == 0:
                    await self._reset_adapter()
                await backoff.wait()
                continue
            failures = 0
            backoff.reset()
            await self._set_back(sink)
            try:
                await self._until_silent()
                self.health.count("watchdog_restart")
                self._log.info("ble.watchdog_restart", silent_s=self.cfg.watchdog_s)
            finally:
                await self._stop(scanner)

    async def _stop(self, scanner: BleakScanner) -> None:
        # bleak's stop() on a dead bus makes dbus-fast write to a closed socket and leave a
        # Future with an unretrieved OSError behind. Getting the manager first reconnects a dead
        # bus (or raises while it is down, and then there is no scan left to stop).
        try:
            await asyncio.wait_for(get_global_bluez_manager(), self.cfg.start_timeout_s)
        except Exception:  # bus down: nothing to stop
            return
        # Stopping a scan on a vanished adapter or a fresh bus fails in many ways; none matter.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(scanner.stop(), self.cfg.start_timeout_s)

    async def _until_silent(self) -> None:
        """Returns once no advert at all has been heard for `watchdog_s`."""
        while True:
            silent = self._clock.monotonic() - self._last_advert
            if silent >= self.cfg.watchdog_s:
                return
            await asyncio.sleep(self.cfg.watchdog_s - silent)

    async def _set_lost(self, sink: Sink, kind: str) -> None:
        if self._adapter_lost:
            return
        self._adapter_lost = True
        self.health.state = SourceState.OFFLINE
        self._log.error("ble.adapter_lost", error=kind, advice=_ADVICE[kind])
        await self._submit(
            sink,
            self._reading(
                "ble", "ble.adapter_lost", kind, priority=ALERT, attrs={"advice": _ADVICE[kind]}
            ),
        )

    async def _set_back(self, sink: Sink) -> None:
        self._last_advert = self._clock.monotonic()
        self.health.state = SourceState.ONLINE
        self.health.detail = ""
        if not self._adapter_lost:
            return
        self._adapter_lost = False
        self._log.info("ble.adapter_back")
        await self._submit(sink, self._reading("ble", "ble.adapter_back", True, priority=ALERT))

    async def _reset_adapter(self) -> None:
        """Escalation: power-cycle the adapter through BlueZ (what `bluetoothctl power off/on`
        does). Needs the right to set Adapter1.Powered; failure is counted, not fatal."""
        path = f"/org/bluez/{self.cfg.adapter or 'hci0'}"
        self.health.count("adapter_reset")
        self._log.warning("ble.adapter_reset", adapter=path)
        bus: MessageBus | None = None
        try:
            bus = await asyncio.wait_for(
                MessageBus(bus_type=BusType.SYSTEM).connect(), self.cfg.start_timeout_s
            )
            for powered in (False, True):
                reply = await asyncio.wait_for(
                    bus.call(
                        Message(
                            destination="org.bluez",
                            path=path,
                            interface="org.freedesktop.DBus.Properties",
                            member="Set",
                            signature="ssv",
                            body=["org.bluez.Adapter1", "Powered", Variant("b", powered)],
                        )
                    ),
                    self.cfg.start_timeout_s,
                )
                if reply is None or reply.message_type is MessageType.ERROR:
                    self.health.count("adapter_reset_failed")
                    self._log.warning(
                        "ble.adapter_reset_failed", error=getattr(reply, "error_name", None)
                    )
                    return
        except Exception as exc:  # the bus may be down too; the next start attempt reports it
            self.health.count("adapter_reset_failed")
            self._log.warning("ble.adapter_reset_failed", exc_type=type(exc).__name__)
        finally:
            if bus is not None:
                bus.disconnect()

    # -- decoding -------------------------------------------------------------------------------

    async def _consume(self, sink: Sink) -> None:
        while True:
            advert = await self._queue.get()
            sensor = self._sensors[advert.address]
            sensor.last_seen = advert.time
            self.stats["adverts"] += 1
            if sensor.missing:
                sensor.missing = False
                self._log.info("ble.sensor_back", sensor=sensor.cfg.name)
                await self._submit(
                    sink, self._reading(sensor.source, "sensor.back", True, priority=ALERT)
                )
            payload = advert.payload()
            if payload == sensor.last_payload:
                self.stats["duplicates"] += 1  # BlueZ re-reports on every RSSI change
                continue
            sensor.last_payload = payload
            decoded = sensor.decoder.decode(advert)
            if decoded.error is not None:
                self.health.count(decoded.error)
                self._log.debug(
                    "ble.undecodable",
                    sensor=sensor.cfg.name,
                    error=decoded.error,
                    payload=payload.hex(),
                )
                continue
            if not decoded.measurements:
                self.stats["duplicates"] += 1
                continue
            readings = [
                self._reading(sensor.source, m.type, m.value, m.unit) for m in decoded.measurements
            ]
            readings += self._battery_alerts(sensor, readings)
            self.health.readings += len(readings)
            self.health.last_reading = self._clock.time()
            try:
                await sink.submit_many(readings)
            except RefusedError:
                self.health.count("refused")

    def _battery_alerts(self, sensor: _Sensor, readings: list[Reading]) -> list[Reading]:
        for r in readings:
            if r.type == "battery" and isinstance(r.value, int | float):
                threshold, hysteresis = sensor.cfg.battery_low_pct, 5.0
            elif r.type == "battery_voltage" and isinstance(r.value, int | float):
                threshold, hysteresis = sensor.cfg.battery_low_v, 0.1
            else:
                continue
            if not sensor.battery_low and r.value < threshold:
                sensor.battery_low = True
                return [
                    self._reading(sensor.source, "battery.low", r.value, r.unit, priority=ALERT)
                ]
            if sensor.battery_low and r.value >= threshold + hysteresis:
                sensor.battery_low = False
        return []

    # -- missing sensors and presence counts ----------------------------------------------------

    async def _housekeeping(self, sink: Sink) -> None:
        tick = min([1.0, *(s.cfg.missing_after_s / 4 for s in self._sensors.values())])
        window_end = self._clock.monotonic() + self.cfg.presence.window_s
        while True:
            await asyncio.sleep(tick)
            now = self._clock.monotonic()
            for sensor in self._sensors.values():
                silent = now - sensor.last_seen
                if not sensor.missing and silent >= sensor.cfg.missing_after_s:
                    sensor.missing = True
                    self._log.warning(
                        "ble.sensor_missing", sensor=sensor.cfg.name, silent_s=round(silent, 1)
                    )
                    await self._submit(
                        sink,
                        self._reading(
                            sensor.source, "sensor.missing", round(silent, 1), "s", priority=ALERT
                        ),
                    )
            if self._presence is not None and now >= window_end:
                window_end = now + self.cfg.presence.window_s
                count = self._presence.take()
                await self._submit(
                    sink,
                    self._reading(
                        "ble",
                        "ble.presence",
                        count,
                        "count",
                        attrs={"window_s": self.cfg.presence.window_s},
                    ),
                )
