"""Flood resistance (issue 10, item 4): 10 000 CoAP requests/s at the ingest endpoint of a real
agent process must not delay its alarms. Real mosquitto, real reference platform, the flood from
a separate process (`python -m branchsim.coapsensors flood`)."""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until
from tests.support.broker import Mosquitto
from tests.test_coap_ingest import free_udp_port

ALARM_HZ = 5.0
FLOOD_RATE = 10_000.0
FLOOD_SECONDS = 10.0
BASELINE_ALARMS = 15


def alarms(rx: Receiver, gw: str) -> list[tuple[float, float, float]]:
    """(counter value, capture time, platform receive time) of every alarm delivered."""
    with sqlite3.connect(f"file:{rx.store_path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT e.v, e.t, b.received_at FROM events e JOIN batches b"
            " ON b.gw = e.gw AND b.epoch = e.epoch AND b.lane = e.lane AND b.seq = e.seq"
            " WHERE e.gw = ? AND e.src = 'synthetic.alarm' ORDER BY e.id",
            (gw,),
        ).fetchall()
    return [(float(json.loads(v)), float(t), float(rcv)) for v, t, rcv in rows]


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


def coap_health(agent: AgentProcess) -> dict[str, Any]:
    for src in agent.status().get("sources", []):
        if src["name"] == "coap.lan":
            return dict(src)
    return {}


def test_coap_flood_does_not_delay_alarms(
    tmp_path: Path, broker: Mosquitto, platform: Receiver
) -> None:
    """Alarms (5/s, priority 0) keep flowing while a separate process sends ~10 000 CoAP
    POSTs/s for 10 s: every alarm is accepted and delivered, the agent stays up, the flood is
    counted as rejected (``flooded`` before aiocoap parses a datagram), and alarm latency
    (capture -> verified at the platform) p50 stays within 2 x the p50 measured without the
    flood in the same run, plus 5 ms. The bound is relative because this machine is shared
    and noisy (2 cores: the flood generator takes one); p99 is printed, not asserted: with 15
    alarms before the flood it is their slowest one, and one scheduling hiccup moved the
    budget it made by 25 ms (a CI rehearsal failed so on 2026-12-01, the gate in place).

    Mutation (``make mutants``, 2026-11-30): without the datagram gate (``_GatedUDP6`` admitting
    everything) aiocoap parses and remembers every request; alarm p50 went from 4 to 15-21 ms
    (p99 from 5-6 to 38-45 ms) against a budget of ~12 ms, and ``flooded`` stays 0: the test
    fails on both."""
    port = free_udp_port()
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, None)},
        sources={
            "synthetic": [{"name": "alarm", "type": "alarm", "rate_hz": ALARM_HZ,
                           "priority": 0, "waveform": "counter"}],
            "coap": {"bind": "127.0.0.1", "port": port,
                     "sensors": [{"name": "atm1", "allow": ["127.0.0.1"]}]},
        },
    )
    platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        agent.wait_log("coap.listening")
        t0 = time.time()
        wait_until(lambda: sum(t >= t0 for _, t, _ in alarms(platform, agent.gw))
                   >= BASELINE_ALARMS, 20, "baseline alarms delivered", agent)
        flood_start = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "branchsim.coapsensors", "flood", "127.0.0.1", str(port),
             "atm1", "--rate", str(FLOOD_RATE), "--duration", str(FLOOD_SECONDS)],
            capture_output=True, timeout=FLOOD_SECONDS + 20, check=True,
        )
        flood_end = time.time()
        stats = json.loads(proc.stdout)
        wait_until(lambda: any(t > flood_end + 0.5 for _, t, _ in alarms(platform, agent.gw)),
                   20, "alarms after the flood delivered", agent)
        wait_until(lambda: agent.status().get("updated", 0) > flood_end + 0.5, 10,
                   "status.json written after the flood", agent)
        health = coap_health(agent)
        alarm_health = next(s for s in agent.status()["sources"]
                            if s["name"] == "synthetic.alarm")
        assert agent.running, "the agent survived the flood"
    finally:
        rc = agent.stop()
    assert rc == 0

    rows = alarms(platform, agent.gw)
    values = [v for v, _, _ in rows]
    assert values == [float(i) for i in range(len(values))], "every alarm delivered, in order"
    assert alarm_health["errors"] == {}, "no alarm was refused"
    base = [rcv - t for _, t, rcv in rows if t0 <= t < flood_start]
    during = [rcv - t for _, t, rcv in rows if flood_start + 0.2 <= t <= flood_end - 0.2]
    assert len(base) >= BASELINE_ALARMS - 1 and len(during) >= FLOOD_SECONDS * ALARM_HZ * 0.8
    budget = 2 * statistics.median(base) + 0.005
    errors = health["errors"]
    rejected = errors.get("flooded", 0) + errors.get("rate_limited", 0)
    print(
        f"\nflood: sent {stats['sent']} in {stats['duration']:.1f} s ({stats['rate']:.0f}/s), "
        f"answers {stats['answers']}; agent: {health['readings']} readings accepted, "
        f"rejected {errors}\n"
        f"alarm latency without flood: p50 {statistics.median(base) * 1e3:.1f} ms, "
        f"p99 {p99(base) * 1e3:.1f} ms (n={len(base)}); during flood: "
        f"p50 {statistics.median(during) * 1e3:.1f} ms, p99 {p99(during) * 1e3:.1f} ms, "
        f"max {max(during) * 1e3:.1f} ms (n={len(during)}); p50 budget {budget * 1e3:.0f} ms"
    )
    assert stats["rate"] >= FLOOD_RATE * 0.8, f"the generator fell short: {stats}"
    assert statistics.median(during) <= budget, (
        f"alarm p50 {statistics.median(during):.3f} s over budget {budget:.3f} s")
    assert errors.get("flooded", 0) >= stats["sent"] * 0.8, f"not gated before parsing: {errors}"
    assert rejected >= stats["sent"] * 0.9, f"the flood was not rejected: {errors}"
    assert health["readings"] <= 20 + 5 * (FLOOD_SECONDS + 5), "only the sensor's rate got in"
