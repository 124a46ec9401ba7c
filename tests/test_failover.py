"""Uplink failover with real parts: MQTT (real mosquitto) preferred, CoAP as the backup path, one
reference platform (one Receiver) behind both. The broker goes away mid-run and comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.protocol import Ack
from branchsim.platform.coap_server import serve_coap
from branchsim.platform.mqtt_server import MqttPlatformServer
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AgentProcess, mqtt_uplink, until
from tests.support.broker import Mosquitto, free_udp_port

FAILOVER_AFTER_S = 1.0
STATUS_PERIOD_S = 2.0  # the runtime writes status.json every 2 s




class CountingHandler:
    """The CoAP endpoint's view of the shared Receiver, counting the batches that came by CoAP."""

    def __init__(self, rx: Receiver) -> None:
        self.rx = rx
        self.handled = 0

    def handle_batch(self, data: bytes, topic_gw: str | None = None) -> Ack:
        self.handled += 1
        return self.rx.handle_batch(data, topic_gw)


@dataclass
class Platform:
    rx: Receiver
    broker: Mosquitto
    mqtt: MqttPlatformServer
    coap: CountingHandler
    coap_port: int


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    broker = Mosquitto(tmp_path / "broker").start()
    rx = Receiver(tmp_path / "platform.db")
    server = MqttPlatformServer(rx, "127.0.0.1", broker.port, client_id="platform-failover")
    coap = CountingHandler(rx)
    port = free_udp_port()
    ctx = await serve_coap(coap, "127.0.0.1", port)
    try:
        await asyncio.to_thread(server.start)
        assert await asyncio.to_thread(server.ready.wait, 10), "platform never subscribed"
        yield Platform(rx, broker, server, coap, port)
    finally:
        await ctx.shutdown()
        await asyncio.to_thread(server.stop)
        broker.stop()
        rx.close()


def active(agent: AgentProcess) -> str | None:
    """status.json forwarder.active_transport: "mqtt", "coap", or None while all are down."""
    fw = agent.status().get("forwarder") or {}
    kind = fw.get("active_transport")
    return kind if isinstance(kind, str) else None


async def test_mqtt_outage_fails_over_to_coap_and_back(tmp_path: Path, platform: Platform) -> None:
    """MQTT preferred: broker stopped -> batches flow over CoAP within failover_after_s; broker
    back -> traffic returns to MQTT; every event reaches the one platform exactly once and the
    hash chain is unbroken."""
    n = 4000
    rx = platform.rx
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={
            "order": ["mqtt", "coap"],
            "failover_after_s": FAILOVER_AFTER_S,
            "mqtt": mqtt_uplink(platform.broker.port, None),
            "coap": {"base": f"coap://127.0.0.1:{platform.coap_port}", "insecure": True,
                     "timeout": 3.0, "probe_interval": 0.5},
        },
        sources={"synthetic": [{"name": "load", "rate_hz": 200.0, "batch": 10, "count": n,
                                "waveform": "counter"}]},
    )
    rx.register(agent.gw, agent.pubkey.read_bytes())

    def delivered() -> int:
        return len(rx.events(agent.gw))

    agent.start()
    try:
        await until(lambda: delivered() >= 300 and active(agent) == "mqtt", 20,
                    "first events delivered over MQTT", agent)
        assert platform.coap.handled == 0

        platform.broker.stop()
        down_at = time.monotonic()
        await until(lambda: active(agent) == "coap", FAILOVER_AFTER_S + STATUS_PERIOD_S + 4,
                    "forwarder failed over to CoAP", agent)
        failover_s = time.monotonic() - down_at
        on_coap = delivered()
        await until(lambda: delivered() >= on_coap + 300, 10,
                    "platform keeps receiving over CoAP", agent)
        assert platform.coap.handled > 0

        mqtt_before = platform.mqtt.handled
        platform.broker.start()
        await until(lambda: active(agent) == "mqtt", 15, "traffic moved back to MQTT", agent)
        coap_after_return = platform.coap.handled
        await until(lambda: platform.mqtt.handled > mqtt_before + 3, 20,
                    "platform receives over MQTT again", agent)

        await until(lambda: delivered() >= n + 1, 40,
                    "every event (and the audit record of the config) at the platform", agent)
        await until(lambda: agent.outbox_count() == 0, 20, "outbox drained", agent)
    finally:
        rc = agent.stop()
    assert rc == 0, agent.log_text()[-6000:]
    assert failover_s <= FAILOVER_AFTER_S + STATUS_PERIOD_S + 4
    # back on MQTT, CoAP carries at most the in-flight batches that were already under way
    assert platform.coap.handled - coap_after_return <= 8
    events = rx.events(agent.gw)
    ids = [int(e["id"]) for e in events]
    assert ids == list(range(1, max(ids) + 1)), "ids complete: every id delivered once"
    wire = sorted(rx.delivered_ids(agent.gw))  # counted at the wire, not in the deduping store
    assert wire == ids, "an id delivered over both uplinks, or twice over one"
    load = [e for e in events if e["src"] == "synthetic.load"]
    assert sorted(e["v"] for e in load) == [float(i) for i in range(n)]
    assert {e["type"] for e in events if e["src"] != "synthetic.load"} <= {
        "audit.config_loaded", "audit.clock_jump"}
    assert rx.chain_head(agent.gw)[0] == rx.batch_count(agent.gw, 0)
    assert set(rx.counters()) <= {(agent.gw, "replay")}, rx.counters()
