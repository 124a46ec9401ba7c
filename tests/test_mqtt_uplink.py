"""MQTT uplink against a real mosquitto with mutual TLS, and the reference platform's MQTT side."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from agent.protocol import (
    ZERO_HASH,
    Ack,
    batch_hash,
    build_batch,
    decode_ack,
    encode_event,
    kid_for,
)
from agent.uplink.base import Uplink, UplinkDownError
from agent.uplink.mqtt import MqttUplink, MqttUplinkConfig
from branchsim.natscluster import NatsCluster
from branchsim.platform.mqtt_server import MqttPlatformServer, PlatformTls
from branchsim.platform.receiver import Receiver
from tests.support import broker as _broker
from tests.support.broker import Mosquitto
from tests.support.pki import Pki

# The shared fixtures (the lead's conftest may import them for the whole suite).
pki = _broker.pki
mosquitto_factory = _broker.mosquitto_factory
mosquitto_tls = _broker.mosquitto_tls

GW = "gw-t1"


async def wait_until(cond: Callable[[], bool], within: float = 15.0) -> None:
    """Poll a condition on the event loop until true or fail after `within` seconds."""
    async with asyncio.timeout(within):
        while not cond():
            await asyncio.sleep(0.02)


class Chain:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.seq = 0
        self.prev = ZERO_HASH

    def next(self) -> bytes:
        self.seq += 1
        data = build_batch(key=self.key, kid=kid_for(self.key.public_key()), gw=GW,
                           seq=self.seq, prev=self.prev, created=1.0,
                           encoded_events=[encode_event(id=self.seq, t=1.0, tq=0, src="s",
                                                        type="t", v=self.seq, prio=2)])
        self.prev = batch_hash(data)
        return data

    def pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def uplink_cfg(broker: Mosquitto, pki: Pki, **over: object) -> MqttUplinkConfig:
    doc: dict[str, object] = {
        "host": "127.0.0.1", "port": broker.port, "backoff_base": 0.05, "backoff_max": 0.5,
        "connect_timeout": 5.0,
        "tls": {"ca": pki.ca_cert, "cert": pki.client_cert, "key": pki.client_key},
    }
    doc.update(over)
    return MqttUplinkConfig.model_validate(doc)


class Running:
    """An uplink's run() task plus what it reported."""

    def __init__(self, uplink: MqttUplink) -> None:
        self.uplink = uplink
        self.acks: list[Ack] = []
        self.states: list[bool] = []
        self.task = asyncio.create_task(
            uplink.run(lambda raw: self.acks.append(decode_ack(raw)), self.states.append))

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def start_uplink() -> AsyncIterator[Callable[[MqttUplinkConfig], Running]]:
    started: list[Running] = []

    def start(cfg: MqttUplinkConfig) -> Running:
        r = Running(MqttUplink(cfg, GW))
        started.append(r)
        return r

    try:
        yield start
    finally:
        for r in started:
            if not r.task.done():
                await r.stop()


@pytest.fixture
def platform(tmp_path: Path, mosquitto_tls: Mosquitto, pki: Pki) -> Iterator[
        tuple[Receiver, Chain]]:
    receiver = Receiver(tmp_path / "platform.db")
    chain = Chain()
    receiver.register(GW, chain.pem())
    server = MqttPlatformServer(receiver, "127.0.0.1", mosquitto_tls.port,
                                tls=PlatformTls(pki.ca_cert, pki.platform_cert, pki.platform_key))
    with server:
        assert server.ready.wait(10)
        yield receiver, chain
    receiver.close()


def test_config_requires_tls_unless_insecure() -> None:
    """Without [tls] the config is refused unless insecure = true."""
    with pytest.raises(ValidationError, match="mutual TLS"):
        MqttUplinkConfig(host="h")
    assert MqttUplinkConfig(host="h", insecure=True).tls is None
    with pytest.raises(ValidationError, match="wildcards"):
        MqttUplinkConfig(host="h", insecure=True, topic_prefix="bank/+")


async def test_send_over_mtls_and_platform_acks(
    mosquitto_tls: Mosquitto, pki: Pki, platform: tuple[Receiver, Chain],
    start_uplink: Callable[[MqttUplinkConfig], Running],
) -> None:
    """Batches sent over mTLS return on PUBACK; the platform verifies, stores and acks each."""
    receiver, chain = platform
    run = start_uplink(uplink_cfg(mosquitto_tls, pki))
    assert isinstance(run.uplink, Uplink)
    await wait_until(lambda: run.uplink.connected)
    assert run.states == [True]
    batches = [chain.next() for _ in range(20)]
    for data in batches:  # in order: the platform enforces the chain
        await run.uplink.send(0, data)
    await wait_until(lambda: len(run.acks) == 20)
    assert [(a.seq, a.ok, a.h) for a in run.acks] == [
        (i + 1, True, batch_hash(d)) for i, d in enumerate(batches)]
    assert [e["id"] for e in receiver.events(GW)] == list(range(1, 21))
    await run.uplink.send(0, batches[0])  # the same bytes again: the platform says "replay"
    await wait_until(lambda: len(run.acks) == 21)
    assert (run.acks[-1].ok, run.acks[-1].err, run.acks[-1].h) == (
        False, "replay", batch_hash(batches[0]))


async def test_status_online_then_offline(
    mosquitto_tls: Mosquitto, pki: Pki, start_uplink: Callable[[MqttUplinkConfig], Running],
) -> None:
    """The retained status says online after connect and offline after a clean stop."""
    run = start_uplink(uplink_cfg(mosquitto_tls, pki))
    await wait_until(lambda: run.uplink.connected)
    await run.uplink.publish_status({"state": "online", "sources": 3})
    assert read_retained(mosquitto_tls, pki, f"bank/v1/{GW}/status")["sources"] == 3
    await run.stop()
    assert run.states == [True, False]
    doc = read_retained(mosquitto_tls, pki, f"bank/v1/{GW}/status")
    assert (doc["state"], doc["gw"]) == ("offline", GW)
    with pytest.raises(UplinkDownError):
        await run.uplink.send(1, b"x")


def read_retained(broker: Mosquitto, pki: Pki, topic: str) -> dict[str, object]:
    """Read one retained JSON message with a separate paho client (its own thread)."""
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        arrived.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.tls_set(str(pki.ca_cert), str(pki.platform_cert), str(pki.platform_key))
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        arrived.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert got, f"no retained message on {topic}"
    doc = json.loads(got[0])
    assert isinstance(doc, dict)
    return doc


async def test_wrong_ca_fails_clearly(
    mosquitto_tls: Mosquitto, pki: Pki, start_uplink: Callable[[MqttUplinkConfig], Running],
) -> None:
    """Trusting the wrong CA never connects and reports a certificate verification error."""
    run = start_uplink(uplink_cfg(mosquitto_tls, pki, tls={
        "ca": pki.other_ca_cert, "cert": pki.client_cert, "key": pki.client_key}))
    await wait_until(lambda: run.uplink.last_error is not None)
    error = run.uplink.last_error
    assert error is not None and error.kind == "tls"
    assert "certificate" in error.message and "tls.ca" in error.message
    assert not run.uplink.connected and run.states == []


async def test_client_cert_from_wrong_ca_refused(
    mosquitto_tls: Mosquitto, pki: Pki, start_uplink: Callable[[MqttUplinkConfig], Running],
) -> None:
    """A gateway certificate the broker does not trust never gets connected."""
    run = start_uplink(uplink_cfg(mosquitto_tls, pki, tls={
        "ca": pki.ca_cert, "cert": pki.other_client_cert, "key": pki.other_client_key}))
    await wait_until(lambda: run.uplink.last_error is not None)
    error = run.uplink.last_error
    assert error is not None and error.kind == "tls" and "tls.cert" in error.message
    assert not run.uplink.connected and run.states == []


async def test_reconnects_after_broker_restart(
    mosquitto_tls: Mosquitto, pki: Pki, platform: tuple[Receiver, Chain],
    start_uplink: Callable[[MqttUplinkConfig], Running],
) -> None:
    """After a broker restart the uplink reconnects by itself and send works again."""
    receiver, chain = platform
    run = start_uplink(uplink_cfg(mosquitto_tls, pki))
    await wait_until(lambda: run.uplink.connected)
    await run.uplink.send(0, chain.next())
    await wait_until(lambda: len(run.acks) == 1)
    mosquitto_tls.restart()
    await wait_until(lambda: run.states[-1:] == [True] and len(run.states) >= 3)
    assert run.states == [True, False, True]
    mosquitto_tls.stop()
    await wait_until(lambda: not run.uplink.connected)
    with pytest.raises(UplinkDownError):
        await run.uplink.send(0, b"while down")
    mosquitto_tls.start()
    await wait_until(lambda: run.uplink.connected)
    data = chain.next()
    await run.uplink.send(0, data)  # the platform's paho client reconnects too
    await wait_until(lambda: any(a.h == batch_hash(data) and a.ok for a in run.acks))
    assert [e["id"] for e in receiver.events(GW)] == [1, 2]


async def test_insecure_plain_tcp_v311(
    mosquitto_factory: Callable[..., Mosquitto], pki: Pki,
    start_uplink: Callable[[MqttUplinkConfig], Running],
) -> None:
    """insecure = true and protocol v311 connect to a plain broker and publish."""
    broker = mosquitto_factory()
    run = start_uplink(MqttUplinkConfig(host="127.0.0.1", port=broker.port, insecure=True,
                                        protocol="v311"))
    await wait_until(lambda: run.uplink.connected)
    await run.uplink.send(1, b"payload")


async def test_a_refused_ack_subscription_is_counted_and_connected_again(
        tmp_path: Path, start_uplink: Callable[[MqttUplinkConfig], Running]) -> None:
    """A broker that refuses the ack topic's subscription (here NATS's permissions; NATS also
    refuses while its JetStream cannot make the session's consumer, as under a connection
    storm) leaves no ack to come: the uplink counts it, logs it and connects again, instead of
    sending batches into a session that never answers. (mosquitto grants a subscription its
    ACL denies, and only withholds the messages.)"""
    deny = ("authorization { users = [ {user: gw, password: x, permissions: "
            '{subscribe: {deny: ["bank.v1.*.ack"]}}} ] }\nno_auth_user: gw\n')
    with NatsCluster(tmp_path / "nats", nodes=1, extra=deny) as nats:
        host, port = nats.mqtt[0]
        run = start_uplink(MqttUplinkConfig.model_validate({
            "host": host, "port": port, "protocol": "v311", "insecure": True, "backoff_base": 0.05,
            "backoff_max": 0.5, "connect_timeout": 5.0}))
        await wait_until(lambda: run.uplink.counters["subscribe_refused"] >= 2)
        assert run.states[:3] == [True, False, True]  # connected, refused, connected again


async def test_a_broker_without_mqtt_5_gets_a_hint_to_use_3_1_1(
        tmp_path: Path, start_uplink: Callable[[MqttUplinkConfig], Running]) -> None:
    """NATS speaks MQTT 3.1.1 only and refuses an MQTT 5 CONNECT: the uplink's error says to
    set protocol = "v311", not to check the certificate."""
    with NatsCluster(tmp_path / "nats", nodes=1) as nats:
        host, port = nats.mqtt[0]
        run = start_uplink(MqttUplinkConfig.model_validate({
            "host": host, "port": port, "protocol": "v5", "insecure": True,
            "backoff_base": 0.05, "backoff_max": 0.5, "connect_timeout": 5.0}))
        await wait_until(lambda: run.uplink.last_error is not None)
        failure = run.uplink.last_error
        assert failure is not None and "v311" in str(failure), failure
        assert run.states == []
