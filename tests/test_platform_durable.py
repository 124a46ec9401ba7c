"""The reference platform (SQLite store) answers a batch only once what the answer reports is
durable, although its batch transactions commit without an fsync (so that an alarm's batch does
not wait behind a bulk batch's disk flush): the WAL is synced after the store's lock is released
and before the answer. Proved with power cuts on the power-cut file system (a process kill keeps
the page cache and could not tell), with the store's two lanes written by two threads at once.
And the store checkpoints its WAL itself (outside the lock), so the WAL stays bounded."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import ALARM_LANE, BULK_LANE
from branchsim.platform.receiver import CHECKPOINT_BYTES, Receiver
from branchsim.powerfs import PowerSupply
from tests.test_platform import GW, Gateway, pem

# Handles its lanes' chains from two threads (bulk: 50 events a batch, alarm: 1), forever;
# prints "ack <lane> <seq>" once handle_batch returned ok, i.e. where the MQTT front end would
# publish the ack.
PLATFORM = """
import sys, threading
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from agent.protocol import (ALARM_LANE, BULK_LANE, ZERO_HASH, batch_hash, build_batch,
                            encode_event, kid_for)
from branchsim.platform.receiver import Receiver

rx = Receiver(Path(sys.argv[1]))
key = Ed25519PrivateKey.generate()
rx.register("gw", key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
out = threading.Lock()

def lane(lane, size, first_id):
    seq, prev, i = 0, ZERO_HASH, first_id
    while True:
        seq += 1
        evs = [encode_event(id=i + k, t=1767225600.0, tq=0, src="s", type="t", v=k, prio=0)
               for k in range(size)]
        i += size
        data = build_batch(key=key, kid=kid_for(key.public_key()), gw="gw", seq=seq,
                           prev=prev, created=1767225600.0, encoded_events=evs, lane=lane)
        ack = rx.handle_batch(data, "gw")
        assert ack.ok, ack
        prev = batch_hash(data)
        with out:
            sys.stdout.write(f"ack {lane} {seq}\\n")
            sys.stdout.flush()

threads = [threading.Thread(target=lane, args=(BULK_LANE, 50, 1), daemon=True),
           threading.Thread(target=lane, args=(ALARM_LANE, 1, 10**9), daemon=True)]
print("ready", flush=True)
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def acked_then_cut(power: PowerSupply, children: list[subprocess.Popen[str]], db: Path,
                   bulk_acks: int) -> dict[int, int]:
    """Run the platform until it acknowledged `bulk_acks` bulk batches, then cut the power:
    the last seq acknowledged per lane."""
    p = subprocess.Popen([sys.executable, "-c", PLATFORM, str(db)], stdout=subprocess.PIPE,
                         text=True)
    children.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    acked = {BULK_LANE: 0, ALARM_LANE: 0}
    while acked[BULK_LANE] < bulk_acks:
        line = p.stdout.readline()
        assert line, f"the platform exited {p.wait(timeout=10)}"
        if line.startswith("ack "):  # else a log line
            lane, seq = map(int, line.split()[1:])
            acked[lane] = seq
    power.cut()
    assert p.wait(timeout=10) < 0
    return acked


def stored(db: Path) -> dict[int, list[int]]:
    """After the cut: the seqs stored per lane (the store opens and passes integrity_check)."""
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        out: dict[int, list[int]] = {BULK_LANE: [], ALARM_LANE: []}
        for lane, seq in c.execute("SELECT lane, seq FROM batches ORDER BY lane, seq"):
            out[lane].append(seq)
        events = c.execute("SELECT count(*) FROM events").fetchone()[0]
    c.close()
    assert events == 50 * len(out[BULK_LANE]) + len(out[ALARM_LANE])
    return out


def test_every_acknowledged_batch_survives_a_power_cut(
        power: PowerSupply, children: list[subprocess.Popen[str]]) -> None:
    """Three cuts at different moments, each on a platform started on a store of its own: every
    batch acknowledged before a cut, in either lane, is stored after it with its events, each
    lane's chain without a hole. (Without the WAL sync before the
    answer, the acknowledged batches of the last ~4 MB of WAL are gone after a cut.)"""
    for n, bulk_acks in enumerate((60, 25, 90)):
        db = power.mountpoint / f"platform{n}.db"  # a fresh gateway key each start: own store
        acked = acked_then_cut(power, children, db, bulk_acks)
        assert acked[ALARM_LANE] > 0  # both lanes were being written
        seqs = stored(db)
        for lane in (BULK_LANE, ALARM_LANE):
            top = seqs[lane][-1] if seqs[lane] else 0
            assert top >= acked[lane], f"lane {lane}: acked {acked[lane]}, stored up to {top}"
            assert seqs[lane] == list(range(1, top + 1))


def test_the_wal_is_checkpointed_outside_the_lock_and_stays_bounded(tmp_path: Path) -> None:
    """The store's connection never checkpoints in a commit (wal_autocheckpoint 0); the
    handlers do, past CHECKPOINT_BYTES: after three times that much batch data the database
    file holds the data and the WAL has not grown past twice the threshold."""
    rx = Receiver(tmp_path / "platform.db")
    try:
        assert rx._db.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        g = Gateway(key=Ed25519PrivateKey.generate())
        rx.register(GW, pem(g.key))
        wal = tmp_path / "platform.db-wal"
        while (tmp_path / "platform.db").stat().st_size < 3 * CHECKPOINT_BYTES:
            data = g.batch(500)
            ack = rx.handle_batch(data, GW)
            assert ack.ok, ack
            g.accepted(data, ack.seq)
            assert wal.stat().st_size < 2 * CHECKPOINT_BYTES, g.seq
            assert g.seq < 1000, "the database file does not grow: nothing is checkpointed"
        # every event of every batch (500 each: full multi-row INSERTs and a remainder)
        assert len(rx.events(GW)) == 500 * g.seq
    finally:
        rx.close()
    assert os.path.getsize(tmp_path / "platform.db") >= 3 * CHECKPOINT_BYTES
