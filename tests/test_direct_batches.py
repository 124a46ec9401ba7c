"""Direct batches and deferred acks (agent.outbox.batches, agent.outbox.store): the writes that
make a branch's trickle of readings cheap on the card, and the promises they must keep: claim
order, exactly the events accepted, figures that agree with the tables, nothing deleted before
its ack is written."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

from agent import protocol
from agent.core.types import Event
from agent.outbox import DirectClaim, Outbox, OutboxView
from tests.support.agentproc import until

WORKER = Path(__file__).parent / "support" / "outbox_worker.py"
sys.path.insert(0, str(WORKER.parent))
from outbox_worker import build  # noqa: E402 - the worker is a script, imported for its signer


def ev(v: object = 1.0, prio: int = 2) -> Event:
    return Event(src="s", type="t", v=v, t=time.time(), prio=prio)  # type: ignore[arg-type]


def table(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


def depth_in_tables(db: Path) -> dict[int, int]:
    depth = {int(p): int(n) for p, n in table(db, "SELECT prio, COUNT(*) FROM events "
                                                  "GROUP BY prio")}
    for (held,) in table(db, "SELECT held FROM batches WHERE held IS NOT NULL"):
        for p, n in json.loads(str(held))["prios"].items():
            depth[int(p)] = depth.get(int(p), 0) + n
    return depth


async def test_a_commit_signs_its_events_straight_into_a_batch(tmp_path: Path) -> None:
    """Offered a direct claim, a commit stores its events only inside one signed batch (no
    rows), which the next claim returns; the figures, the read-only view and a reopen all see
    the events; the ack removes them."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    ob.offer_direct(DirectClaim(100, 1 << 20, build, linger=0.0))
    ids = await ob.append_many([ev(float(i), prio=(2, 3, 0)[i % 3]) for i in range(6)])
    assert table(db, "SELECT COUNT(*) FROM events") == [(0,)]
    [(held,)] = table(db, "SELECT held FROM batches")
    assert json.loads(str(held))["ids"] == [ids[0], ids[-1]]
    st = await ob.stats()
    assert st.depth == depth_in_tables(db) == {0: 2, 2: 2, 3: 2}
    assert st.unclaimed == 0 and st.in_flight_batches == 1 and st.oldest_unsent is not None
    with OutboxView.open(db) as view:
        assert view.held_ids() == set(ids)
        assert view.snapshot().depth == st.depth
    await ob.close()

    ob = await Outbox.open(db)
    assert (await ob.stats()).depth == {0: 2, 2: 2, 3: 2}  # counted from `held` on open
    [pending] = await ob.pending_batches()
    batch = protocol.decode_batch(pending.data)[0]
    assert [e["id"] for e in batch.events] == ids and pending.seq == 1
    assert await ob.ack_batch(pending.seq, pending.hash)
    assert (await ob.stats()).depth == {}
    await ob.close()
    assert table(db, "SELECT COUNT(*) FROM batches") == [(0,)]


async def test_direct_batches_keep_the_claim_order(tmp_path: Path) -> None:
    """While older events wait unclaimed, a commit goes to rows (the claim takes them by
    (priority, id)); a group that has not waited its linger goes to rows unless it holds an
    alarm; a batch signed at commit is handed out before anything claimed after it."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    old = await ob.append_many([ev(1.0)])  # no offer: a row
    ob.offer_direct(DirectClaim(100, 1 << 20, build, linger=0.0))
    second = await ob.append_many([ev(2.0)])
    assert [r[0] for r in table(db, "SELECT id FROM events")] == old + second
    b1 = await ob.claim_batch(100, 1 << 20, build)
    assert b1 is not None and b1.count == 2
    ob.offer_direct(DirectClaim(100, 1 << 20, build, linger=60.0))
    slow = await ob.append_many([ev(3.0)])
    assert [r[0] for r in table(db, "SELECT id FROM events WHERE batch IS NULL")] == slow
    b2 = await ob.claim_batch(100, 1 << 20, build)
    assert b2 is not None
    alarm = await ob.append_many([ev(4.0, prio=0)])
    assert table(db, f"SELECT COUNT(*) FROM events WHERE id={alarm[0]}") == [(0,)], \
        "an alarm does not wait for the linger"
    ob.offer_direct(None)
    later = await ob.append_many([ev(5.0)])
    b3 = await ob.claim_batch(100, 1 << 20, build)
    b4 = await ob.claim_batch(100, 1 << 20, build)
    assert b3 is not None and b4 is not None
    assert [e["id"] for e in protocol.decode_batch(b3.data)[0].events] == alarm
    assert [e["id"] for e in protocol.decode_batch(b4.data)[0].events] == later
    assert [b.seq for b in (b1, b2, b3, b4)] == [1, 2, 3, 4]
    chain = [protocol.decode_batch(b.data)[0].prev for b in (b2, b3, b4)]
    assert chain == [b1.hash, b2.hash, b3.hash]
    await ob.close()


async def test_an_alarm_passes_a_backlog_in_its_own_commit(tmp_path: Path) -> None:
    """During a backlog (unclaimed telemetry), a group of alarms only is signed at commit, as
    the claim would have taken it first; not while an older alarm waits unclaimed, and never a
    group that holds telemetry."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    backlog = await ob.append_many([ev(float(i)) for i in range(50)])
    ob.offer_direct(DirectClaim(100, 1 << 20, build, linger=0.0))
    alarm = await ob.append_many([ev(1.0, prio=0)])
    assert ob.alarm_waiting and ob.unclaimed_alarms == 0
    mixed = await ob.append_many([ev(2.0, prio=0), ev(3.0)])  # telemetry with it: rows
    b1 = await ob.claim_batch(100, 1 << 20, build)
    assert b1 is not None and [e["id"] for e in protocol.decode_batch(b1.data)[0].events] == alarm
    assert ob.unclaimed_alarms == 1  # the mixed group's alarm, a row
    late = await ob.append_many([ev(4.0, prio=0)])  # an older alarm waits unclaimed: a row
    b2 = await ob.claim_batch(100, 1 << 20, build)
    assert b2 is not None
    ids = [e["id"] for e in protocol.decode_batch(b2.data)[0].events]
    assert ids[:2] == [mixed[0], late[0]] and set(ids[2:]) == {*backlog, mixed[1]}
    await ob.close()


async def test_an_ack_is_written_with_the_next_transaction(tmp_path: Path) -> None:
    """With a telemetry window, an ack leaves the figures at once and the tables with the next
    write (or after the window on its own); until then a reopen offers the batch again, which
    the platform answers `replay`."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001, telemetry_window=0.3)
    await ob.append_many([ev(prio=0) for _ in range(4)])
    b = await ob.claim_batch(100, 1 << 20, build)
    assert b is not None
    assert await ob.ack_batch(b.seq, b.hash)
    assert not await ob.ack_batch(b.seq, b.hash), "acknowledged once"
    assert (await ob.stats()).depth == {}
    assert await ob.pending_batches() == []
    assert table(db, "SELECT COUNT(*) FROM events") == [(4,)], "not yet written"
    # Another process opening the store now (as after a crash) finds the batch unacked.
    assert [r[0] for r in table(db, "SELECT seq FROM batches")] == [b.seq]
    await ob.append_many([ev(prio=0)])  # the next write takes the delete along
    assert table(db, "SELECT COUNT(*) FROM events") == [(1,)]
    assert table(db, "SELECT COUNT(*) FROM batches") == [(0,)]
    assert table(db, "SELECT value FROM meta WHERE key='last_acked_seq'") == [(str(b.seq),)]
    b2 = await ob.claim_batch(100, 1 << 20, build)
    assert b2 is not None and await ob.ack_batch(b2.seq, b2.hash)
    await until(lambda: table(db, "SELECT COUNT(*) FROM batches") == [(0,)], 10,
                "the ack written on its own after the window")
    await ob.close()


async def test_a_new_chain_turns_direct_batches_back_into_rows(tmp_path: Path) -> None:
    """A batch refused for good dissolves every stored batch: a direct batch's events become
    rows again with their ids and byte-identical bodies, or, parked, leave with the alert
    naming them; the figures agree with the tables."""
    db = tmp_path / "o.db"
    ob = await Outbox.open(db, commit_interval=0.001)
    direct = DirectClaim(100, 1 << 20, build, linger=0.0)
    ob.offer_direct(direct)
    first = await ob.append_many([ev(float(i)) for i in range(3)])
    b1 = await ob.claim_batch(100, 1 << 20, build)
    assert b1 is not None
    second = await ob.append_many([ev(float(i), prio=1) for i in range(2)])
    b2 = await ob.claim_batch(100, 1 << 20, build)
    assert b2 is not None and table(db, "SELECT COUNT(*) FROM events") == [(0,)]
    bodies = {e["id"]: e for b in (b1, b2) for e in protocol.decode_batch(b.data)[0].events}

    info = await ob.restart_chain(b1, "fork", park=False)
    assert info is not None and info["ids"] == [[first[0], first[-1]]]
    back = {int(i): bytes(body) for i, body in table(db, "SELECT id, body FROM events")}
    alert = max(back)
    assert set(back) == {*first, *second, alert}
    for i in (*first, *second):
        assert protocol.encode_event(**bodies[i]) == back[i]
    assert (await ob.stats()).depth == depth_in_tables(db)
    await ob.close()

    db2 = tmp_path / "p.db"
    ob = await Outbox.open(db2, commit_interval=0.001)
    ob.offer_direct(direct)
    parked = await ob.append_many([ev(float(i)) for i in range(3)])
    b = await ob.claim_batch(100, 1 << 20, build)
    assert b is not None
    info = await ob.restart_chain(b, "malformed", park=True)
    assert info is not None and info["ids"] == [[parked[0], parked[-1]]]
    assert not set(parked) & {int(r[0]) for r in table(db2, "SELECT id FROM events")}
    assert (await ob.stats()).depth == depth_in_tables(db2) == {1: 1}  # the alert
    await ob.close()
