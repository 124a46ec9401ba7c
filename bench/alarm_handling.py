"""The platform's alarm handling beside a bulk backlog, in one process, with and without the
bulk handlers standing aside for alarms (`VerifyingStore.alarms_first`).

    .venv/bin/python bench/alarm_handling.py [--rounds 6] [--quick] [--json PATH]

No transport: the reference platform's `Receiver` (SQLite, as `branch-platform serve` stores)
gets pre-signed batches from two threads, as its MQTT side does from its two connections. A
bulk thread hands it batches of 500 telemetry events back to back; an alarm thread hands it a
one-event alarm lane batch every 10 ms (`urgent`, as from the alarm topic) and times each
`handle_batch` call (verify, chain check, store, WAL sync). The GIL switch interval is the one
`branch-platform serve` sets. Per round, on a fresh store each: idle (alarms alone), then the
backlog with the bulk handlers standing aside and without (the order alternates by round);
p50/p99 over all rounds. This is the platform's part of bench/drain.py's alarm latency, without
the agent, the broker and the TLS between them on the same two cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import Row, add_common_args, machine, print_table, write_json
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from drain import pct
from forward import BATCH, GW, sample_batches

from agent import protocol
from agent.core.log import configure_logging
from agent.core.types import ALARM
from agent.runtime.forwarder import Signer
from branchsim.platform.cli import SWITCH_INTERVAL_S
from branchsim.platform.receiver import Receiver

EVERY_S = 0.01


def alarm_batches(n: int, key: Ed25519PrivateKey) -> list[bytes]:
    """The alarm lane's first n batches, one vault alarm each, as the agent signs them."""
    signer = Signer(key, GW, time.time)
    prev, out = protocol.ZERO_HASH, []
    for seq in range(1, n + 1):
        body = protocol.encode_event(id=10_000_000 + seq, t=time.time(), tq=0, src="gpio.vault",
                                     type="contact", v=seq % 2, prio=ALARM)
        data = signer.build(seq, prev, [body], lane=protocol.ALARM_LANE)
        prev = protocol.batch_hash(data)
        out.append(data)
    return out


def one(db: Path, pem: bytes, bulk: list[bytes], alarms: list[bytes], *,
        stand_aside: bool) -> list[float]:
    """Alarm handling times (ms) on a fresh store: while `bulk` is handled, or alone (empty)."""
    rx = Receiver(db)
    rx.alarms_first.enabled = stand_aside
    rx.register(GW, pem)
    done = threading.Event()
    failed: list[str] = []

    def handle(data: bytes, urgent: bool) -> None:
        ack = rx.handle_batch(data, GW, urgent=urgent)
        if not ack.ok:
            failed.append(str(ack.err))

    def bulk_lane() -> None:
        try:
            for data in bulk:
                handle(data, False)
        finally:
            done.set()

    times: list[float] = []
    worker = threading.Thread(target=bulk_lane, name="bulk")
    try:
        if bulk:
            worker.start()
        for data in alarms:
            if bulk and done.is_set():
                break
            start = time.perf_counter()
            handle(data, True)
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(max(0.0, start + EVERY_S - time.perf_counter()))  # the alarms' pace
    finally:
        if bulk:
            worker.join()
        rx.close()
    if failed:
        raise RuntimeError(f"the platform refused bench batches: {sorted(set(failed))}")
    return times


def measure(rounds: int, n_bulk: int, n_alarms: int, tmp: Path,
            say: Callable[[str], None]) -> list[Row]:
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    bulk = sample_batches(n_bulk * BATCH, key)
    alarms = alarm_batches(n_alarms, key)
    got: dict[str, list[float]] = {"idle": [], "aside": [], "not": []}
    for r in range(rounds):
        order = ["aside", "not"] if r % 2 == 0 else ["not", "aside"]
        for mode in ["idle", *order]:
            times = one(tmp / f"r{r}-{mode}.db", pem, [] if mode == "idle" else bulk,
                        alarms, stand_aside=mode == "aside")
            got[mode] += times
            say(f"round {r + 1} {mode:5s}: {len(times)} alarms, p50 {pct(times, 50):.2f} "
                f"p99 {pct(times, 99):.2f} ms")
    idle, aside, plain = got["idle"], got["aside"], got["not"]
    return [
        Row(figure="platform alarm handling beside a backlog, p50", value=pct(aside, 50),
            unit="ms", baseline=pct(plain, 50), baseline_what="ms bulk not standing aside",
            note=f"idle p50 {pct(idle, 50):.2f} ms; {len(aside)} / {len(plain)} alarms"),
        Row(figure="platform alarm handling beside a backlog, p99", value=pct(aside, 99),
            unit="ms", baseline=pct(plain, 99), baseline_what="ms bulk not standing aside",
            note=f"idle p99 {pct(idle, 99):.2f} ms; handle_batch of a 1-event alarm lane "
                 f"batch every {EVERY_S * 1000:.0f} ms while another thread stores batches "
                 f"of {BATCH}"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    rounds = args.runs or (1 if args.quick else args.rounds)
    n_bulk, n_alarms = (6, 20) if args.quick else (200, 400)
    configure_logging("warning")  # as in production: no per-batch lines
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    print(f"# bench/alarm_handling.py: {rounds} round(s), {n_bulk} bulk batches of {BATCH}; "
          f"{machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(rounds, n_bulk, n_alarms, Path(tmp), lambda s: print(s, flush=True))
    print_table(rows)
    if args.json is not None:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
