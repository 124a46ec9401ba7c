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
from agent.protocol import ZERO_HASH, batch_hash
from agent.runtime.forwarder import MAX_REFUSALS, Forwarder, Signer
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


def refused_alerts(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e["v"] for e in events if e["type"] == "gateway.batch_refused"]  # type: ignore[misc]


class Reported(list[dict[str, object]]):
    """The forwarder's `on_refused` reports, with when each came."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    async def __call__(self, info: dict[str, object]) -> None:
        self.at.append(time.monotonic())
        self.append(info)


def refusal_forwarder(outbox: Outbox, broker: Mosquitto, key: Ed25519PrivateKey,
                      reported: Reported, batch_max_events: int = 10) -> Forwarder:
    return Forwarder(outbox, [uplink(broker)], Signer(key, GW, time.time),
                     batch_max_events=batch_max_events, ack_timeout_s=0.3,
                     on_refused=reported)


async def test_a_refused_key_is_held_with_backoff_and_raised_once(
    broker: Mosquitto, platform: Receiver, key: Ed25519PrivateKey, outbox: Outbox
) -> None:
    """Signed by a key the platform does not know: after MAX_REFUSALS refusals of the same
    bytes the batch is held (not parked, not re-chained: a registration matter), sent again only
    after a growing wait, and raised once (alert + on_refused). Once the key is registered,
    everything held arrives, the alert included.

    Mutation: a held batch re-sent at the ack timeout (no backoff) makes the gap between the
    refusals before and after the hold shorter than the hold: this test fails."""
    stranger = Ed25519PrivateKey.generate()
    await outbox.append_many([ev(i) for i in range(50)])
    reported = Reported()
    fw = refusal_forwarder(outbox, broker, stranger, reported, batch_max_events=100)
    refused_again: list[float] = []

    def refused_after_hold() -> bool:
        if reported and fw.stats.rejections.get("unknown-key", 0) > MAX_REFUSALS:
            refused_again.append(time.monotonic())
        return bool(refused_again)

    task = asyncio.create_task(fw.run())
    try:
        await until(refused_after_hold, 30, "refused again after the hold")
        # held 2 x ack timeout (0.6 s); without the hold it is sent again after 0.3 s
        assert refused_again[0] - reported.at[0] >= 0.5
        assert [r["action"] for r in reported] == ["held"]
        platform.register(GW, stranger.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        await until(lambda: len(platform.events(GW)) >= 51, 60, "held events delivered")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sorted(platform.delivered_ids(GW)) == list(range(1, 52))
    assert [a["action"] for a in refused_alerts(platform.events(GW))] == ["held"]
    assert len(reported) == 1 and fw.stats.chain_restarts == 0


async def test_a_fork_restarts_the_chain_in_a_new_epoch(
    broker: Mosquitto, platform: Receiver, key: Ed25519PrivateKey, outbox: Outbox
) -> None:
    """The platform already holds other bytes at this store's first position (a store restored
    from an old copy, a cloned card): after MAX_REFUSALS `fork`s the chain starts again in a new
    epoch with every unacknowledged event; the refused bytes are kept for an operator; the
    platform records the new chain and where the old one ended; every event arrives once.

    Mutation: `RECHAIN_REASONS` empty (a fork parked like a malformed batch) loses the events
    of the refused batch from delivery: this test fails; without the restart the fork repeats
    for ever (the wait for the events times out)."""
    await outbox.append_many([ev(i) for i in range(30)])
    epoch = bytes.fromhex((await outbox.stats()).epoch)
    other = Signer(key, GW, time.time).build(1, ZERO_HASH, [], epoch)
    assert platform.handle_batch(other).ok
    reported = Reported()
    fw = refusal_forwarder(outbox, broker, key, reported)
    task = asyncio.create_task(fw.run())
    try:
        await until(lambda: len(platform.events(GW)) >= 31, 30,
                    "every event and the alert in the new chain")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [r["action"] for r in reported] == ["new_chain"] and fw.stats.chain_restarts == 1
    epochs = platform.epochs(GW)
    assert [e["epoch"] for e in epochs] == [epoch.hex(), reported[0]["new_epoch"]]
    assert epochs[1]["prev"] == {"epoch": epoch.hex(), "seq": 1,
                                 "hash": batch_hash(other).hex(), "alarm_seq": None,
                                 "alarm_hash": None}
    assert sorted(platform.delivered_ids(GW)) == list(range(1, 32))  # 30 + the alert
    [alert] = refused_alerts(platform.events(GW))
    assert (alert["err"], alert["action"], alert["seq"]) == ("fork", "new_chain", 1)
    st = await outbox.stats()
    assert st.refused_batches == 1 and st.epoch == reported[0]["new_epoch"]


async def test_a_malformed_batch_is_parked_and_the_rest_goes_on(
    broker: Mosquitto, platform: Receiver, key: Ed25519PrivateKey, outbox: Outbox
) -> None:
    """A batch the platform can never accept (`malformed`: here an event whose value is a bare
    array) is parked after MAX_REFUSALS refusals: kept for an operator with its events, named in
    a `gateway.batch_refused` alert, and the events behind it go on in a new epoch.

    Mutation: `MAX_REFUSALS` never reached (e.g. the count reset at every refusal, or a limit
    of 3,000): the poison batch is sent again and again. The events behind it make each round
    quick (the platform answers their batches `gap` at once, and a gap resends everything), so
    they may still get through once some later bound parks the poison: what fails is the count
    of refusals, which must be exactly MAX_REFUSALS."""
    [poison] = await outbox.append_many([Event(src="s", type="t", v=[1, 2],  # type: ignore[arg-type]
                                               t=time.time())])
    reported = Reported()
    fw = refusal_forwarder(outbox, broker, key, reported)
    task = asyncio.create_task(fw.run())
    try:
        await until(lambda: fw.stats.rejections.get("malformed", 0) >= 1, 20, "first refusal")
        good = await outbox.append_many([ev(i) for i in range(25)])
        await until(lambda: {e["id"] for e in platform.events(GW)} >= set(good), 30,
                    "the events behind the poison delivered")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [r["action"] for r in reported] == ["parked"]
    # parked at the MAX_REFUSALS-th refusal; a copy answered later no longer matches a batch
    assert fw.stats.rejections["malformed"] == MAX_REFUSALS, fw.stats.rejections
    [alert] = refused_alerts(platform.events(GW))
    assert (alert["err"], alert["count"], alert["ids"]) == ("malformed", 1, [[poison, poison]])
    assert poison not in platform.delivered_ids(GW)
    st = await outbox.stats()
    assert st.refused_batches == 1
