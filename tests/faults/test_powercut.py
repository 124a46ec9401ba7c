"""Power cuts at random moments under load: the agent's state directory is on the power-cut file
system (branchsim.powerfs), so each cut SIGKILLs the agent *and* drops every write it had not
synced, which a process kill alone cannot do (the page cache survives a kill).

Load during each run: a telemetry counter source, an alarm counter source (priority 0), a CoAP
sensor posting readings back to back (each answered 2.04 or not), forwarding over MQTT with the
platform acknowledging. After each cut, before the restart: every id the outbox had committed
before the cut is still accounted for (in the outbox, at the platform, or dropped with a
record) and no id is reused. After each restart: no quarantined store (`outbox.db.corrupt-*`).
In the end, drained: every accepted alarm and reading and every reading answered 2.04 is
delivered exactly once, counted at the wire (`Receiver.delivered_ids`, not the deduplicating
store), the counter sources have no holes, the hash chain is whole and the platform never
answered `fork`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import aiocoap
import pytest

from branchsim.coapsensors import CoapSensorSim
from branchsim.powerfs import PowerSupply, fuse_unavailable
from tests.faults.checker import SUMMARY
from tests.faults.conftest import Chain, counter
from tests.support.agentproc import wait_until
from tests.support.broker import free_udp_port

CHANGED = str(aiocoap.CHANGED)
SENSOR = "atm1"


class Sensor:
    """A CoAP sensor posting readings 0, 1, 2, ... back to back from a thread of its own, across
    cuts and restarts; `codes` is each reading's answer (None: none came)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.codes: dict[int, str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                        name="coap-sensor", daemon=True)

    async def _run(self) -> None:
        async with CoapSensorSim(SENSOR, f"coap://127.0.0.1:{self.port}", timeout=8.0) as s:
            i = 0
            while not self._stop.is_set():
                pack = json.dumps([{"bn": f"{SENSOR}/", "n": "r", "v": i}]).encode()
                self.codes[i] = (await s.post_raw(pack, kind="senml")).code
                if self.codes[i] is None:
                    await asyncio.sleep(0.05)  # a sensor's backoff while the agent is down
                i += 1

    def __enter__(self) -> Sensor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "the CoAP sensor did not stop"

    def acked(self) -> set[int]:
        return {i for i, c in list(self.codes.items()) if c == CHANGED}


@pytest.fixture
def power(chain: Chain) -> Iterator[PowerSupply]:
    """The branch's power supply, with the agent's state directory on it (created and synced
    first, as an installer's provisioning leaves it)."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(f"power-cut fs: {reason}")
    with PowerSupply(chain.dir / "power") as supply:
        state = supply.mountpoint / "state"
        state.mkdir(mode=0o700)
        supply.sync()
        chain.move_state(state)
        try:
            yield supply
        finally:
            chain.agent.kill()  # before the unmount: its files are open there


def start(chain: Chain, k: int, ingest_port: int) -> None:
    """Run k: fresh counter sources (telemetry and alarms) and the CoAP ingest."""
    sources = [counter(f"t{k}", 200.0, batch=4), counter(f"a{k}", 10.0, prio=0,
                                                          type="alarm.test")]
    chain.sources_used += [f"synthetic.{s['name']}" for s in sources]
    chain.agent.doc["sources"] = {
        "synthetic": sources,
        "coap": {"name": "lan", "bind": "127.0.0.1", "port": ingest_port,
                 "global_rate_hz": 10_000.0, "global_burst": 10_000,
                 "sensors": [{"name": SENSOR, "allow": ["127.0.0.1"],
                              "rate_limit_hz": 10_000.0, "rate_burst": 10_000}]},
    }
    mark = len(chain.agent.log_text())
    chain.agent.start()
    wait_until(lambda: "coap.listening" in chain.agent.log_text()[mark:], 20,
               "agent CoAP ingest listening", chain.agent)


def quarantined(chain: Chain) -> list[str]:
    return sorted(p.name for p in chain.agent.state.glob("outbox.db.corrupt-*"))


def cut_at_random_moments(chain: Chain, power: PowerSupply, rng: random.Random,
                          cuts: int) -> Sensor:
    """`cuts` runs, each cut at a random moment after the agent started accepting; returns
    the sensor (stopped) with its answers."""
    ingest_port = free_udp_port()
    seconds: list[float] = []
    dropped = 0
    with Sensor(ingest_port) as sensor:
        for k in range(cuts):
            before = chain.accepted_now()
            start(chain, k, ingest_port)
            chain.wait_accepting(before)
            assert quarantined(chain) == [], chain.agent.log_text()[-3000:]
            # The random moment is the injected fault, not a wait for a condition.
            time.sleep(rng.uniform(0.0, 1.5))
            chain.ledger.observe()  # what is committed now must be there after the cut
            report = power.cut()
            assert chain.agent.proc is not None and chain.agent.proc.wait(10) == -9
            assert report["killed"] == [chain.agent.proc.pid]
            chain.ledger.observe(killed=True)
            SUMMARY.faults["power cut (kill + unsynced writes dropped)"] += 1
            seconds.append(report["seconds"])
            dropped += report["bytes_discarded"]
    SUMMARY.figures[f"power cut x{cuts}: kill to durable state (max s)"] = f"{max(seconds):.3f}"
    SUMMARY.figures[f"power cut x{cuts}: unsynced bytes dropped"] = str(dropped)
    return sensor


def check_delivered(chain: Chain, sensor: Sensor, name: str) -> None:
    """Drained: the fault suite's checks, then the CoAP readings and the wire counts."""
    assert quarantined(chain) == []
    rep = chain.check(name)
    assert rep.lost == 0 and rep.alarms > 0
    rx, gw = chain.rx, chain.agent.gw
    events = rx.events(gw)
    readings = Counter(int(e["v"]) for e in events if e["src"] == f"coap.{SENSOR}")
    acked = sensor.acked()
    assert acked, "no CoAP reading was answered 2.04"
    assert sorted(acked - set(readings))[:20] == [], "readings answered 2.04 never delivered"
    assert {v: n for v, n in readings.items() if n > 1} == {}, "a reading delivered twice"
    wire = Counter(rx.delivered_ids(gw))  # counted at the wire: the store ignores a repeat
    assert {i: n for i, n in wire.items() if n > 1} == {}, "an event id in two batches"
    assert not any(reason == "fork" for _, reason in rx.counters()), rx.counters()
    assert all(e["type"] != "gateway.store_reset" for e in events)
    SUMMARY.figures[f"{name}: CoAP readings answered 2.04"] = str(len(acked))
    SUMMARY.figures[f"{name}: quarantines"] = "0"
    # The local audit log survives the cuts whole: its file's name is made durable (directory
    # fsync) before its first record; before that fix every cut lost the file and the restart
    # reported the forwarded records gone (one audit.integrity_failure per cut).
    failures = [e for e in events if e["type"] == "audit.integrity_failure"]
    assert failures == [], failures[:3]
    SUMMARY.figures[f"{name}: audit.integrity_failure alerts"] = "0"


def test_three_power_cuts_lose_nothing(chain: Chain, power: PowerSupply,
                                       rng: random.Random) -> None:
    """3 power cuts at random moments under load (alarms, telemetry, CoAP posts, forwarding):
    no quarantine, nothing committed before a cut is missing after it, every accepted alarm
    and 2.04-acknowledged reading is delivered exactly once, no fork."""
    sensor = cut_at_random_moments(chain, power, rng, 3)
    chain.drain()
    check_delivered(chain, sensor, "power cut x3")


@pytest.mark.slow
def test_fifty_power_cuts_lose_nothing(chain: Chain, power: PowerSupply,
                                       rng: random.Random) -> None:
    """FAULTS_CUTS (default 50) power cuts at random moments under load: as above."""
    n = int(os.environ.get("FAULTS_CUTS", "50"))
    sensor = cut_at_random_moments(chain, power, rng, n)
    chain.drain()
    check_delivered(chain, sensor, f"power cut x{n}")

