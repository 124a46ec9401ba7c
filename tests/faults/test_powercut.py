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
import contextlib
import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator

import aiocoap
import cbor2
import pytest

from agent import protocol
from agent.core.types import TELEMETRY
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


WINDOW_S = 2.0  # the telemetry window of the agent under test (production: 10 s)


def newest_committed(chain: Chain, src: str) -> float:
    """Capture time of the newest event of `src` that is committed: in the outbox file (read
    after the cut: what survived, as rows or inside batches signed at commit) or delivered to
    the platform."""
    newest = max((float(e["t"]) for e in chain.rx.events(chain.agent.gw) if e["src"] == src),
                 default=0.0)
    with contextlib.closing(sqlite3.connect(
            f"file:{chain.agent.state / 'outbox.db'}?mode=ro", uri=True)) as c:
        stored = [cbor2.loads(body) for (body,) in c.execute(
            "SELECT body FROM events WHERE prio = ?", (TELEMETRY,))]
        for (data,) in c.execute("SELECT data FROM batches WHERE held IS NOT NULL"):
            stored += protocol.decode_batch(bytes(data))[0].events
    return max([newest, *(float(e["t"]) for e in stored if e["src"] == src)])


def start(chain: Chain, k: int, ingest_port: int) -> None:
    """Run k: fresh counter sources (telemetry and alarms) and the CoAP ingest; telemetry
    committed in windows of WINDOW_S, as on a gateway (alarms and CoAP readings at once)."""
    chain.agent.doc["outbox"]["telemetry_window_ms"] = WINDOW_S * 1000
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
    spans: list[float] = []
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
            cut_at = time.time()
            report = power.cut()
            assert chain.agent.proc is not None and chain.agent.proc.wait(10) == -9
            assert report["killed"] == [chain.agent.proc.pid]
            chain.ledger.observe(killed=True)
            # telemetry not yet committed is lost with the cut: at most its window's worth
            lost_span = cut_at - newest_committed(chain, f"synthetic.t{k}")
            assert lost_span <= WINDOW_S + 1.0, f"{lost_span:.2f} s of telemetry lost"
            spans.append(lost_span)
            SUMMARY.faults["power cut (kill + unsynced writes dropped)"] += 1
            seconds.append(report["seconds"])
            dropped += report["bytes_discarded"]
    SUMMARY.figures[f"power cut x{cuts}: kill to durable state (max s)"] = f"{max(seconds):.3f}"
    SUMMARY.figures[f"power cut x{cuts}: unsynced bytes dropped"] = str(dropped)
    SUMMARY.figures[f"power cut x{cuts}: telemetry lost, max span (s; window {WINDOW_S:g})"] = (
        f"{max(spans):.2f}")
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



def test_telemetry_lost_at_a_cut_stays_within_its_window(chain: Chain, power: PowerSupply,
                                                         rng: random.Random) -> None:
    """Telemetry alone (nothing commits at once to take it along), committed in windows of
    WINDOW_S: at each of 3 cuts at a random moment, the telemetry lost is what was not yet
    committed, at most one window (plus 1 s of scheduling); everything committed before a cut
    is delivered after it. The cost of the window, bounded as documented
    (docs/HARDWARE.md, `[outbox] telemetry_window_ms`).

    Mutation: the window ignored by the writer's deadline (`_deadline` returning the oldest's
    time + 60 s) loses more than a window at a cut: this test fails."""
    spans = []
    for k in range(3):
        chain.agent.doc["outbox"]["telemetry_window_ms"] = WINDOW_S * 1000
        chain.agent.doc["sources"] = {"synthetic": [counter(f"w{k}", 50.0)]}
        chain.sources_used.append(f"synthetic.w{k}")
        before = chain.accepted_now()
        chain.agent.start()
        chain.wait_accepting(before)
        # The random moment is the injected fault, not a wait for a condition. At least two
        # windows after the start: a window not kept would show as more than WINDOW_S + 1 lost.
        time.sleep(2 * WINDOW_S + rng.uniform(0.0, WINDOW_S))
        chain.ledger.observe()
        cut_at = time.time()
        power.cut()
        assert chain.agent.proc is not None and chain.agent.proc.wait(10) == -9
        chain.ledger.observe(killed=True)
        spans.append(cut_at - newest_committed(chain, f"synthetic.w{k}"))
        SUMMARY.faults["power cut (kill + unsynced writes dropped)"] += 1
    chain.drain()
    assert quarantined(chain) == []
    rep = chain.check("power cut, telemetry window")
    assert rep.lost == 0
    SUMMARY.figures[f"power cut, telemetry only: lost span per cut (s; window {WINDOW_S:g})"] = (
        " ".join(f"{s:.2f}" for s in spans))
    assert all(0 <= s <= WINDOW_S + 1.0 for s in spans), spans
