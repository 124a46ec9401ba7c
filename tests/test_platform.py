"""Reference platform: verification, gateway binding, hash chain, dedup, counters, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import ZERO_HASH, batch_hash, build_batch, encode_event, kid_for
from branchsim.platform.receiver import Receiver

if TYPE_CHECKING:
    from tests.support.postgres import Store

# The rule tests run against both stores (`receiver` is parametrized); the CLI's and the store
# file's tests are about SQLite.
GW = "gw-a"


def pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


class Gateway:
    """Builds a chain of batches the way the agent does."""

    def __init__(self, gw: str = GW, key: Ed25519PrivateKey | None = None) -> None:
        self.gw = gw
        self.key = key or Ed25519PrivateKey.generate()
        self.seq = 0
        self.prev = ZERO_HASH
        self.next_id = 1
        self.epoch = b""

    def lose_state(self, epoch: bytes) -> None:
        """What a gateway restored onto an empty state directory does: same key, a new chain
        epoch from seq 1, ids from 1 again."""
        self.seq, self.prev, self.next_id, self.epoch = 0, ZERO_HASH, 1, epoch

    def batch(self, n: int = 2, *, seq: int | None = None, prev: bytes | None = None,
              gw: str | None = None, ids: list[int] | None = None,
              epoch: bytes | None = None) -> bytes:
        ids = ids or list(range(self.next_id, self.next_id + n))
        self.next_id = max(ids) + 1
        data = build_batch(
            key=self.key, kid=kid_for(self.key.public_key()), gw=gw or self.gw,
            seq=seq if seq is not None else self.seq + 1,
            prev=prev if prev is not None else self.prev, created=1767225600.0,
            encoded_events=[encode_event(id=i, t=1767225600.0 + i, tq=0, src="gpio.door",
                                         type="contact", v=i % 2 == 0, prio=0) for i in ids],
            epoch=self.epoch if epoch is None else epoch,
        )
        return data

    def accepted(self, data: bytes, seq: int) -> None:
        self.seq, self.prev = seq, batch_hash(data)


@pytest.fixture(params=["sqlite", "postgresql"])
def receiver(request: pytest.FixtureRequest, make_store: Callable[..., Store]) -> Store:
    return make_store(request.param)


@pytest.fixture
def gw(receiver: Store) -> Gateway:
    g = Gateway()
    receiver.register(GW, pem(g.key))
    return g


def send(receiver: Store, g: Gateway, data: bytes, topic_gw: str | None = GW) -> str:
    ack = receiver.handle_batch(data, topic_gw=topic_gw)
    assert ack.h == batch_hash(data)
    if ack.ok:
        g.accepted(data, ack.seq)
        return "ok"
    assert ack.err is not None
    return ack.err


def test_a_gateway_that_lost_its_state_rejoins_in_a_new_epoch(receiver: Store,
                                                              gw: Gateway) -> None:
    """A gateway with its registered key and no chain state starts a new epoch at seq 1 (ids
    from 1 again): accepted, the gap recorded (where the old chain ended), the events of both
    chains kept apart. The old epoch can no longer grow (fork), its stored bytes are still a
    replay; a new epoch must start at seq 1 with a zero prev; another key cannot start one."""
    first = []
    for _ in range(3):
        first.append(gw.batch(2))
        assert send(receiver, gw, first[-1]) == "ok"
    gw.lose_state(b"\x01" * 16)
    assert send(receiver, gw, gw.batch(2)) == "ok"
    assert send(receiver, gw, gw.batch(1)) == "ok"
    assert receiver.epochs(GW) == [
        {"epoch": "", "started_at": pytest.approx(receiver.epochs(GW)[0]["started_at"]),
         "prev": None},
        {"epoch": "01" * 16, "started_at": pytest.approx(receiver.epochs(GW)[1]["started_at"]),
         "prev": {"epoch": "", "seq": 3, "hash": batch_hash(first[-1]).hex(),
                  "alarm_seq": None, "alarm_hash": None}},
    ]
    assert [(e["epoch"], e["id"]) for e in receiver.events(GW)] == [
        *(("", i) for i in range(1, 7)), *(("01" * 16, i) for i in range(1, 4))]
    assert receiver.delivered_ids(GW) == [1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert receiver.chain_head(GW)[0] == 2
    # the replaced chain: its stored bytes are a replay, anything new in it a fork
    assert send(receiver, gw, first[1]) == "replay"
    old = Gateway(key=gw.key)
    assert send(receiver, old, old.batch(2, seq=4, prev=batch_hash(first[-1]), ids=[7, 8])) \
        == "fork"
    # a new epoch whose start has not arrived; the same from a key that is not registered
    assert send(receiver, gw, gw.batch(1, seq=2, prev=ZERO_HASH, epoch=b"\x02" * 16)) == "gap"
    stranger = Gateway()
    stranger.lose_state(b"\x03" * 16)
    assert send(receiver, stranger, stranger.batch(1)) == "unknown-key"
    assert len(receiver.epochs(GW)) == 2


def test_accepts_chain_and_stores_events(receiver: Store, gw: Gateway) -> None:
    """Consecutive batches are acked ok; events stored once each; chain head advances."""
    b1 = gw.batch(3)
    assert send(receiver, gw, b1) == "ok"
    b2 = gw.batch(2)
    assert send(receiver, gw, b2) == "ok"
    assert [e["id"] for e in receiver.events(GW)] == [1, 2, 3, 4, 5]
    assert receiver.chain_head(GW) == (2, batch_hash(b2))
    assert receiver.events(GW)[0] == {"gw": GW, "epoch": "", "id": 1, "t": 1767225601.0, "tq": 0,
                                      "src": "gpio.door", "type": "contact", "v": False,
                                      "prio": 0, "lane": 0, "seq": 1}
    assert receiver.counters() == {}


def test_tampered_batch_rejected(receiver: Store, gw: Gateway) -> None:
    """A flipped byte is bad-signature or malformed; nothing stored; counted."""
    data = bytearray(gw.batch(2))
    data[len(data) // 2] ^= 0x40
    assert send(receiver, gw, bytes(data)) in {"bad-signature", "malformed"}
    assert receiver.events() == [] and receiver.chain_head(GW) == (0, ZERO_HASH)
    assert sum(receiver.counters().values()) == 1


def test_replay_is_reported_and_not_stored_twice(receiver: Store, gw: Gateway) -> None:
    """The same batch twice: second ack is replay with the same hash; nothing stored twice."""
    b1 = gw.batch(2)
    assert send(receiver, gw, b1) == "ok"
    again = receiver.handle_batch(b1, topic_gw=GW)
    assert (again.ok, again.err, again.seq, again.h) == (False, "replay", 1, batch_hash(b1))
    assert len(receiver.events(GW)) == 2 and receiver.batch_count(GW) == 1
    assert receiver.counters() == {(GW, "replay"): 1}


def test_unknown_key(receiver: Store) -> None:
    """A batch signed by an unregistered key is unknown-key, counted, not stored."""
    stranger = Gateway("gw-x")
    assert send(receiver, stranger, stranger.batch(1), topic_gw="gw-x") == "unknown-key"
    assert receiver.counters() == {("gw-x", "unknown-key"): 1}
    assert receiver.events() == []


def test_gap(receiver: Store, gw: Gateway) -> None:
    """A seq beyond head+1 is a gap; head unchanged."""
    assert send(receiver, gw, gw.batch(1)) == "ok"
    assert send(receiver, gw, gw.batch(1, seq=3)) == "gap"
    assert receiver.chain_head(GW)[0] == 1
    assert receiver.counters() == {(GW, "gap"): 1}


def test_fork(receiver: Store, gw: Gateway) -> None:
    """Other bytes for an accepted seq, or a wrong prev, are a fork; nothing stored."""
    b1 = gw.batch(1)
    assert send(receiver, gw, b1) == "ok"
    assert send(receiver, gw, gw.batch(1, seq=1, prev=ZERO_HASH)) == "fork"
    assert send(receiver, gw, gw.batch(1, seq=2, prev=b"\x07" * 32)) == "fork"
    assert [e["id"] for e in receiver.events(GW)] == [1]
    assert receiver.counters() == {(GW, "fork"): 2}


def test_wrong_gateway(receiver: Store, gw: Gateway) -> None:
    """A key used for another gateway's id, or a batch on another gateway's topic, is refused."""
    assert send(receiver, gw, gw.batch(1, gw="gw-b"), topic_gw="gw-b") == "wrong-gateway"
    assert send(receiver, gw, gw.batch(1), topic_gw="gw-b") == "wrong-gateway"
    assert receiver.events() == []


# PostgreSQL refuses a duplicate event loudly instead (tests/test_pgstore.py)
@pytest.mark.parametrize("receiver", ["sqlite"], indirect=True)
def test_duplicate_event_ids_are_deduplicated(receiver: Store, gw: Gateway) -> None:
    """An event re-sent in a later batch (after a rebuild) is stored once, and the delivery
    count at the wire still shows it twice: that is what the end-to-end tests count, so a
    duplicate delivery cannot hide behind the store."""
    assert send(receiver, gw, gw.batch(ids=[1, 2])) == "ok"
    assert send(receiver, gw, gw.batch(ids=[2, 3])) == "ok"
    events = receiver.events(GW)
    assert [(e["id"], e["seq"]) for e in events] == [(1, 1), (2, 1), (3, 2)]
    assert receiver.delivered_ids(GW) == [1, 2, 2, 3]


def test_malformed_counted(receiver: Store) -> None:
    """Garbage is malformed with seq 0, counted under the topic's gateway."""
    ack = receiver.handle_batch(b"\xff\x00garbage", topic_gw="gw-z")
    assert (ack.ok, ack.err, ack.seq) == (False, "malformed", 0)
    assert receiver.counters() == {("gw-z", "malformed"): 1}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "branchsim.platform.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_register_verify_events(tmp_path: Path) -> None:
    """branch-platform register/verify/events work as real subprocesses; verify fails on tamper."""
    db = tmp_path / "p.db"
    g = Gateway()
    pub = tmp_path / "gw.pub"
    pub.write_bytes(pem(g.key))
    r = _cli("register", "--db", str(db), GW, str(pub))
    assert r.returncode == 0 and kid_for(g.key.public_key()).hex() in r.stdout
    good = tmp_path / "b1.cose"
    good.write_bytes(g.batch(2))
    bad = tmp_path / "bad.cose"
    bad.write_bytes(good.read_bytes()[:-3] + b"\x00\x00\x00")
    ok = _cli("verify", "--db", str(db), str(good))
    assert ok.returncode == 0 and '"src": "gpio.door"' in ok.stdout
    assert _cli("verify", "--pubkey", str(pub), str(good)).returncode == 0
    fail = _cli("verify", "--pubkey", str(pub), str(good), str(bad))
    assert fail.returncode == 1 and "FAIL" in fail.stdout and "bad-signature" in fail.stdout
    receiver = Receiver(db)
    assert receiver.handle_batch(good.read_bytes(), topic_gw=GW).ok
    receiver.close()
    ev = _cli("events", "--db", str(db), "--gw", GW)
    assert [json.loads(line)["id"] for line in ev.stdout.splitlines()] == [1, 2]


def test_events_into_a_closed_pipe_is_no_error(tmp_path: Path) -> None:
    """`branch-platform events --db X | head -3`: the reader leaves early; the command ends
    quietly (no BrokenPipeError traceback) with status 0."""
    db = tmp_path / "p.db"
    receiver = Receiver(db)
    g = Gateway()
    receiver.register(GW, pem(g.key))
    for _ in range(20):
        send(receiver, g, g.batch(500))
    receiver.close()
    proc = subprocess.Popen([sys.executable, "-m", "branchsim.platform.cli", "events", "--db",
                             str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()  # what `head -3` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert all(json.loads(line)["gw"] == GW for line in first)
    assert "Traceback" not in err and "BrokenPipe" not in err
