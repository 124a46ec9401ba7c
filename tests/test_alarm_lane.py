"""The alarm lane in the outbox (agent.outbox.batches, lanes; docs/PROTOCOL.md 3.2): alarms
signed at commit into a hash chain of their own, apart from the bulk lane's, and the promises
that must hold across two chains: each lane's seq and prev, the claim order, acks that name one
lane's batch, pending batches after a reopen, and a chain restart that waits for the other
lane and then starts both again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import protocol
from agent.core.types import Event
from agent.outbox import DirectClaim, Outbox
from agent.protocol import ALARM_LANE, BULK_LANE, ZERO_HASH
from agent.runtime.forwarder import Forwarder, Signer
from agent.uplink.mqtt import MqttUplink, MqttUplinkConfig
from branchsim.platform.mqtt_server import MqttPlatformServer
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import until
from tests.support.broker import Mosquitto

WORKER = Path(__file__).parent / "support" / "outbox_worker.py"
sys.path.insert(0, str(WORKER.parent))
from outbox_worker import build  # noqa: E402 - the worker is a script, imported for its signer

ALARM_OFFER = DirectClaim(100, 1 << 20, build, 0.0, ALARM_LANE)


def ev(v: object = 1.0, prio: int = 2) -> Event:
    return Event(src="s", type="t", v=v, t=time.time(), prio=prio)  # type: ignore[arg-type]


def table(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


async def test_alarms_get_a_chain_of_their_own(tmp_path: Path) -> None:
    """Offered the alarm lane, a group of alarms only is signed into the lane's next batch
    (seq 1 with a zero prev, then seq 2 chained to it) while the bulk lane has its own seq 1;
    telemetry and mixed groups stay on the bulk lane; the batches decode with their lane."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    ob.offer_alarm_lane(ALARM_OFFER)
    telemetry = await ob.append_many([ev(1.0), ev(2.0)])
    a1 = await ob.append_many([ev(True, prio=0)])
    a2 = await ob.append_many([ev(False, prio=0), ev(True, prio=0)])
    mixed = await ob.append_many([ev(True, prio=0), ev(3.0)])
    l1, l2 = ob.take_alarm_batches()
    assert ob.take_alarm_batches() == []
    assert (l1.lane, l1.seq, l2.lane, l2.seq) == (ALARM_LANE, 1, ALARM_LANE, 2)
    d1, d2 = (protocol.decode_batch(b.data)[0] for b in (l1, l2))
    assert (d1.lane, d1.prev, d2.lane, d2.prev) == (ALARM_LANE, ZERO_HASH, ALARM_LANE, l1.hash)
    assert [e["id"] for e in d1.events] == a1 and [e["id"] for e in d2.events] == a2
    bulk = await ob.claim_batch(100, 1 << 20, build)
    assert bulk is not None and (bulk.lane, bulk.seq) == (BULK_LANE, 1)
    db_bulk = protocol.decode_batch(bulk.data)[0]
    assert db_bulk.lane == BULK_LANE and db_bulk.prev == ZERO_HASH
    # the mixed group's alarm goes first (priority order), the telemetry after
    assert [e["id"] for e in db_bulk.events] == [mixed[0], *telemetry, mixed[1]]
    st = await ob.stats()
    assert (st.next_seq, st.alarm_next_seq, st.in_flight_batches) == (2, 3, 3)
    await ob.close()


async def test_an_older_unclaimed_alarm_keeps_the_lane_in_order(tmp_path: Path) -> None:
    """An alarm committed while the lane was not offered is a row, claimed on the bulk lane;
    while it waits unclaimed, a later alarm does not pass it on the alarm lane."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    first = await ob.append_many([ev(True, prio=0)])
    ob.offer_alarm_lane(ALARM_OFFER)
    second = await ob.append_many([ev(False, prio=0)])
    assert ob.take_alarm_batches() == []
    bulk = await ob.claim_batch(100, 1 << 20, build)
    assert bulk is not None
    assert [e["id"] for e in protocol.decode_batch(bulk.data)[0].events] == [*first, *second]
    third = await ob.append_many([ev(True, prio=0)])
    [lane] = ob.take_alarm_batches()
    assert [e["id"] for e in protocol.decode_batch(lane.data)[0].events] == third
    await ob.close()


async def test_an_ack_names_one_lane(tmp_path: Path) -> None:
    """Both lanes have a batch 1: an ack of one leaves the other; after a reopen the pending
    batches come back with their lane, the alarm lane's first, byte for byte."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    ob.offer_alarm_lane(ALARM_OFFER)
    await ob.append_many([ev(True, prio=0)])
    await ob.append_many([ev(1.0)])
    [alarm] = ob.take_alarm_batches()
    bulk = await ob.claim_batch(100, 1 << 20, build)
    assert bulk is not None and bulk.seq == alarm.seq == 1
    assert not await ob.ack_batch(1, alarm.hash)  # the bulk lane's batch 1 has other bytes
    assert not await ob.ack_batch(1, bulk.hash, ALARM_LANE)
    await ob.close()

    ob = await Outbox.open(db)
    assert await ob.pending_batches() == [alarm, bulk]
    assert await ob.ack_batch(1, alarm.hash, ALARM_LANE)
    assert await ob.pending_batches() == [bulk]
    st = await ob.stats()
    assert st.depth == {2: 1} and st.last_acked_seq == 0  # the bulk lane's figure
    await ob.close()
    assert [int(k) for (k,) in table(db, "SELECT seq FROM batches")] == [1]


async def test_a_restart_waits_for_the_other_lane_then_starts_both(tmp_path: Path) -> None:
    """A bulk batch refused for good does not start a new chain while an alarm lane batch
    waits for its answer (the platform may have accepted it: its alarms must not go out
    twice); once that batch is refused too, both lanes start again at seq 1 in a new epoch,
    and the alarm lane batch's events are rows again with byte-identical bodies."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    ob.offer_alarm_lane(ALARM_OFFER)
    await ob.append_many([ev(1.0)])
    alarms = await ob.append_many([ev(True, prio=0)])
    [alarm] = ob.take_alarm_batches()
    bulk = await ob.claim_batch(100, 1 << 20, build)
    assert bulk is not None
    old_epoch = (await ob.stats()).epoch
    assert await ob.restart_chain(bulk, "fork", park=False) is None
    assert (await ob.stats()).epoch == old_epoch
    info = await ob.restart_chain(bulk, "fork", park=False, refused_too=frozenset({alarm.hash}))
    assert info is not None and info["lane"] == BULK_LANE
    st = await ob.stats()
    assert st.epoch != old_epoch and (st.next_seq, st.alarm_next_seq) == (1, 1)
    assert table(db, "SELECT COUNT(*) FROM batches") == [(0,)]
    body = dict(table(db, "SELECT id, body FROM events"))
    [decoded] = protocol.decode_batch(alarm.data)[0].events
    assert bytes(body[alarms[0]]) == protocol.encode_event(**decoded)  # type: ignore[call-overload]
    # The new epoch's alarm lane starts again at seq 1 with a zero prev
    ob.offer_alarm_lane(ALARM_OFFER)
    await ob.claim_batch(100, 1 << 20, build)  # the old rows (the alarm first), bulk seq 1
    await ob.append_many([ev(True, prio=0)])
    [again] = ob.take_alarm_batches()
    d = protocol.decode_batch(again.data)[0]
    assert (d.seq, d.prev, d.epoch.hex()) == (1, ZERO_HASH, st.epoch)
    await ob.close()


async def test_an_alarm_lane_batch_refused_for_good_is_restarted_from_its_lane(
        tmp_path: Path) -> None:
    """The refused batch must be the oldest of its own lane: the alarm lane's batch 2 waits
    for batch 1; with batch 1 refused too, the restart names the alarm lane and its ids."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    ob.offer_alarm_lane(ALARM_OFFER)
    first = await ob.append_many([ev(True, prio=0)])
    await ob.append_many([ev(False, prio=0)])
    b1, b2 = ob.take_alarm_batches()
    assert await ob.restart_chain(b2, "malformed", park=False) is None
    info = await ob.restart_chain(b1, "malformed", park=True)
    assert info is not None and (info["lane"], info["seq"]) == (ALARM_LANE, 1)
    assert info["ids"] == [[first[0], first[0]]]
    refused = table(db, "SELECT seq, lane, ids FROM refused")
    assert refused == [(1, ALARM_LANE, json.dumps([[first[0], first[0]]]))]
    await ob.close()


# --- the forwarder's alarm lane, against a real mosquitto and the reference platform --------

GW = "gw-lane"


def uplink(broker: Mosquitto) -> MqttUplink:
    return MqttUplink(MqttUplinkConfig(host="127.0.0.1", port=broker.port, insecure=True,
                                       backoff_base=0.05, backoff_max=0.5), GW)


@contextlib.contextmanager
def serving(rx: Receiver, broker: Mosquitto, key: Ed25519PrivateKey
            ) -> Iterator[MqttPlatformServer]:
    rx.register(GW, key.public_key().public_bytes(Encoding.PEM,
                                                   PublicFormat.SubjectPublicKeyInfo))
    server = MqttPlatformServer(rx, "127.0.0.1", broker.port, client_id="platform-lane")
    server.start()
    try:
        assert server.ready.wait(10), "platform never subscribed"
        yield server
    finally:
        server.stop()
        rx.close()


@contextlib.asynccontextmanager
async def forwarding(fw: Forwarder) -> AsyncIterator[Forwarder]:
    task = asyncio.create_task(fw.run())
    try:
        yield fw
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def once_each(rx: Receiver) -> list[int]:
    """Every id delivered, counted at the wire (the stored batches), each exactly once."""
    wire = Counter(rx.delivered_ids(GW))
    assert all(n == 1 for n in wire.values()), {i: n for i, n in wire.items() if n > 1}
    return sorted(wire)


async def test_an_alarm_passes_a_backlog_on_its_own_lane(tmp_path: Path,
                                                         broker: Mosquitto) -> None:
    """While a backlog drains at a limited byte rate, an alarm goes out on the alarm lane (its
    chain's seq 1, on the alarm topic) and is stored long before the backlog is done; every
    event reaches the platform exactly once, both lanes' chains unbroken."""
    key = Ed25519PrivateKey.generate()
    with serving(Receiver(tmp_path / "platform.db"), broker, key) as server:
        rx = server.receiver
        ob = await Outbox.open(tmp_path / "gw" / "outbox.db", commit_interval=0.001)
        await ob.append_many([ev(float(i)) for i in range(2000)])
        fw = Forwarder(ob, [uplink(broker)], Signer(key, GW, time.time), batch_max_events=100,
                       window=2, drain_rate_bytes_per_s=30_000)
        async with forwarding(fw):
            await until(lambda: len(rx.events(GW)) >= 300, 30, "backlog draining")
            await until(lambda: fw.stats.alarm_lane, 5, "the alarm lane offered")
            [alarm_id] = await ob.append_many([ev(True, prio=0)])
            await until(lambda: any(e["id"] == alarm_id for e in rx.events(GW)), 10,
                        "alarm delivered")
            events = rx.events(GW)
            alarm = next(e for e in events if e["id"] == alarm_id)
            assert (alarm["lane"], alarm["seq"]) == (ALARM_LANE, 1)
            assert len(events) < 2000, "the alarm must not wait for the backlog"
            assert server.handled_on["alarm"] == 1, "on the alarm topic"
            await until(lambda: fw.stats.events_acked == 2001, 60, "backlog done")
        await ob.close()
        assert once_each(rx) == list(range(1, 2002))
        assert rx.chain_head(GW, ALARM_LANE)[0] == rx.batch_count(GW, ALARM_LANE) == 1
        assert rx.chain_head(GW)[0] == rx.batch_count(GW, BULK_LANE)
        assert fw.stats.alarm_batches_acked == 1 and rx.counters() == {}


async def test_a_platform_without_lanes_gets_its_alarms_on_the_bulk_lane(
        tmp_path: Path, broker: Mosquitto) -> None:
    """A platform from before lanes reads no alarm topic and refuses the lane's batches as
    malformed. The gateway notices the silence (the bulk lane is answered), sends the batch on
    the bulk topic, and at the final refusal turns the lane off and starts a new chain with the
    alarm on the bulk lane: it arrives exactly once, and later alarms go on the bulk lane."""
    key = Ed25519PrivateKey.generate()
    reported: list[dict[str, Any]] = []

    async def on_refused(info: dict[str, Any]) -> None:
        reported.append(info)

    with serving(Receiver(tmp_path / "platform.db", lanes=False), broker, key) as server:
        rx = server.receiver
        ob = await Outbox.open(tmp_path / "gw" / "outbox.db", commit_interval=0.001)
        fw = Forwarder(ob, [uplink(broker)], Signer(key, GW, time.time), ack_timeout_s=0.3,
                       on_refused=on_refused)
        async with forwarding(fw):
            await until(lambda: fw.stats.alarm_lane, 5, "the alarm lane offered")
            [alarm_id] = await ob.append_many([ev(True, prio=0)])
            [telemetry] = await ob.append_many([ev(1.0)])  # the bulk lane is answered
            await until(lambda: any(e["id"] == telemetry for e in rx.events(GW)), 10,
                        "telemetry delivered")
            await until(lambda: any(e["id"] == alarm_id for e in rx.events(GW)), 20,
                        "alarm delivered after all")
            assert not fw.alarm_lane and not fw.stats.alarm_lane
            [later] = await ob.append_many([ev(False, prio=0)])
            await until(lambda: any(e["id"] == later for e in rx.events(GW)), 10,
                        "a later alarm delivered")
            await until(lambda: fw.stats.events_acked == len(rx.events(GW)) == 4, 10,
                        "the telemetry, both alarms and the alert acknowledged")
        assert (await ob.stats()).depth == {}
        await ob.close()
        events = {e["id"]: e for e in rx.events(GW)}
        assert events[alarm_id]["lane"] == events[later]["lane"] == BULK_LANE
        assert [(r["lane"], r["err"], r["action"]) for r in reported] == [
            (ALARM_LANE, "malformed", "new_chain")]
        assert len(rx.epochs(GW)) == 2, "the alarm went again in a new chain"
        assert once_each(rx) == sorted(events)
        assert server.handled_on["alarm"] == 0
        assert rx.counters() == {(GW, "malformed"): 3}
