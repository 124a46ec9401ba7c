"""End to end over a real mosquitto with mutual TLS: agent process -> signed batches ->
reference platform -> acks -> outbox empty. Every event exactly once, ids complete."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.protocol import decode_batch, encode_event
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until
from tests.support.broker import Mosquitto
from tests.support.pki import Pki


def ids_of(rx: Receiver, gw: str) -> list[int]:
    return [int(e["id"]) for e in rx.events(gw)]


def assert_each_delivered_once(rx: Receiver, gw: str) -> None:
    """Counted at the wire: the ids in every accepted batch, not the store (which keeps one
    row per id whatever arrives), are 1..N, each exactly once."""
    wire = sorted(rx.delivered_ids(gw))
    assert wire == list(range(1, len(wire) + 1)), "an id delivered twice, or one missing"


def test_every_event_arrives_exactly_once(tmp_path: Path, mosquitto_tls: Mosquitto,
                                          tls_platform: Receiver, pki: Pki) -> None:
    """3 000 synthetic events cross mTLS MQTT as signed batches; the platform stores each id
    exactly once, 1..N complete, and the agent's outbox drains to empty."""
    n = 3000
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(mosquitto_tls.port, pki)},
        sources={"synthetic": [{"name": "load", "rate_hz": 3000.0, "batch": 50, "count": n,
                                "waveform": "counter"}]},
    )
    tls_platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        wait_until(lambda: len(tls_platform.events(agent.gw)) >= n + 1, 60,
                   "all events (and the audit record of the config) at the platform", agent)
        wait_until(lambda: agent.outbox_count() == 0, 30, "outbox drained", agent)
    finally:
        rc = agent.stop()
    assert rc == 0
    ids = ids_of(tls_platform, agent.gw)
    assert ids == list(range(1, max(ids) + 1)), "ids complete: every id delivered once"
    assert_each_delivered_once(tls_platform, agent.gw)
    events = tls_platform.events(agent.gw)
    values = sorted(e["v"] for e in events if e["src"] == "synthetic.load")
    assert values == [float(i) for i in range(n)]
    others = {e["type"] for e in events if e["src"] != "synthetic.load"}
    assert others <= {"audit.config_loaded"}, others
    assert not tls_platform.counters(), f"unexpected rejections: {tls_platform.counters()}"
    assert tls_platform.chain_head(agent.gw)[0] == tls_platform.batch_count(agent.gw, 0)


def test_broker_outage_loses_nothing(tmp_path: Path, mosquitto_tls: Mosquitto,
                                     tls_platform: Receiver, pki: Pki) -> None:
    """The broker stops while events flow and the agent keeps accepting; after the broker is
    back every accepted event arrives once, in order per source, and the outbox drains."""
    n = 4000
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(mosquitto_tls.port, pki)},
        sources={"synthetic": [
            {"name": "a", "rate_hz": 400.0, "batch": 10, "count": n // 2, "waveform": "counter"},
            {"name": "b", "rate_hz": 400.0, "batch": 10, "count": n // 2, "waveform": "counter"},
        ]},
    )
    tls_platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        wait_until(lambda: len(tls_platform.events(agent.gw)) >= 300, 30,
                   "first events delivered",
                   agent)
        mosquitto_tls.stop()
        delivered_before = len(tls_platform.events(agent.gw))
        wait_until(lambda: agent.outbox_count() >= 500, 30, "events buffer while down", agent)
        mosquitto_tls.start()
        wait_until(lambda: len([e for e in tls_platform.events(agent.gw)
                                if e["src"].startswith("synthetic.")]) >= n, 90,
                   "backlog delivered", agent)
        wait_until(lambda: agent.outbox_count() == 0, 30, "outbox drained", agent)
    finally:
        rc = agent.stop()
    assert rc == 0
    assert delivered_before < n
    events = tls_platform.events(agent.gw)
    ids = [int(e["id"]) for e in events]
    assert ids == list(range(1, max(ids) + 1)), "ids complete: every id delivered once"
    assert_each_delivered_once(tls_platform, agent.gw)
    others = {e["type"] for e in events if not e["src"].startswith("synthetic.")}
    assert others <= {"audit.config_loaded", "audit.clock_jump"}, others
    for src in ("synthetic.a", "synthetic.b"):
        mine = sorted((e for e in events if e["src"] == src), key=lambda e: (e["seq"], e["id"]))
        assert [e["v"] for e in mine] == [float(i) for i in range(n // 2)], src
    assert tls_platform.chain_head(agent.gw)[0] == tls_platform.batch_count(agent.gw, 0)


def test_compressed_batches_arrive_exactly_once_in_a_fraction_of_the_bytes(
    tmp_path: Path, mosquitto_tls: Mosquitto, tls_platform: Receiver, pki: Pki
) -> None:
    """`[forwarder] compression = "zstd"`: 3 000 telemetry events cross mTLS MQTT in compressed
    batches (docs/PROTOCOL.md 3.1) that the reference platform verifies and unpacks; each id
    arrives once, and the batches of 100 events or more take at most 25 bytes per event on the
    wire (issue 19's target), where the same events uncompressed take several times that.

    Mutation: `compress=self.compress` dropped from `Signer.build`: the bytes per event are the
    uncompressed figure and this test fails."""
    n = 3000
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(mosquitto_tls.port, pki)},
        forwarder={"ack_timeout_s": 3.0, "status_interval_s": 1.0, "compression": "zstd",
                   "batch_linger_ms": 500.0},
        sources={"synthetic": [{"name": f"room{i}", "type": "temperature", "unit": "Cel",
                                "rate_hz": 300.0, "batch": 10, "count": n // 10}
                               for i in range(10)]},
    )
    tls_platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        wait_until(lambda: sum(e["src"].startswith("synthetic.")
                               for e in tls_platform.events(agent.gw)) >= n, 60,
                   "all events at the platform", agent)
        wait_until(lambda: agent.outbox_count() == 0, 30, "outbox drained", agent)
    finally:
        assert agent.stop() == 0
    assert_each_delivered_once(tls_platform, agent.gw)
    with sqlite3.connect(f"file:{tls_platform.store_path}?mode=ro", uri=True) as c:
        raws = [bytes(r) for (r,) in c.execute("SELECT raw FROM batches WHERE gw = ?",
                                               (agent.gw,))]
    big = [(raw, decode_batch(raw)[0]) for raw in raws]
    big = [(raw, b) for raw, b in big if len(b.events) >= 100]
    assert big, "no batch of 100 events or more: the test measured nothing"
    wire = sum(len(raw) for raw, _ in big) / sum(len(b.events) for _, b in big)
    plain = sum(len(encode_event(**e)) for _, b in big
                for e in b.events) / sum(len(b.events) for _, b in big)
    print(f"\nwire: {wire:.1f} B/event compressed, events alone {plain:.1f} B uncompressed")
    assert wire <= 25 and wire < plain / 3
