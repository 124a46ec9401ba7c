"""BLE through the whole agent: fake BlueZ on a private dbus-daemon, unmodified bleak, the real
runtime, outbox, signed batches, a real mosquitto and the reference platform. Sensor values
arrive as events with their units; customers' phones leave no trace in any artefact: the
outbox file, the platform's store (raw signed batches included) or the logs."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import structlog

from agent.config import parse_config
from agent.runtime.root import Runtime
from agent.security.keys import generate_keypair
from branchsim.bluez import PhoneCrowd
from branchsim.broker import Mosquitto
from branchsim.platform.receiver import Receiver
from tests import test_ble_bluez as _bluez
from tests.support.agentproc import until
from tests.test_ble_bluez import FAST, RUUVI, THERMO, World, leaks

world = _bluez.world  # the fake BlueZ world fixture (private dbus-daemon, advertisers)

GW = "gw-ble"



async def test_ble_sensors_reach_the_platform_and_phones_leave_no_trace(
    tmp_path: Path, world: World, broker: Mosquitto, platform: Receiver
) -> None:
    """BTHome and Ruuvi readings become signed, verified events with SenML units; 200 phone
    adverts during the run appear nowhere: not in the outbox file, the platform's database
    (events and raw batches) nor the agent's logs."""
    info = generate_keypair(tmp_path / "keys")
    platform.register(GW, info.public_pem)
    cfg = parse_config({
        "gateway": {"id": GW, "state_dir": str(tmp_path / "state"),
                    "runtime_dir": str(tmp_path / "run"),
                    "key_file": str(tmp_path / "keys" / "signing.key"), "time_sync": "synced"},
        "uplink": {"order": ["mqtt"], "mqtt": {"host": "127.0.0.1", "port": broker.port,
                                               "insecure": True}},
        "forwarder": {"batch_linger_ms": 0},
        "sources": {"ble": {**FAST, "sensors": [
            {"name": "server_room", "address": THERMO, "decoder": "bthome"},
            {"name": "cassette_1", "address": RUUVI, "decoder": "ruuvi"},
        ]}},
    })
    crowd = PhoneCrowd(rng=random.Random(11), size=40)
    rt = Runtime(cfg)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(rt.run(stop))
        try:
            await until(lambda: rt.ready.is_set(), 20)

            def types() -> set[tuple[str, str]]:
                return {(e["src"], e["type"]) for e in platform.events(GW)}

            await until(lambda: {("ble.server_room", "temperature"),
                                 ("ble.cassette_1", "pressure")} <= types(), 30)
            for _ in range(200):
                world.bluez.advertise(crowd.next())
                await asyncio.sleep(0)  # let the bus carry each advert, as a radio paces them
            def dropped_unknown() -> int:
                (ble,) = [s for s in rt.status_doc_sync()["sources"] if s["name"] == "ble"]
                return int(ble["stats"]["dropped_unknown"])

            # the privacy filter's count reaches status.json (what `branch-agent status` shows)
            await until(lambda: dropped_unknown() >= 200, 10)
            mark = len(platform.events(GW))
            await until(lambda: len(platform.events(GW)) > mark + 5, 20)  # drained past them
        finally:
            stop.set()
            await task
    events = platform.events(GW)
    temp = next(e for e in events if e["src"] == "ble.server_room" and e["type"] == "temperature")
    assert temp["u"] == "Cel" and temp["v"] == pytest.approx(21.5)
    press = next(e for e in events if e["src"] == "ble.cassette_1" and e["type"] == "pressure")
    assert press["u"] == "Pa" and press["v"] == pytest.approx(100400, rel=1e-3)
    assert {e["src"] for e in events} <= {"ble.server_room", "ble.cassette_1", "ble",
                                          "agent.audit"}
    artefacts = [
        (tmp_path / "state" / "outbox.db").read_bytes().hex(),
        (tmp_path / "state" / "outbox.db").read_bytes().decode("latin-1"),
        (tmp_path / "platform.db").read_bytes().hex(),
        (tmp_path / "platform.db").read_bytes().decode("latin-1"),
        repr(logs),
        repr(events),
    ]
    wal = tmp_path / "state" / "outbox.db-wal"
    if wal.exists():
        artefacts += [wal.read_bytes().hex(), wal.read_bytes().decode("latin-1")]
    assert leaks(" ".join(crowd.addresses[:1]), crowd), "the detector must see an address"
    assert leaks("\n".join(artefacts), crowd) == []
