"""A child process for crash tests: drives the outbox and reports what it was told is durable.

    python outbox_worker.py append DB SEED   -> prints "A <id> <id> ..." after each append resolves
    python outbox_worker.py append-n DB N    -> the same for N appends one after the other, then
                                                exits (tests/test_outbox.py traces its syscalls)
    python outbox_worker.py claim DB N       -> appends N events, claims three batches, acks the
                                                first, prints "C <seq> <hash> <ids...>" / "K <seq>",
                                                then waits to be killed
Each line is flushed before the next operation, so a line the parent read is a promise kept.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.core.types import Event
from agent.outbox import Outbox

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KID = protocol.kid_for(KEY.public_key())


def build(seq: int, prev: bytes, bodies: list[bytes], epoch: bytes = b"",
          lane: int = protocol.BULK_LANE) -> bytes:
    return protocol.build_batch(key=KEY, kid=KID, gw="gw-test", seq=seq, prev=prev,
                                created=1.0, encoded_events=bodies, epoch=epoch, lane=lane)


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def append(db: Path, seed: int) -> None:
    ob = await Outbox.open(db, commit_interval=0.002)
    rng = random.Random(seed)

    async def producer(k: int) -> None:
        n = 0
        while True:
            size = rng.randint(1, 40)
            prio = 0 if rng.random() < 0.05 else rng.choice((1, 2, 3))
            evs = [Event(src=f"p{k}", type="t", v=n + i, t=time.time(), prio=prio)
                   for i in range(size)]
            ids = await ob.append_many(evs)
            n += size
            out("A " + " ".join(map(str, ids)))

    await asyncio.gather(*(producer(k) for k in range(8)))


async def append_n(db: Path, n: int) -> None:
    ob = await Outbox.open(db, commit_interval=0.002)
    for i in range(n):
        prio = 0 if i % 5 == 0 else 2  # alarms commit at once, telemetry in a group
        ids = await ob.append_many([Event(src="s", type="t", v=i, t=time.time(), prio=prio)])
        out("A " + " ".join(map(str, ids)))
    await ob.close()


async def claim(db: Path, n: int) -> None:
    ob = await Outbox.open(db)
    evs = [Event(src="s", type="t", v=i, t=time.time(), prio=i % 4) for i in range(n)]
    await ob.append_many(evs)
    batches = [await ob.claim_batch(100, 1 << 20, build) for _ in range(3)]
    for b in batches:
        assert b is not None
        ids = [e["id"] for e in protocol.decode_batch(b.data)[0].events]
        out(f"C {b.seq} {b.hash.hex()} " + " ".join(map(str, ids)))
    first = batches[0]
    assert first is not None
    await ob.ack_batch(first.seq, first.hash)
    out(f"K {first.seq}")
    await asyncio.Event().wait()  # batches 2 and 3 stay claimed, unacked, until the kill


if __name__ == "__main__":
    mode, path, arg = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    modes = {"append": append, "append-n": append_n, "claim": claim}
    asyncio.run(modes[mode](path, arg))
