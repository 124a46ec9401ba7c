"""Per-source flood limits of BLE and serial line devices (issue 10): a flood is refused before
decoding, counted and logged once per interval; a sensor at its normal rate loses nothing.

Real parts: BLE adverts go through the fake BlueZ on a private dbus-daemon into unmodified
bleak and `BleSource`; serial lines through a real pty into `LineSource`. The token buckets
read a monotonic clock that the test moves by hand, so every count below is exact.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from agent.core.types import Reading
from branchsim.bluez import BTHomeSensor, PhoneCrowd
from branchsim.serialdev import SimSerialDevice
from drivers.base import SourceContext, SourceState
from drivers.ble import BleConfig, BleSource
from drivers.ble import build_sources as build_ble
from drivers.ble.privacy import PresenceCounter
from drivers.ratelimit import REJECT_LOG_INTERVAL
from drivers.serial import LineConfig, LineSource, SerialConfig
from drivers.serial import build_sources as build_serial
from drivers.serial.line import LineSplitter
from tests import test_ble_bluez as _bluez
from tests import test_serial_drivers as _serial
from tests.support.agentproc import until
from tests.support.sinks import CollectingSink, running
from tests.test_ble_bluez import RUUVI, THERMO, VAULT, World, leaks

world = _bluez.world  # private dbus-daemon + fake BlueZ (its paced radio is silenced below)
captured_logs = _bluez.captured_logs  # structlog events, with the drivers' loggers at DEBUG
devices = _serial.devices  # simulated serial devices on real ptys


class HandClock:
    """The drivers' `Clock`; monotonic time moves only when the test says so."""

    def __init__(self) -> None:
        self.mono = 1000.0

    def time(self) -> float:
        return 1_700_000_000.0 + self.mono

    def monotonic(self) -> float:
        return self.mono

    def synchronized(self) -> bool:
        return True

    def advance(self, seconds: float) -> None:
        self.mono += seconds



def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- BLE -------------------------------------------------------------------------------------


def ble_source(
    clock: HandClock, vault_door: dict[str, object] | None = None, **overrides: object
) -> BleSource:
    sensors = [
        {"name": "vault_door", "address": VAULT, "decoder": "bthome", **(vault_door or {})},
        {"name": "server_room", "address": THERMO, "decoder": "bthome"},
        {"name": "cassette_1", "address": RUUVI, "decoder": "bthome"},
    ]
    cfg = BleConfig.model_validate({"sensors": sensors, **overrides})
    (source,) = build_ble(cfg, SourceContext(clock=clock))
    assert isinstance(source, BleSource)
    return source


async def scanning(world: World, source: BleSource, sink: CollectingSink) -> asyncio.Task[None]:
    """Start the source and return once BlueZ discovers for it (adverts are then on air)."""
    # the world's paced radio falls silent before the scan starts (nothing is on air until then)
    world.silenced |= {a.address for a in world.advertisers}
    task = asyncio.create_task(source.run(sink), name="ble-under-test")
    await until(lambda: world.bluez.on_air)
    return task


def handled(source: BleSource) -> int:
    """Adverts the scanner callback has dealt with: decoded, refused or dropped (phones)."""
    errors = source.health.errors
    return (
        source.stats["adverts"]
        + source.stats["dropped_unknown"]
        + sum(errors.get(k, 0) for k in ("rate_limited", "flooded", "queue_full"))
    )


async def until_handled(source: BleSource, sent: int) -> None:
    await until(lambda: handled(source) == sent)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_ble_spoofed_sensor_flood_is_refused_and_the_others_all_pass(
    world: World, captured_logs: list[dict[str, Any]], capfd: pytest.CaptureFixture[str]
) -> None:
    """A flood with one sensor's address gets its own bucket's worth through, counted and
    logged once per interval by sensor name; a 1 Hz sensor (default limits) loses nothing;
    phones stay unlogged."""
    clock = HandClock()
    sink = CollectingSink()
    source = ble_source(clock, vault_door={"rate_limit_hz": 2.0, "rate_burst": 5})
    spoof = BTHomeSensor(VAULT, door=True, battery=90)  # what a flooder sends, fresh each time
    honest = BTHomeSensor(THERMO, temperature=21.5, humidity=45.0, battery=80)
    crowd = PhoneCrowd(rng=random.Random(11), size=20)
    task = await scanning(world, source, sink)
    sent = 0
    rounds, flood = 5, 30
    for _ in range(rounds):  # one second of the hand clock per round
        for _ in range(flood):
            sent += world.bluez.advertise(spoof.next())
            sent += world.bluez.advertise(crowd.next())
            await asyncio.sleep(0)  # let the bus carry each advert, as a radio paces them
        sent += world.bluez.advertise(honest.next())
        await until_handled(source, sent)
        clock.advance(1.0)
    await sink.wait_for(lambda rs: len([r for r in rs if r.type == "temperature"]) == rounds)

    assert sent == rounds * (2 * flood + 1)
    # the flooded sensor: a full bucket of 5, then 2 tokens per second
    accepted = 5 + 2 * (rounds - 1)
    assert source.health.errors["rate_limited"] == rounds * flood - accepted
    assert len([r for r in sink.readings if r.source == "ble.vault_door" and r.type == "door"]) == (
        accepted
    )
    # the sensor at its normal rate: every advert decoded
    assert [r.value for r in sink.readings if r.type == "temperature"] == [21.5] * rounds
    # phones are neither rate limited nor logged, only dropped
    assert source.stats["dropped_unknown"] == rounds * flood
    assert "flooded" not in source.health.errors

    refused = events(captured_logs, "ble.advert_refused")
    assert [(e["what"], e["sensor"], e["not_logged_since_last"], e["total"]) for e in refused] == [
        ("rate_limited", "vault_door", 0, 1)
    ]
    # one interval later the next line says how many were held back
    clock.advance(REJECT_LOG_INTERVAL)
    for _ in range(flood):
        sent += world.bluez.advertise(spoof.next())
        await asyncio.sleep(0)
    await until_handled(source, sent)
    await stop(task)
    total = source.health.errors["rate_limited"]
    assert total == rounds * flood - accepted + flood - 5  # the bucket was full again
    refused = events(captured_logs, "ble.advert_refused")
    assert [(e["sensor"], e["not_logged_since_last"], e["total"]) for e in refused[1:]] == [
        ("vault_door", rounds * flood - accepted - 1, rounds * flood - accepted + 1)
    ]
    out, err = capfd.readouterr()
    assert leaks("\n".join([repr(sink.readings), repr(captured_logs), out, err]), crowd) == []


async def test_ble_all_sensors_together_are_held_to_the_global_bucket(
    world: World, captured_logs: list[dict[str, Any]]
) -> None:
    """Sensors each within their own limit but over the shared one: the excess is refused as
    `flooded`, counted, and logged once."""
    clock = HandClock()
    sink = CollectingSink()
    source = ble_source(clock, rate_burst=10, global_rate_hz=1.0, global_burst=12)
    senders = [BTHomeSensor(a, temperature=20.0) for a in (VAULT, THERMO, RUUVI)]
    task = await scanning(world, source, sink)
    sent = 0
    for _ in range(8):
        for sender in senders:
            sent += world.bluez.advertise(sender.next())
            await asyncio.sleep(0)
    await until_handled(source, sent)
    await sink.wait_for(lambda rs: len(rs) == 12)
    await stop(task)
    assert sent == 24
    assert source.health.errors == {"flooded": 12}
    assert [
        (e["what"], e["sensor"], e["rate_hz"], e["total"])
        for e in events(captured_logs, "ble.advert_refused")
    ] == [("flooded", None, 1.0, 1)]


def test_presence_count_saturates_instead_of_growing() -> None:
    """Presence mode keeps at most `max_distinct` pseudonyms per window, whatever is heard."""
    counter = PresenceCounter(lambda: 1_700_000_000.0, max_distinct=50)
    rng = random.Random(3)
    for _ in range(5000):
        counter.observe(":".join(f"{rng.randrange(256):02X}" for _ in range(6)))
    assert counter.take() == 50
    counter.observe("AA:BB:CC:DD:EE:FF")
    assert counter.take() == 1  # a new window starts empty


# -- serial line devices ---------------------------------------------------------------------


def line_source(device: SimSerialDevice, clock: HandClock, **overrides: object) -> LineSource:
    entry = {**device.agent_config(), **_serial.FAST, **overrides}
    cfg = SerialConfig.model_validate({"line": [entry]})
    (source,) = build_serial(cfg, SourceContext(clock=clock))
    assert isinstance(source, LineSource)
    return source


def temperatures(readings: list[Reading]) -> list[Any]:
    return [r.value for r in readings if r.type == "temperature"]


def last_temperature_is(value: float) -> Callable[[list[Reading]], bool]:
    return lambda rs: temperatures(rs)[-1:] == [value]


async def test_line_flood_is_refused_counted_and_logged_once_per_interval(
    devices: Callable[..., SimSerialDevice],
) -> None:
    """A device spewing 1000 lines at once gets its burst (default 100) through; the rest is
    dropped undecoded, counted, and logged once per interval with the number held back."""
    clock = HandClock()
    env = devices("line", "env", interval_s=0)
    sink = CollectingSink()
    with structlog.testing.capture_logs() as logs:
        source = line_source(env, clock)
        async with running(source, sink):
            await until(lambda: source.health.state is SourceState.ONLINE)
            env.apply({"emit": "reading", "count": 1000})
            await until(lambda: len(temperatures(sink.readings)) == 100)
            await until(lambda: source.health.errors.get("rate_limited") == 900)
            clock.advance(REJECT_LOG_INTERVAL)  # refills the bucket to its burst, too
            env.apply({"set": {"temp": 30.5}, "emit": "reading", "count": 1000})
            await until(lambda: source.health.errors.get("rate_limited") == 1800)
            await sink.wait_for(lambda rs: temperatures(rs).count(30.5) == 100)
    assert temperatures(sink.readings) == [21.5] * 100 + [30.5] * 100
    assert [
        (e["rate_hz"], e["not_logged_since_last"], e["total"])
        for e in events(logs, "serial.rate_limited")
    ] == [(20.0, 0, 1), (20.0, 899, 901)]


async def test_line_device_at_a_normal_rate_loses_nothing(
    devices: Callable[..., SimSerialDevice],
) -> None:
    """A chatty device (5 lines/s, longer than the burst lasts) passes the default limit whole."""
    clock = HandClock()
    env = devices("line", "env", interval_s=0)
    sink = CollectingSink()
    source = line_source(env, clock)
    async with running(source, sink):
        await until(lambda: source.health.state is SourceState.ONLINE)
        for i in range(250):
            env.apply({"set": {"temp": float(i)}, "emit": "reading"})
            await sink.wait_for(last_temperature_is(float(i)))
            clock.advance(0.2)
    assert temperatures(sink.readings) == [float(i) for i in range(250)]
    assert "rate_limited" not in source.health.errors


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_line_splitter_outcome_does_not_depend_on_read_boundaries(terminator: bytes) -> None:
    """Lines of exactly max_len (with a CR), over-long lines and a terminator split across
    reads give the same lines and counts however the stream is cut."""
    t = terminator
    stream = b"a=1" + t + b"b" * 16 + b"\r" + t + b"c" * 40 + t + b"d=4" + t + b"e" * 17 + t
    whole = LineSplitter(t, max_len=16)
    expected = whole.feed(stream)
    assert expected == [b"a=1", b"b" * 16, b"d=4"]
    assert whole.errors == {"overlong": 2}
    cuts = [[i] for i in range(1, len(stream))] + [list(range(1, len(stream)))]
    for points in cuts:
        splitter = LineSplitter(t, max_len=16)
        bounds = [0, *points, len(stream)]
        got = [ln for a, b in itertools.pairwise(bounds) for ln in splitter.feed(stream[a:b])]
        assert (got, splitter.errors) == (expected, whole.errors), points


def test_line_without_terminator_keeps_memory_bounded() -> None:
    """10 MB that never end a line cost no more memory than one line and one read; the next
    line after the terminator is read again, and the runaway line is counted once."""
    splitter = LineSplitter(b"\n", max_len=512)
    chunk = b"x" * 4096
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(2560):
            assert splitter.feed(chunk) == []
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024
    assert splitter.feed(b"\ntemp=1\n") == [b"temp=1"]
    assert splitter.errors == {"overlong": 1}


# -- configuration ---------------------------------------------------------------------------


def test_limit_defaults_and_validation() -> None:
    """The limits default generously and refuse zero or negative values."""
    ble = BleConfig()
    assert (ble.rate_limit_hz, ble.rate_burst, ble.global_rate_hz, ble.global_burst) == (
        20.0,
        100,
        200.0,
        500,
    )
    line = LineConfig(name="env", port="/dev/ttyAMA0")
    assert (line.rate_limit_hz, line.rate_burst) == (20.0, 100)
    for bad in (
        {"rate_limit_hz": 0},
        {"rate_burst": 0},
        {"global_rate_hz": -1},
        {"global_burst": 0},
        {"sensors": [{"name": "x", "address": VAULT, "decoder": "bthome", "rate_limit_hz": 0}]},
    ):
        with pytest.raises(ValidationError):
            BleConfig.model_validate(bad)
    for bad in ({"rate_limit_hz": 0}, {"rate_limit_hz": -5}, {"rate_burst": 0}):
        with pytest.raises(ValidationError):
            LineConfig.model_validate({"name": "env", "port": "/dev/ttyAMA0", **bad})
