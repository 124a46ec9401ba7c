"""End to end over a real mosquitto with mutual TLS: agent process -> signed batches ->
reference platform -> acks -> outbox empty. Every event exactly once, ids complete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from branchsim.platform.mqtt_server import MqttPlatformServer, PlatformTls
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until
from tests.support.broker import Mosquitto, free_port, mosquitto_factory, pki  # noqa: F401
from tests.support.pki import Pki, make_pki


@pytest.fixture
def tls_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def broker(tmp_path: Path, tls_pki: Pki) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker", tls=tls_pki).start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def platform(tmp_path: Path, broker: Mosquitto, tls_pki: Pki) -> Iterator[Receiver]:
    rx = Receiver(tmp_path / "platform.db")
    server = MqttPlatformServer(
        rx, "127.0.0.1", broker.port,
        tls=PlatformTls(ca=tls_pki.ca_cert, cert=tls_pki.platform_cert, key=tls_pki.platform_key),
        client_id="platform-e2e",
    )
    server.start()
    try:
        assert server.ready.wait(10), "platform never subscribed"
        yield rx
    finally:
        server.stop()
        rx.close()


def ids_of(rx: Receiver, gw: str) -> list[int]:
    return [int(e["id"]) for e in rx.events(gw)]


def test_every_event_arrives_exactly_once(tmp_path: Path, broker: Mosquitto, platform: Receiver,
                                          tls_pki: Pki) -> None:
    """3 000 synthetic events cross mTLS MQTT as signed batches; the platform stores each id
    exactly once, 1..N complete, and the agent's outbox drains to empty."""
    n = 3000
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, tls_pki)},
        sources={"synthetic": [{"name": "load", "rate_hz": 3000.0, "batch": 50, "count": n,
                                "waveform": "counter"}]},
    )
    platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        wait_until(lambda: len(platform.events(agent.gw)) >= n + 1, 60,
                   "all events (and the audit record of the config) at the platform", agent)
        wait_until(lambda: agent.outbox_count() == 0, 30, "outbox drained", agent)
    finally:
        rc = agent.stop()
    assert rc == 0
    ids = ids_of(platform, agent.gw)
    assert ids == list(range(1, max(ids) + 1)), "ids complete: every id delivered once"
    events = platform.events(agent.gw)
    values = sorted(e["v"] for e in events if e["src"] == "synthetic.load")
    assert values == [float(i) for i in range(n)]
    others = {e["type"] for e in events if e["src"] != "synthetic.load"}
    assert others <= {"audit.config_loaded"}, others
    assert not platform.counters(), f"unexpected rejections: {platform.counters()}"
    assert platform.chain_head(agent.gw)[0] == platform.batch_count(agent.gw)


def test_broker_outage_loses_nothing(tmp_path: Path, broker: Mosquitto, platform: Receiver,
                                     tls_pki: Pki) -> None:
    """The broker stops while events flow and the agent keeps accepting; after the broker is
    back every accepted event arrives once, in order per source, and the outbox drains."""
    n = 4000
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, tls_pki)},
        sources={"synthetic": [
            {"name": "a", "rate_hz": 400.0, "batch": 10, "count": n // 2, "waveform": "counter"},
            {"name": "b", "rate_hz": 400.0, "batch": 10, "count": n // 2, "waveform": "counter"},
        ]},
    )
    platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        wait_until(lambda: len(platform.events(agent.gw)) >= 300, 30, "first events delivered",
                   agent)
        broker.stop()
        delivered_before = len(platform.events(agent.gw))
        wait_until(lambda: agent.outbox_count() >= 500, 30, "events buffer while down", agent)
        broker.start()
        wait_until(lambda: len([e for e in platform.events(agent.gw)
                                if e["src"].startswith("synthetic.")]) >= n, 90,
                   "backlog delivered", agent)
        wait_until(lambda: agent.outbox_count() == 0, 30, "outbox drained", agent)
    finally:
        rc = agent.stop()
    assert rc == 0
    assert delivered_before < n
    events = platform.events(agent.gw)
    ids = [int(e["id"]) for e in events]
    assert ids == list(range(1, max(ids) + 1)), "ids complete: every id delivered once"
    others = {e["type"] for e in events if not e["src"].startswith("synthetic.")}
    assert others <= {"audit.config_loaded", "audit.clock_jump"}, others
    for src in ("synthetic.a", "synthetic.b"):
        mine = sorted((e for e in events if e["src"] == src), key=lambda e: (e["seq"], e["id"]))
        assert [e["v"] for e in mine] == [float(i) for i in range(n // 2)], src
    assert platform.chain_head(agent.gw)[0] == platform.batch_count(agent.gw)
