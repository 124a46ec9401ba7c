"""The platform's PostgreSQL store (branchsim.platform.pgstore) on a real PostgreSQL: what is its
own beside the rules it shares with the SQLite store (tests/test_platform.py and
tests/test_platform_lanes.py run those against both): versioned migrations, daily partitions,
a duplicate event refused loudly, receivers sharing a database, and a server crash."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from structlog.testing import capture_logs

from agent.protocol import (
    ALARM_LANE,
    ZERO_HASH,
    Ack,
    batch_hash,
    build_batch,
    encode_event,
    kid_for,
)
from branchsim.pgserver import PostgresServer
from branchsim.platform.pgstore import (
    MIGRATIONS,
    PgReceiver,
    StoreVersionError,
)
from tests.support.agentproc import wait_until
from tests.test_platform import GW, Gateway, pem

if TYPE_CHECKING:
    from tests.support.postgres import Store



@pytest.fixture
def rx(pg_dsn: str) -> Iterator[PgReceiver]:
    r = PgReceiver(pg_dsn)
    yield r
    r.close()


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


def _signed(g: Gateway, events: list[bytes], *, seq: int, prev: bytes,
            key: Ed25519PrivateKey | None = None) -> bytes:
    """A batch of the gateway's chain with the events given (encoded), signed by `key` (the
    gateway's by default)."""
    key = key or g.key
    return build_batch(key=key, kid=kid_for(key.public_key()), gw=g.gw, seq=seq, prev=prev,
                       created=time.time(), encoded_events=events, epoch=g.epoch)


def test_migrations_are_versioned_and_applied_once_by_receivers_starting_together(
        pg_dsn: str) -> None:
    """Four receivers starting at once on an empty database: all start, the schema is made
    once (one row per migration in schema_migrations); a receiver starting later applies
    nothing again."""
    barrier = threading.Barrier(4)

    def start() -> PgReceiver:
        barrier.wait(10)
        return PgReceiver(pg_dsn)

    with ThreadPoolExecutor(4) as pool:
        receivers = [f.result(60) for f in [pool.submit(start) for _ in range(4)]]
    for r in receivers:
        r.close()
    applied = _rows(pg_dsn, "SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert [v for v, _ in applied] == list(range(1, len(MIGRATIONS) + 1))
    PgReceiver(pg_dsn).close()
    assert _rows(pg_dsn, "SELECT version, applied_at FROM schema_migrations "
                         "ORDER BY version") == applied


def test_a_store_of_a_newer_platform_is_refused(pg_dsn: str) -> None:
    """A database at a schema version this platform does not know is not served from: the
    error names both versions and what to do; nothing in it is changed."""
    PgReceiver(pg_dsn).close()
    newer = len(MIGRATIONS) + 1
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (newer,))
    with pytest.raises(StoreVersionError,
                       match=rf"schema version {newer}.*newer platform.*up to {len(MIGRATIONS)}"
                             r".*upgrade"):
        PgReceiver(pg_dsn)
    assert _rows(pg_dsn, "SELECT max(version) FROM schema_migrations") == [(newer,)]


def test_events_land_in_their_days_partition_and_far_off_ones_in_the_default(
        rx: PgReceiver, pg_dsn: str) -> None:
    """A receiver starts with the partitions of yesterday to the day after tomorrow; an event
    of a day that has none (ten days ago: a backlog) gets its day's partition made; an event of
    an unsynchronised clock (1970) and one a year ahead go to the default partition. All of
    them are read back as sent."""
    today = datetime.now(UTC).date()
    days = [f"events_{today + timedelta(days=d):%Y%m%d}" for d in range(-1, 3)]
    partitions = {str(name) for (name,) in _rows(
        pg_dsn, "SELECT inhrelid::regclass::text FROM pg_inherits "
                "WHERE inhparent = 'events'::regclass")}
    assert partitions == {*days, "events_default"}

    g = Gateway()
    rx.register(GW, pem(g.key))
    now = time.time()
    times = {1: (now, 0), 2: (now - 86400, 0), 3: (now - 10 * 86400, 0), 4: (18000.0, 1),
             5: (now + 365 * 86400, 0)}
    events = [encode_event(id=i, t=t, tq=tq, src="gpio.door", type="contact", v=True, prio=0)
              for i, (t, tq) in times.items()]
    assert rx.handle_batch(_signed(g, events, seq=1, prev=ZERO_HASH), GW).ok

    def day(t: float) -> str:
        return f"events_{datetime.fromtimestamp(t, UTC):%Y%m%d}"

    where = dict(_rows(pg_dsn, "SELECT id, tableoid::regclass::text FROM events"))
    assert where == {1: day(now), 2: day(now - 86400), 3: day(now - 10 * 86400),
                     4: "events_default", 5: "events_default"}
    assert [(e["id"], e["t"], e["tq"]) for e in rx.events(GW)] == [
        (i, t, tq) for i, (t, tq) in times.items()]


def test_a_duplicate_event_fails_loudly_and_stores_nothing_of_its_batch(
        rx: PgReceiver) -> None:
    """Two batches of one epoch carrying the same event id (a gateway bug: the chain check
    lets the second through, it extends the chain): the second is not deduplicated away but
    fails its transaction (DuplicateEventError, logged as an error) and is refused `malformed`,
    counted; nothing of it is stored (no batch, no event, no head moved), and the store goes on
    with the chain."""
    g = Gateway()
    rx.register(GW, pem(g.key))
    first = g.batch(ids=[1, 2])
    assert rx.handle_batch(first, GW).ok
    g.accepted(first, 1)
    with capture_logs() as logs:
        ack = rx.handle_batch(g.batch(ids=[2, 3]), GW)
    assert (ack.ok, ack.err, ack.seq) == (False, "malformed", 2)
    assert [(e["event"], e["log_level"], e["seq"]) for e in logs
            if e["event"] == "platform.duplicate_event"] == [
        ("platform.duplicate_event", "error", 2)]
    assert (rx.batch_count(GW), rx.chain_head(GW)) == (1, (1, batch_hash(first)))
    assert [e["id"] for e in rx.events(GW)] == [1, 2] and rx.delivered_ids(GW) == [1, 2]
    assert rx.counters() == {(GW, "malformed"): 1}
    assert rx.handle_batch(g.batch(ids=[3]), GW).ok


def test_two_receivers_on_one_database_keep_one_chain(pg_dsn: str) -> None:
    """Two PgReceivers in two threads each handle every batch of one gateway, both copies of a
    batch at the same moment: each batch is stored once (one ok, the other a replay of it), and
    the chain is the gateway's, every event delivered once."""
    receivers = [PgReceiver(pg_dsn), PgReceiver(pg_dsn)]
    try:
        g = Gateway()
        receivers[0].register(GW, pem(g.key))
        batches = []
        for seq in range(1, 31):
            batches.append(g.batch(3))
            g.accepted(batches[-1], seq)
        barrier = threading.Barrier(2)

        def send_all(r: PgReceiver) -> list[Ack]:
            acks = []
            for data in batches:
                barrier.wait(30)  # both copies of each batch at once
                acks.append(r.handle_batch(data, GW))
            return acks

        with ThreadPoolExecutor(2) as pool:
            both = [f.result(120) for f in [pool.submit(send_all, r) for r in receivers]]
        for a, b in zip(*both, strict=True):
            assert sorted([a.err or "ok", b.err or "ok"]) == ["ok", "replay"], (a, b)
        assert receivers[1].chain_head(GW) == (30, batch_hash(batches[-1]))
        assert receivers[1].delivered_ids(GW) == list(range(1, 91))
        assert receivers[1].counters() == {(GW, "replay"): 30}
    finally:
        for r in receivers:
            r.close()


def test_two_receivers_sharing_a_gateways_batches_wait_for_each_others_commits(
        pg_dsn: str) -> None:
    """A gateway's batches dealt alternately to two PgReceivers (as a shared subscription
    does): a batch whose predecessor the other receiver is still storing waits for its commit
    (`gap_wait_s`) and extends the chain; all are stored, in one chain."""
    receivers = [PgReceiver(pg_dsn), PgReceiver(pg_dsn)]
    try:
        g = Gateway()
        receivers[0].register(GW, pem(g.key))
        batches = []
        for seq in range(1, 41):
            batches.append(g.batch(2))
            g.accepted(batches[-1], seq)

        def send_share(i: int) -> list[Ack]:
            return [receivers[i].handle_batch(data, GW, gap_wait_s=30.0)
                    for data in batches[i::2]]

        with ThreadPoolExecutor(2) as pool:
            acks = [a for f in [pool.submit(send_share, i) for i in (0, 1)] for a in f.result(120)]
        assert all(a.ok for a in acks), [a for a in acks if not a.ok]
        assert receivers[0].chain_head(GW) == (40, batch_hash(batches[-1]))
        assert receivers[0].delivered_ids(GW) == list(range(1, 81))
    finally:
        for r in receivers:
            r.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_key_rotation_announces_then_retires(kind: str,
                                             make_store: Callable[..., Store]) -> None:
    """As Receiver does: a `gateway.key_rotated` event signed by the registered key registers
    the announced key beside it (the old key still verifies); the first batch signed by the new
    key retires the old one, whose batches are then `unknown-key`."""
    rx = make_store(kind)
    g = Gateway()
    rx.register(GW, pem(g.key))
    new = Ed25519PrivateKey.generate()
    raw = new.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    announce = encode_event(id=1, t=time.time(), tq=0, src="agent.keys",
                            type="gateway.key_rotated", v=kid_for(new.public_key()).hex(),
                            prio=1, attrs={"pub": raw.hex()})
    chain = [_signed(g, [announce], seq=1, prev=ZERO_HASH)]
    chain.append(_signed(g, [encode_event(id=2, t=time.time(), tq=0, src="gpio.door",
                                          type="contact", v=True, prio=0)],
                         seq=2, prev=batch_hash(chain[-1])))
    assert [rx.handle_batch(d, GW).ok for d in chain] == [True, True]
    assert rx.public_key(kid_for(new.public_key())) is not None
    assert rx.public_key(kid_for(g.key.public_key())) is not None
    chain.append(_signed(g, [encode_event(id=3, t=time.time(), tq=0, src="gpio.door",
                                          type="contact", v=False, prio=0)],
                         seq=3, prev=batch_hash(chain[-1]), key=new))
    assert rx.handle_batch(chain[-1], GW).ok
    assert rx.public_key(kid_for(g.key.public_key())) is None
    late = _signed(g, [], seq=4, prev=batch_hash(chain[-1]))
    assert rx.handle_batch(late, GW).err == "unknown-key"
    assert rx.delivered_ids(GW) == [1, 2, 3]


def test_without_lanes_an_alarm_lane_batch_is_malformed(pg_dsn: str) -> None:
    """`lanes=False`, as Receiver's: an alarm-lane batch is `malformed`, nothing stored."""
    rx = PgReceiver(pg_dsn, lanes=False)
    try:
        g = Gateway()
        rx.register(GW, pem(g.key))
        alarm = build_batch(key=g.key, kid=kid_for(g.key.public_key()), gw=GW, seq=1,
                            prev=ZERO_HASH, created=time.time(), lane=ALARM_LANE,
                            encoded_events=[encode_event(id=1, t=time.time(), tq=0,
                                                         src="gpio.vault", type="contact",
                                                         v=True, prio=0)])
        assert rx.handle_batch(alarm, GW).err == "malformed"
        assert rx.batch_count(GW) == 0 and rx.counters() == {(GW, "malformed"): 1}
    finally:
        rx.close()


def test_a_text_postgresql_cannot_hold_is_malformed_not_an_exception(rx: PgReceiver) -> None:
    """A NUL character in an event's text (valid CBOR, not storable in PostgreSQL's text) is
    refused `malformed` and counted, not raised; so is a stranger's batch claiming a gateway id
    with a NUL in it, or one too long for an index entry (counted under a shortened id). An
    integer `t` (valid CBOR too) is stored as the float it is."""
    g = Gateway()
    rx.register(GW, pem(g.key))
    bad = _signed(g, [encode_event(id=1, t=time.time(), tq=0, src="gpio.do\x00or",
                                   type="contact", v=True, prio=0)], seq=1, prev=ZERO_HASH)
    assert rx.handle_batch(bad, GW).err == "malformed"
    for claimed in ("gw-\x00", "gw-" + "x" * 10_000):
        stranger = Gateway(claimed)
        assert rx.handle_batch(stranger.batch(1)).err == "unknown-key"
    assert rx.counters() == {(GW, "malformed"): 1, ("gw-\\x00", "unknown-key"): 1,
                             ("gw-" + "x" * 253, "unknown-key"): 1}
    assert rx.batch_count(GW) == 0
    whole_t = cbor2.loads(encode_event(id=1, t=0, tq=1, src="gpio.door", type="contact",
                                       v=True, prio=0))
    whole_t["t"] = 1767225600  # what another encoder may send: an integer
    assert rx.handle_batch(_signed(g, [cbor2.dumps(whole_t, canonical=True)], seq=1,
                                   prev=ZERO_HASH), GW).ok
    assert [(e["id"], e["t"]) for e in rx.events(GW)] == [(1, 1767225600.0)]


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own (it is killed): stopped and removed after."""
    dir = Path(tempfile.mkdtemp(prefix="branch-pg-crash-"))
    server = PostgresServer(dir)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(dir, ignore_errors=True)


def test_a_killed_server_loses_no_acked_batch(own_server: PostgresServer) -> None:
    """PostgreSQL killed (SIGKILL, postmaster and backends) while a receiver stores a stream of
    batches: after a restart (crash recovery) every batch acked ok is stored, byte for byte;
    the receiver's next call opens a new connection, and the batch whose call failed in the
    crash, sent again, is stored or found stored (replay): the chain goes on."""
    dsn = own_server.create_database("crash")
    rx = PgReceiver(dsn)
    try:
        g = Gateway()
        rx.register(GW, pem(g.key))
        batches = []
        for seq in range(1, 2001):
            batches.append(g.batch(5))
            g.accepted(batches[-1], seq)
        acked: list[int] = []
        failed: list[object] = []  # what ended the stream: the crash, or a refusal

        def stream() -> None:
            for seq, data in enumerate(batches, 1):
                try:
                    ack = rx.handle_batch(data, GW)
                except Exception as exc:
                    failed.append(exc)
                    return
                if not ack.ok:
                    failed.append(ack)
                    return
                acked.append(seq)

        sender = threading.Thread(target=stream, name="sender")
        sender.start()
        try:
            wait_until(lambda: len(acked) >= 50 or not sender.is_alive(), 60, "50 batches acked")
            own_server.kill()
        finally:
            sender.join(60)
        assert not sender.is_alive()
        assert len(failed) == 1 and isinstance(failed[0], psycopg.OperationalError), failed
        own_server.start()
        assert "automatic recovery in progress" in own_server.log.read_text()  # a crash

        with psycopg.connect(dsn) as conn:
            stored = {int(seq): bytes(raw) for seq, raw in conn.execute(
                "SELECT seq, raw FROM batches WHERE gw = %s", (GW,))}
        assert all(stored[seq] == batches[seq - 1] for seq in acked)
        assert len(stored) in (len(acked), len(acked) + 1)  # + the one whose commit was cut

        in_flight = len(acked) + 1
        again = rx.handle_batch(batches[in_flight - 1], GW)
        assert again.ok or again.err == "replay", again
        assert rx.handle_batch(batches[in_flight], GW).ok
        assert rx.chain_head(GW) == (in_flight + 1, batch_hash(batches[in_flight]))
        assert rx.delivered_ids(GW) == list(range(1, 5 * (in_flight + 1) + 1))
    finally:
        rx.close()


def test_a_server_that_cannot_start_fails_with_its_log(postgres_server: PostgresServer) -> None:
    """A second server on the session server's data directory (its lock file held) exits at
    once: start() raises with the server log's tail, which says why."""
    second = PostgresServer(postgres_server.dir)
    with pytest.raises(RuntimeError, match=r"(?s)postgres exited with 1.*postmaster\.pid"):
        second.start()
    assert not second.running and postgres_server.running
