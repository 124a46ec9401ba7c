"""Reference platform, lanes (docs/PROTOCOL.md 3.2): one hash chain per lane in an epoch, an
alarm's batch checked and stored without waiting for the bulk batches ahead of it, at the
Receiver (its lock) and over MQTT (its own topic and connection). Real signed batches, real
SQLite files, a real mosquitto."""

from __future__ import annotations

import copy
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import (
    ALARM_LANE,
    BULK_LANE,
    LANES,
    ZERO_HASH,
    Ack,
    batch_hash,
    build_batch,
    decode_ack,
    decode_batch,
    encode_event,
    kid_for,
)
from branchsim.platform.mqtt_server import MqttPlatformServer
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import wait_until
from tests.support.broker import Mosquitto
from tests.test_platform import GW, pem

if TYPE_CHECKING:
    from tests.support.postgres import Store

# The rule tests run against both stores (`rx` is parametrized); the store file's, the lock's
# and the MQTT server's tests are about the SQLite Receiver.

PREFIX = "bank/v1"
EPOCH_A, EPOCH_B, EPOCH_C = b"\x0a" * 16, b"\x0b" * 16, b"\x0c" * 16


class Lanes:
    """Builds a gateway's two chains the way the agent does: a seq and a prev per lane in the
    epoch, one id sequence for both."""

    def __init__(self, gw: str = GW, epoch: bytes = EPOCH_A) -> None:
        self.gw = gw
        self.key = Ed25519PrivateKey.generate()
        self.lose_state(epoch)

    def lose_state(self, epoch: bytes) -> None:
        """A gateway that lost its state: same key, a new epoch, both lanes from seq 1, ids
        from 1 again."""
        self.epoch, self.next_id = epoch, 1
        self.head = dict.fromkeys(LANES, (0, ZERO_HASH))

    def batch(self, lane: int = BULK_LANE, n: int = 2, *, seq: int | None = None,
              prev: bytes | None = None, prio: int | None = None, epoch: bytes | None = None,
              compress: bool = False) -> bytes:
        last_seq, last_hash = self.head[lane]
        ids = range(self.next_id, self.next_id + n)
        self.next_id += n
        alarm = lane == ALARM_LANE
        return build_batch(
            key=self.key, kid=kid_for(self.key.public_key()), gw=self.gw,
            seq=last_seq + 1 if seq is None else seq,
            prev=last_hash if prev is None else prev, created=1767225600.0,
            encoded_events=[encode_event(
                id=i, t=1767225600.0 + i, tq=0, src="gpio.vault" if alarm else "synthetic.load",
                type="contact" if alarm else "counter", v=float(i),
                prio=(0 if alarm else 2) if prio is None else prio) for i in ids],
            epoch=self.epoch if epoch is None else epoch, compress=compress, lane=lane,
        )

    def accepted(self, data: bytes) -> None:
        batch = decode_batch(data)[0]
        self.head[batch.lane] = (batch.seq, batch.hash)

    def send(self, rx: Store, data: bytes) -> str:
        ack = rx.handle_batch(data, topic_gw=self.gw)
        assert ack.h == batch_hash(data)
        if ack.ok:
            self.accepted(data)
            return "ok"
        assert ack.err is not None
        return ack.err


@pytest.fixture(params=["sqlite", "postgresql"])
def rx(request: pytest.FixtureRequest, make_store: Callable[..., Store]) -> Store:
    return make_store(request.param)


@pytest.fixture
def g(rx: Store) -> Lanes:
    lanes = Lanes()
    rx.register(GW, pem(lanes.key))
    return lanes


def test_alarm_lane_starts_at_seq_1_beside_a_bulk_lane_at_seq_5(rx: Store, g: Lanes) -> None:
    """With the bulk lane at seq 5 and nothing of it missing, the alarm lane's seq 1 (zero prev)
    is accepted and each lane has its own head; ids are shared, so every id is delivered once
    over the union of the lanes."""
    for _ in range(5):
        assert g.send(rx, g.batch(BULK_LANE, 3)) == "ok"
    assert g.send(rx, g.batch(ALARM_LANE, 1)) == "ok"
    assert g.send(rx, g.batch(ALARM_LANE, 1)) == "ok"
    assert g.send(rx, g.batch(BULK_LANE, 3)) == "ok"
    assert rx.chain_head(GW, ALARM_LANE) == g.head[ALARM_LANE]
    assert rx.chain_head(GW, ALARM_LANE)[0] == 2
    assert rx.chain_head(GW) == rx.chain_head(GW, BULK_LANE) == g.head[BULK_LANE]
    assert rx.chain_head(GW)[0] == 6
    assert (rx.batch_count(GW, BULK_LANE), rx.batch_count(GW, ALARM_LANE),
            rx.batch_count(GW)) == (6, 2, 8)
    assert sorted(Counter(rx.delivered_ids(GW)).items()) == [(i, 1) for i in range(1, 21)]
    by_id = {e["id"]: e for e in rx.events(GW)}
    assert (by_id[16]["lane"], by_id[16]["seq"], by_id[16]["src"]) == (ALARM_LANE, 1, "gpio.vault")
    assert (by_id[18]["lane"], by_id[18]["seq"]) == (BULK_LANE, 6)
    assert rx.counters() == {}


def test_gap_fork_replay_are_per_lane(rx: Store, g: Lanes) -> None:
    """Each lane is checked against its own head: a gap, a fork (other bytes at a seq, a prev
    that is not the lane's head, the other lane's head included) and a replay in one lane leave
    the other lane alone; a replay is told apart from a fork by lane."""
    bulk1 = g.batch(BULK_LANE)
    assert g.send(rx, bulk1) == "ok"
    assert g.send(rx, g.batch(BULK_LANE)) == "ok"
    alarm1 = g.batch(ALARM_LANE, 1)
    assert g.send(rx, alarm1) == "ok"
    # the same (lane, seq) exists in both lanes: each lane's stored bytes are its replay
    assert g.send(rx, alarm1) == "replay"
    assert g.send(rx, bulk1) == "replay"
    assert g.send(rx, g.batch(ALARM_LANE, 1, seq=3)) == "gap"
    assert g.send(rx, g.batch(ALARM_LANE, 1, seq=1, prev=ZERO_HASH)) == "fork"
    assert g.send(rx, g.batch(ALARM_LANE, 1, prev=g.head[BULK_LANE][1])) == "fork"
    assert g.send(rx, g.batch(BULK_LANE, 1, prev=g.head[ALARM_LANE][1])) == "fork"
    assert g.send(rx, g.batch(BULK_LANE, 1, seq=4)) == "gap"
    assert rx.chain_head(GW, ALARM_LANE) == (1, batch_hash(alarm1))
    assert rx.chain_head(GW, BULK_LANE)[0] == 2
    assert rx.counters() == {(GW, "replay"): 2, (GW, "gap"): 2, (GW, "fork"): 3}
    # and both lanes go on from their heads
    assert g.send(rx, g.batch(ALARM_LANE, 1)) == "ok"
    assert g.send(rx, g.batch(BULK_LANE)) == "ok"
    assert (rx.chain_head(GW, BULK_LANE)[0], rx.chain_head(GW, ALARM_LANE)[0]) == (3, 2)


def test_an_alarm_lane_batch_holding_a_non_alarm_event_is_malformed(rx: Store,
                                                                    g: Lanes) -> None:
    """The alarm lane holds only ALARM events: one of priority 1 makes the batch `malformed`;
    nothing is stored, the rejection counted."""
    assert g.send(rx, g.batch(ALARM_LANE, 2, prio=1)) == "malformed"
    assert rx.batch_count(GW) == 0 and rx.events(GW) == []
    assert rx.chain_head(GW, ALARM_LANE) == (0, ZERO_HASH)
    assert rx.counters() == {(GW, "malformed"): 1}


def test_a_new_epoch_started_by_an_alarm_closes_the_old_epoch_for_both_lanes(
        rx: Store, g: Lanes) -> None:
    """An alarm-lane batch of an unseen epoch starts the new chain: the old epoch is closed in
    both lanes (its stored bytes a replay, anything new a fork), the bulk lane starts again at
    seq 1, and `epochs` records where each lane of the replaced chain ended."""
    old_bulk = []
    for _ in range(3):
        old_bulk.append(g.batch(BULK_LANE))
        assert g.send(rx, old_bulk[-1]) == "ok"
    old_alarm = g.batch(ALARM_LANE, 1)
    assert g.send(rx, old_alarm) == "ok"
    old = copy.copy(g)  # the old chain's state, as a cloned card would still have it

    g.lose_state(EPOCH_B)
    assert g.send(rx, g.batch(ALARM_LANE, 1, seq=2)) == "gap"  # a new epoch starts at seq 1
    new_alarm = g.batch(ALARM_LANE, 1)
    assert g.send(rx, new_alarm) == "ok"
    assert rx.chain_head(GW, BULK_LANE) == (0, ZERO_HASH)  # no bulk batch in the new epoch yet
    assert rx.chain_head(GW, ALARM_LANE) == (1, batch_hash(new_alarm))
    assert [old.send(rx, d) for d in (old_bulk[1], old_alarm)] == ["replay", "replay"]
    assert old.send(rx, old.batch(BULK_LANE)) == "fork"
    assert old.send(rx, old.batch(ALARM_LANE, 1)) == "fork"
    new_bulk = g.batch(BULK_LANE)
    assert g.send(rx, new_bulk) == "ok"
    assert rx.chain_head(GW, BULK_LANE) == (1, batch_hash(new_bulk))

    g.lose_state(EPOCH_C)
    assert g.send(rx, g.batch(BULK_LANE)) == "ok"
    epochs = rx.epochs(GW)
    assert [e["epoch"] for e in epochs] == [EPOCH_A.hex(), EPOCH_B.hex(), EPOCH_C.hex()]
    assert epochs[0]["prev"] is None
    assert epochs[1]["prev"] == {
        "epoch": EPOCH_A.hex(), "seq": 3, "hash": batch_hash(old_bulk[-1]).hex(),
        "alarm_seq": 1, "alarm_hash": batch_hash(old_alarm).hex()}
    assert epochs[2]["prev"] == {
        "epoch": EPOCH_B.hex(), "seq": 1, "hash": batch_hash(new_bulk).hex(),
        "alarm_seq": 1, "alarm_hash": batch_hash(new_alarm).hex()}


def test_epochs_record_none_for_a_lane_without_batches(rx: Store, g: Lanes) -> None:
    """A replaced chain whose bulk lane had no batch (a gateway that sent one alarm, then lost
    its state): `prev` names the alarm lane's end and None for the bulk lane's."""
    alarm = g.batch(ALARM_LANE, 1)
    assert g.send(rx, alarm) == "ok"
    g.lose_state(EPOCH_B)
    assert g.send(rx, g.batch(BULK_LANE)) == "ok"
    assert rx.epochs(GW)[1]["prev"] == {"epoch": EPOCH_A.hex(), "seq": None, "hash": None,
                                        "alarm_seq": 1, "alarm_hash": batch_hash(alarm).hex()}


def test_a_store_made_without_lanes_is_refused(tmp_path: Path) -> None:
    """A store file of a platform without lanes (batches keyed by epoch and seq only) is not
    extended: opening it says so and what to do."""
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE batches (gw TEXT NOT NULL, epoch BLOB NOT NULL, seq INTEGER NOT "
                  "NULL, hash BLOB NOT NULL, received_at REAL NOT NULL, raw BLOB NOT NULL, "
                  "PRIMARY KEY (gw, epoch, seq))")
    c.close()
    with pytest.raises(RuntimeError, match=r"without lanes.*serve from a new store file"):
        Receiver(db)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_a_waiting_alarm_goes_before_waiting_bulk_batches(tmp_path: Path, compress: bool) -> None:
    """While a bulk batch's transaction holds the receiver (here: blocked on the store's write
    lock, held by another receiver of the same file), four bulk batches wait, then an alarm;
    the alarm is stored next, before every bulk batch that waited longer (its payload plain or
    zstd: the lane is read from either)."""
    db = tmp_path / "platform.db"
    rx = Receiver(db)
    gws = [Lanes(f"gw-{i}") for i in range(5)]
    for gw in gws:
        rx.register(gw.gw, pem(gw.key))
    other = sqlite3.connect(db, isolation_level=None)
    try:
        with ThreadPoolExecutor(6) as pool:
            other.execute("BEGIN IMMEDIATE")  # another receiver on the file, in a transaction
            try:
                bulk = [pool.submit(rx.handle_batch, gw.batch(BULK_LANE, 500), gw.gw)
                        for gw in gws]
                # one of them holds the receiver, waiting for the write lock; four wait for it
                wait_until(lambda: sum(rx.waiting().values()) == 4, 10, "four handlers waiting")
                alarm = pool.submit(rx.handle_batch,
                                    gws[0].batch(ALARM_LANE, 1, compress=compress), gws[0].gw)
                wait_until(lambda: sum(rx.waiting().values()) == 5, 10, "the alarm waiting too")
                assert rx.waiting() == {BULK_LANE: 4, ALARM_LANE: 1}
            finally:
                other.rollback()
            acks: list[Ack] = [f.result(30) for f in [*bulk, alarm]]
        assert all(a.ok for a in acks), acks
        order = [int(lane) for (lane,) in other.execute(
            "SELECT lane FROM batches ORDER BY rowid")]  # rowid: the order they were stored
        assert order == [BULK_LANE, ALARM_LANE, BULK_LANE, BULK_LANE, BULK_LANE, BULK_LANE]
    finally:
        other.close()
        rx.close()


def test_bulk_handlers_stand_aside_while_an_alarm_is_handled(tmp_path: Path) -> None:
    """While an alarm is being handled, a bulk batch's handler waits before decoding and before
    the store (`alarms_first`, its bound set out of the way here), and goes on once the alarm
    is done. A batch that came where alarms come (`urgent`) but whose payload says bulk keeps
    no precedence: the bulk handler waiting on it goes on to the store's lock while it is still
    being handled."""
    rx = Receiver(tmp_path / "platform.db")
    rx.alarms_first.yield_max_s = 60.0
    g = Lanes()
    rx.register(GW, pem(g.key))
    other = sqlite3.connect(tmp_path / "platform.db", isolation_level=None)
    try:
        with ThreadPoolExecutor(2) as pool:
            turn = rx.alarms_first.turn()  # an alarm's handler at work
            turn.start()
            first = g.batch(BULK_LANE, 500)
            bulk = pool.submit(rx.handle_batch, first, GW)
            wait_until(lambda: rx.alarms_first.yields == 1, 10, "the bulk handler aside")
            assert rx.batch_count(GW) == 0 and not bulk.done()
            turn.stop()
            assert bulk.result(30).ok
            g.accepted(first)
            assert rx.batch_count(GW, BULK_LANE) == 1

            # An urgent handler holding the receiver (blocked on the write lock of another
            # receiver of the file) with a bulk payload: the next bulk handler does not stand
            # aside for it but waits for the lock.
            a = g.batch(BULK_LANE, 2)
            other.execute("BEGIN IMMEDIATE")
            try:
                early = pool.submit(rx.handle_batch, a, GW, urgent=True)
                g.accepted(a)
                b = g.batch(BULK_LANE, 2)
                late = pool.submit(rx.handle_batch, b, GW)
                # (it may stand aside while the urgent one decodes, not after)
                wait_until(lambda: rx.waiting()[BULK_LANE] == 1, 10,
                           "the bulk handler waiting for the lock, not aside")
                assert not early.done()
            finally:
                other.rollback()
            assert early.result(30).ok and late.result(30).ok
        assert rx.batch_count(GW, BULK_LANE) == 3
    finally:
        other.close()
        rx.close()


class AckListener:
    """A paho client subscribed to every gateway's acks; records (topic, ack) in arrival order."""

    def __init__(self, port: int) -> None:
        self.acks: list[tuple[str, Ack]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/+/ack", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.acks.append((msg.topic, decode_ack(bytes(msg.payload))))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> list[tuple[str, Ack]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.acks) >= n, timeout), \
                f"{len(self.acks)} of {n} acks"
            return list(self.acks)

    def publish(self, topic: str, data: bytes) -> None:
        self.client.publish(topic, data, qos=1).wait_for_publish(30)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_over_mqtt_an_alarm_is_acked_before_the_bulk_backlog_ahead_of_it(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """100 bulk batches of 500 events handed to the broker, then one alarm-lane batch on the
    alarm topic: the platform takes it on its own connection and acks it before the last bulk
    ack (it did not queue behind them). Both topics bind the topic's gateway; a bulk-lane batch
    on the alarm topic is handled by its lane."""
    rx = Receiver(tmp_path / "platform.db")
    g = Lanes()
    rx.register(GW, pem(g.key))
    server = MqttPlatformServer(rx, "127.0.0.1", mosquitto.port, client_id="lanes-test")
    listener = AckListener(mosquitto.port)
    try:
        server.start()
        assert server.ready.wait(10) and listener.subscribed.wait(10)
        misfiled = g.batch(ALARM_LANE, 1)
        listener.publish(f"{PREFIX}/gw-other/alarm", misfiled)
        [(topic, ack)] = listener.wait_for(1, 30)
        assert (topic, ack.ok, ack.err) == (f"{PREFIX}/gw-other/ack", False, "wrong-gateway")

        bulk = []
        for _ in range(100):
            bulk.append(g.batch(BULK_LANE, 500))
            g.accepted(bulk[-1])
        alarm = g.batch(ALARM_LANE, 1)
        infos = [listener.client.publish(f"{PREFIX}/{GW}/batch", data, qos=1) for data in bulk]
        for info in infos:
            info.wait_for_publish(30)  # the whole backlog is in the broker
        listener.publish(f"{PREFIX}/{GW}/alarm", alarm)
        acks = listener.wait_for(102, 120)[1:]
        assert all(a.ok and t == f"{PREFIX}/{GW}/ack" for t, a in acks), acks
        order = [a.h for _, a in acks]
        assert sorted(order) == sorted(batch_hash(d) for d in [*bulk, alarm])
        alarm_at = order.index(batch_hash(alarm))
        assert alarm_at < order.index(batch_hash(bulk[-1])), \
            f"the alarm was acked after all {alarm_at} bulk batches ahead of it"

        onward = g.batch(BULK_LANE, 2)  # a bulk-lane batch on the alarm topic
        listener.publish(f"{PREFIX}/{GW}/alarm", onward)
        assert listener.wait_for(103, 30)[-1][1].ok
        assert rx.chain_head(GW, BULK_LANE) == (101, batch_hash(onward))
        assert rx.chain_head(GW, ALARM_LANE) == (1, batch_hash(alarm))
    finally:
        listener.stop()
        server.stop()
        rx.close()
