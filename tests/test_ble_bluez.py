"""BLE source against a real dbus-daemon, the fake BlueZ and unmodified bleak."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import structlog

from agent.core.clock import SystemClock
from agent.core.types import ALERT, TELEMETRY, Reading
from branchsim.bluez import (
    BTHomeSensor,
    FakeBluez,
    IBeaconTag,
    PhoneCrowd,
    PrivateSystemBus,
    RuuviTag,
)
from drivers.base import SourceContext
from drivers.ble import BleConfig, BleSource, build_sources
from tests.support.sinks import CollectingSink

BINDKEY = "231d39c1d7cc1ab1aee224cd096db932"
THERMO = "A4:C1:38:00:00:01"
VAULT = "54:48:E6:8F:80:A5"
RUUVI = "C8:25:2D:8E:9C:01"
TAG = "DC:0D:30:00:00:07"

FAST = {
    "watchdog_s": 0.5,
    "start_timeout_s": 2.0,
    "lost_after_failures": 2,
    "reset_after_failures": 0,
    "backoff_base_s": 0.05,
    "backoff_cap_s": 0.2,
}


def config(**overrides: object) -> BleConfig:
    sensors = [
        {"name": "server_room", "address": THERMO, "decoder": "bthome"},
        {"name": "vault_door", "address": VAULT, "decoder": "bthome", "bindkey": BINDKEY},
        {"name": "cassette_1", "address": RUUVI, "decoder": "ruuvi"},
    ]
    return BleConfig.model_validate({"sensors": sensors, **FAST, **overrides})


class World:
    """The simulated branch: bus, BlueZ and advertisers paced like radios (every 20 ms)."""

    def __init__(self, bus: PrivateSystemBus, bluez: FakeBluez) -> None:
        self.bus = bus
        self.bluez = bluez
        self.thermo = BTHomeSensor(THERMO, temperature=21.5, humidity=45.25, battery=87)
        self.vault = BTHomeSensor(
            VAULT, door=True, motion=False, battery=15, bindkey=bytes.fromhex(BINDKEY)
        )
        self.ruuvi = RuuviTag(
            RUUVI,
            temperature=4.5,
            humidity=60.5,
            pressure_pa=100400,
            acceleration_mg=(0, 0, 1000),
            battery_mv=2950,
        )
        self.tag = IBeaconTag(TAG)
        self.advertisers: list[BTHomeSensor | RuuviTag | IBeaconTag] = [
            self.thermo,
            self.vault,
            self.ruuvi,
        ]
        self.silenced: set[str] = set()

    async def radio(self) -> None:
        while True:
            for adv in self.advertisers:
                if adv.address not in self.silenced:
                    self.bluez.advertise(adv.next())
            await asyncio.sleep(0.02)  # the advertising interval of the simulated sensors


@pytest.fixture
async def world(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    bus = PrivateSystemBus(tmp_path_factory.mktemp("dbus"))
    await bus.start()
    bluez = FakeBluez(bus.address)
    radio: asyncio.Task[None] | None = None
    try:
        await bluez.start()
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        w = World(bus, bluez)
        radio = asyncio.create_task(w.radio())
        yield w
    finally:
        if radio is not None:
            radio.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await radio
        await bluez.stop()
        await bus.close()


@contextlib.asynccontextmanager
async def running(source: BleSource, sink: CollectingSink) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run(sink))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def ble_source(cfg: BleConfig) -> BleSource:
    (source,) = build_sources(cfg, SourceContext(clock=SystemClock()))
    assert isinstance(source, BleSource)
    return source


def has(source: str, type_: str, after: int = 0) -> Callable[[list[Reading]], bool]:
    return lambda rs: any(r.source == source and r.type == type_ for r in rs[after:])


def latest(sink: CollectingSink, source: str, type_: str) -> Reading:
    return [r for r in sink.readings if r.source == source and r.type == type_][-1]


async def test_bthome_and_ruuvi_decoded_with_values_and_units(world: World) -> None:
    """BTHome (plain and encrypted) and RuuviTag adverts become readings with our types/units."""
    sink = CollectingSink()
    source = ble_source(config())
    async with running(source, sink):
        await sink.wait_for(
            lambda rs: all(
                has(s, t)(rs)
                for s, t in [
                    ("ble.server_room", "humidity"),
                    ("ble.vault_door", "door"),
                    ("ble.cassette_1", "movement"),
                ]
            )
        )
        assert source.health.state == "online"
    got = {(r.source, r.type): (r.value, r.unit) for r in sink.readings}
    assert got[("ble.server_room", "temperature")] == (21.5, "Cel")
    assert got[("ble.server_room", "humidity")] == (45.25, "%RH")
    assert got[("ble.server_room", "battery")] == (87.0, "%")
    assert got[("ble.vault_door", "door")] == ("open", None)
    assert got[("ble.vault_door", "motion")] == (False, None)
    assert got[("ble.cassette_1", "temperature")] == (4.5, "Cel")
    assert got[("ble.cassette_1", "humidity")] == (60.5, "%RH")
    assert got[("ble.cassette_1", "pressure")] == (100400.0, "Pa")
    assert got[("ble.cassette_1", "acceleration")] == (9.81, "m/s2")
    assert got[("ble.cassette_1", "battery_voltage")] == (2.95, "V")
    assert all(r.priority == TELEMETRY for r in sink.readings if r.type != "battery.low")


async def test_low_battery_alerts_once(world: World) -> None:
    """A battery under the sensor's threshold raises one battery.low ALERT, not one per advert."""
    sink = CollectingSink()
    async with running(ble_source(config()), sink):
        await sink.wait_for(lambda rs: len([r for r in rs if r.source == "ble.vault_door"]) > 20)
    alerts = [r for r in sink.readings if r.type == "battery.low"]
    assert [(r.source, r.value, r.priority) for r in alerts] == [("ble.vault_door", 15.0, ALERT)]


async def test_ruuvi_movement_of_tagged_asset(world: World) -> None:
    """Moving a Ruuvi-tagged cassette shows as a new movement count and acceleration vector."""
    sink = CollectingSink()
    async with running(ble_source(config()), sink):
        await sink.wait_for(has("ble.cassette_1", "movement"))
        world.ruuvi.move((3000, 0, 0))
        await sink.wait_for(
            lambda rs: any(
                r.source == "ble.cassette_1" and r.type == "movement" and r.value == 1 for r in rs
            )
        )
    assert latest(sink, "ble.cassette_1", "acceleration").value == pytest.approx(29.42, abs=0.01)


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, object]]]:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="drivers")
    caplog.set_level(logging.DEBUG, logger="bthome_ble")
    caplog.set_level(logging.DEBUG, logger="ruuvitag_ble")
    with structlog.testing.capture_logs() as logs:
        yield logs


def leaks(haystack: str, crowd: PhoneCrowd) -> list[str]:
    needles = {a.upper() for a in crowd.addresses} | {a.lower() for a in crowd.addresses}
    needles |= {a.replace(":", "").lower() for a in crowd.addresses}
    needles |= {p.hex() for p in crowd.payloads}
    return sorted(n for n in needles if n in haystack)


async def test_phone_adverts_leave_no_trace(
    world: World,
    captured_logs: list[dict[str, object]],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """200 random phone adverts leave no address or payload in readings, logs or output."""
    crowd = PhoneCrowd(rng=random.Random(5), size=40)
    sink = CollectingSink()
    source = ble_source(config())
    async with running(source, sink):
        await sink.wait_for(has("ble.server_room", "temperature"))
        on_air = 0
        for _ in range(200):
            on_air += world.bluez.advertise(crowd.next())
            await asyncio.sleep(0)  # let the bus carry each advert, as a radio paces them
        assert on_air == 200
        await sink.wait_for(lambda rs: source.stats["dropped_unknown"] >= 200, timeout=10)
    out, err = capfd.readouterr()
    artefacts = "\n".join([repr(sink.readings), repr(captured_logs), caplog.text, out, err])
    assert leaks(artefacts, crowd) == []
    assert {r.source for r in sink.readings} <= {
        "ble.server_room",
        "ble.vault_door",
        "ble.cassette_1",
    }


async def test_presence_mode_emits_counts_only(
    world: World,
    captured_logs: list[dict[str, object]],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Presence mode reports distinct non-allowlisted devices per window as a bare count."""
    crowd = PhoneCrowd(rng=random.Random(7), size=30)
    sink = CollectingSink()
    cfg = config(presence={"enabled": True, "window_s": 1.0}, sensors=[])
    async with running(ble_source(cfg), sink):
        for _ in range(200):
            world.bluez.advertise(crowd.next())
            await asyncio.sleep(0)
        await sink.wait_for(lambda rs: any(r.type == "ble.presence" and r.value for r in rs))
    counts = [r for r in sink.readings if r.type == "ble.presence"]
    assert all(r.source == "ble" and r.unit == "count" and isinstance(r.value, int) for r in counts)
    assert 1 <= max(int(r.value) for r in counts) <= len(set(crowd.addresses)) + 40  # type: ignore[call-overload]  # Value is a union; checked int above
    assert {r.type for r in sink.readings} == {"ble.presence"}
    out, err = capfd.readouterr()
    assert (
        leaks("\n".join([repr(sink.readings), repr(captured_logs), caplog.text, out, err]), crowd)
        == []
    )


async def test_start_discovery_errors_are_retried_without_alert(world: World) -> None:
    """InProgress / NotReady from StartDiscovery are retried; scanning starts, no adapter alert."""
    world.bluez.fail_start_discovery("org.bluez.Error.InProgress")
    sink = CollectingSink()
    source = ble_source(config(lost_after_failures=3))
    async with running(source, sink):
        await sink.wait_for(has("ble.server_room", "temperature"))
    assert source.health.errors.get("busy") == 1
    assert not sink.of_type("ble.adapter_lost")


async def test_persistent_start_errors_raise_adapter_lost_then_back(world: World) -> None:
    """Repeated StartDiscovery failures raise ble.adapter_lost once, recovery ble.adapter_back."""
    world.bluez.fail_start_discovery(*["org.bluez.Error.NotReady"] * 3)
    sink = CollectingSink()
    async with running(ble_source(config()), sink):
        await sink.wait_for(has("ble", "ble.adapter_back"))
        await sink.wait_for(has("ble.server_room", "temperature"))
    assert [r.type for r in sink.readings if r.source == "ble"] == [
        "ble.adapter_lost",
        "ble.adapter_back",
    ]
    assert sink.of_type("ble.adapter_lost")[0].priority == ALERT


async def test_adapter_powered_off_and_back(world: World) -> None:
    """Adapter powered off mid-scan: adapter_lost within bounded time; powered on: back and data."""
    sink = CollectingSink()
    async with running(ble_source(config()), sink):
        await sink.wait_for(has("ble.server_room", "temperature"))
        world.bluez.power(False)
        await sink.wait_for(has("ble", "ble.adapter_lost"), timeout=5)
        mark = len(sink.readings)
        world.bluez.power(True)
        await sink.wait_for(has("ble", "ble.adapter_back", mark), timeout=5)
        await sink.wait_for(has("ble.server_room", "temperature", mark), timeout=5)
    assert sink.of_type("ble.adapter_lost")[0].value == "adapter_off"


async def test_adapter_removed_and_back(world: World) -> None:
    """The dongle unplugged and replugged: adapter_lost, then adapter_back and readings again."""
    sink = CollectingSink()
    async with running(ble_source(config()), sink):
        await sink.wait_for(has("ble.server_room", "temperature"))
        world.bluez.remove_adapter()
        await sink.wait_for(has("ble", "ble.adapter_lost"), timeout=5)
        mark = len(sink.readings)
        world.bluez.add_adapter()
        await sink.wait_for(has("ble.server_room", "temperature", mark), timeout=5)
    assert sink.of_type("ble.adapter_lost")[0].value == "adapter_missing"
    assert len(sink.of_type("ble.adapter_back")) == 1


async def test_bus_going_away_and_back(world: World) -> None:
    """dbus-daemon killed and restarted (with BlueZ): the scanner reconnects and reads again."""
    sink = CollectingSink()
    async with running(ble_source(config()), sink):
        await sink.wait_for(has("ble.server_room", "temperature"))
        await world.bluez.stop()
        await world.bus.stop()
        await sink.wait_for(has("ble", "ble.adapter_lost"), timeout=5)
        mark = len(sink.readings)
        await world.bus.start()
        await world.bluez.start()
        await sink.wait_for(has("ble.server_room", "temperature", mark), timeout=10)
    assert sink.of_type("ble.adapter_lost")[0].value == "bus_down"
    assert len(sink.of_type("ble.adapter_back")) == 1


async def test_adapter_reset_escalation_powers_adapter_back(world: World) -> None:
    """After repeated failures the source power-cycles the adapter itself and scanning resumes."""
    sink = CollectingSink()
    source = ble_source(config(reset_after_failures=2, lost_after_failures=1))
    async with running(source, sink):
        await sink.wait_for(has("ble.server_room", "temperature"))
        world.bluez.power(False)
        await sink.wait_for(has("ble", "ble.adapter_back"), timeout=5)
    assert source.health.errors["adapter_reset"] >= 1
    assert world.bluez.adapter.powered


async def test_silent_sensor_missing_once_then_back(world: World) -> None:
    """A silent allowlisted sensor raises sensor.missing once, and sensor.back when heard again."""
    world.advertisers.append(world.tag)
    cfg = config(
        sensors=[
            {"name": "cassette_tag", "address": TAG, "decoder": "ibeacon", "missing_after_s": 0.3},
            {"name": "server_room", "address": THERMO, "decoder": "bthome"},
        ]
    )
    sink = CollectingSink()
    async with running(ble_source(cfg), sink):
        await sink.wait_for(has("ble.server_room", "temperature"))
        world.silenced.add(TAG)
        await sink.wait_for(has("ble.cassette_tag", "sensor.missing"), timeout=5)
        # keep it silent for several more missing periods: still one alert
        mark = len(sink.readings)
        await sink.wait_for(lambda rs: len(rs) > mark + 60, timeout=5)
        world.silenced.discard(TAG)
        await sink.wait_for(has("ble.cassette_tag", "sensor.back"), timeout=5)
    tag = [(r.type, r.priority) for r in sink.readings if r.source == "ble.cassette_tag"]
    assert tag == [("sensor.missing", ALERT), ("sensor.back", ALERT)]
