"""The forwarder against a real mosquitto and the reference platform: alarms overtake a
rate-limited backlog, broker ack mode, rejected batches are kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.core.types import Event
from agent.outbox import Outbox
from agent.runtime.forwarder import Forwarder, Signer
from agent.uplink.mqtt import MqttUplink, MqttUplinkConfig
from branchsim.broker import Mosquitto
from branchsim.platform.mqtt_server import MqttPlatformServer
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import until

GW = "gw-fwd"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def platform(tmp_path: Path, broker: Mosquitto, key: Ed25519PrivateKey) -> Iterator[Receiver]:
    rx = Receiver(tmp_path / "platform.db")
    rx.register(GW, key.public_key().public_bytes(Encoding.PEM,
                                                   PublicFormat.SubjectPublicKeyInfo))
    server = MqttPlatformServer(rx, "127.0.0.1", broker.port, client_id="platform-fwd")
    server.start()
    try:
        assert server.ready.wait(10)
        yield rx
    finally:
        server.stop()
        rx.close()


def uplink(broker: Mosquitto) -> MqttUplink:
    return MqttUplink(MqttUplinkConfig(host="127.0.0.1", port=broker.port, insecure=True,
                                       backoff_base=0.05, backoff_max=0.5), GW)


def ev(i: int, prio: int = 2) -> Event:
    return Event(src="s", type="t", v=i, t=time.time(), prio=prio)



@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = await Outbox.open(tmp_path / "gw" / "outbox.db", commit_interval=0.001)
    try:
        yield ob
    finally:
        await ob.close()


async def test_alarm_overtakes_a_rate_limited_backlog(broker: Mosquitto, platform: Receiver,
                                                      key: Ed25519PrivateKey,
                                                      outbox: Outbox) -> None:
    """While a 5 000-event backlog drains at a limited byte rate, an alarm accepted mid-drain
    goes out in the next batch claimed (it bypasses the limit) and reaches the platform long
    before the backlog is done."""
    await outbox.append_many([ev(i) for i in range(5000)])
    fw = Forwarder(outbox, [uplink(broker)], Signer(key, GW, time.time),
                   batch_max_events=100, window=2, drain_rate_bytes_per_s=30_000)
    task = asyncio.create_task(fw.run())
    try:
        await until(lambda: len(platform.events(GW)) >= 300, 30, "backlog draining")
        seq_before = platform.chain_head(GW)[0]
        [alarm_id] = await outbox.append_many([ev(-1, prio=0)])
        await until(lambda: any(e["id"] == alarm_id for e in platform.events(GW)), 10,
                    "alarm delivered")
        events = platform.events(GW)
        alarm = next(e for e in events if e["id"] == alarm_id)
        # in flight when the alarm came: at most `window` batches, plus the one being throttled
        assert alarm["seq"] <= seq_before + 2 + 1
        assert len(events) < 5000, "the alarm must not wait for the backlog"
        await until(lambda: len(platform.events(GW)) == 5001, 60, "backlog done")
        await until(lambda: fw.stats.events_acked == 5001, 10, "all acked")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (await outbox.stats()).depth == {}


async def test_broker_ack_mode_deletes_on_puback(broker: Mosquitto, key: Ed25519PrivateKey,
                                                 outbox: Outbox) -> None:
    """ack_mode broker: with no platform listening, PUBACK alone lets events leave the outbox."""
    await outbox.append_many([ev(i) for i in range(250)])
    fw = Forwarder(outbox, [uplink(broker)], Signer(key, GW, time.time),
                   batch_max_events=100, ack_mode="broker")
    task = asyncio.create_task(fw.run())
    try:
        await until(lambda: fw.stats.events_acked == 250, 20, "acked by the broker")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (await outbox.stats()).depth == {}


async def test_rejected_batches_are_kept_and_counted(broker: Mosquitto, platform: Receiver,
                                                     outbox: Outbox) -> None:
    """Signed by a key the platform does not know: every batch is rejected (unknown-key), the
    rejection is counted, and not one event leaves the outbox."""
    stranger = Ed25519PrivateKey.generate()
    await outbox.append_many([ev(i) for i in range(50)])
    fw = Forwarder(outbox, [uplink(broker)], Signer(stranger, GW, time.time),
                   batch_max_events=20, ack_timeout_s=0.5)
    task = asyncio.create_task(fw.run())
    try:
        await until(lambda: fw.stats.rejections.get("unknown-key", 0) >= 3, 20, "rejections")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    st = await outbox.stats()
    assert sum(st.depth.values()) == 50
    assert platform.events(GW) == []
    assert platform.counters()[(GW, "unknown-key")] >= 3
