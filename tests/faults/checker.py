"""The fault suite's oracle: what the agent accepted against what the platform holds.

"Accepted" is read from the agent's own outbox file, read-only, after every kill or stop: ids are
assigned at commit from ``meta.next_id`` in the same transaction as the events, so every id below
``next_id`` was accepted, and an id that is neither still in the outbox, nor at the platform, nor
named in a drop record is lost. That invariant is checked at each observation (`Ledger.observe`),
not only at the end. The one place ids jump is a store reset (corrupt file quarantined): the
fresh store starts at the ``first_new_id`` its ``gateway.store_reset`` record names, and the
ids accepted before it that never reached the platform are reported by that record.

An independent check does not trust the id counter: synthetic sources with ``waveform =
"counter"`` number their readings 0, 1, 2, ... and each source name is used by one agent run
only, so a hole in a source's delivered values is a loss even if the ids looked complete.

`check_platform` re-verifies every stored batch (signature with the registered key, seq
1..n contiguous, each ``prev`` the hash of the batch before, chain head == batch count) from the
raw bytes the reference platform kept, counts ids delivered by more than one batch, and returns
the figures for the summary table.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import ZERO_HASH, verify_batch

__all__ = [
    "SUMMARY",
    "Ledger",
    "OutboxSnapshot",
    "Report",
    "Summary",
    "check_platform",
    "read_outbox",
]

ALARM = 0


@dataclass(frozen=True)
class OutboxSnapshot:
    next_id: int
    ids: frozenset[int]
    batches: int  # signed batches stored and not yet acknowledged

    @property
    def drained(self) -> bool:
        return not self.ids and self.batches == 0


def _ro(path: Path) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection that is closed on exit (sqlite3's own `with` only commits)."""
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5))


def read_outbox(db: Path) -> OutboxSnapshot | None:
    """The outbox file's state, read-only; None if there is no (readable) file yet."""
    if not db.exists():
        return None
    try:
        with _ro(db) as c:
            row = c.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()
            ids = {int(r[0]) for r in c.execute("SELECT id FROM events")}
            # a direct batch (every alarm lane batch is one) holds its events itself
            for (held,) in c.execute("SELECT held FROM batches WHERE held IS NOT NULL"):
                first, last = json.loads(held)["ids"]
                ids.update(range(int(first), int(last) + 1))
            batches = int(c.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
    except sqlite3.Error:
        return None  # not created yet, or mid-creation
    if row is None:
        return None
    return OutboxSnapshot(int(row[0]), frozenset(ids), batches)


def _ranges_to_ids(ranges: Iterable[Iterable[int]]) -> set[int]:
    out: set[int] = set()
    for r in ranges:
        a, b = list(r)
        out.update(range(int(a), int(b) + 1))
    return out


@dataclass
class PlatformView:
    """What the reference platform's store holds for one gateway (read-only)."""

    delivered: dict[int, dict[str, Any]]  # id -> event (deduplicated by the platform)
    received_at: dict[tuple[bytes, int, int], float]  # (epoch, lane, seq) -> when stored
    dropped: set[int]  # ids named by gateway.dropped records
    drop_priorities: list[int]
    resets: list[int]  # first_new_id of each gateway.store_reset record


def platform_view(store: Path, gw: str) -> PlatformView:
    with _ro(store) as c:
        rows = c.execute(
            "SELECT id, t, tq, src, type, v, prio, seq, epoch, lane FROM events WHERE gw=? "
            "ORDER BY id", (gw,),
        ).fetchall()
        received = {(bytes(e), int(lane), int(seq)): float(at) for e, lane, seq, at in c.execute(
            "SELECT epoch, lane, seq, received_at FROM batches WHERE gw=?", (gw,))}
    delivered: dict[int, dict[str, Any]] = {}
    dropped: set[int] = set()
    prios: list[int] = []
    resets: list[int] = []
    for id_, t, tq, src, type_, v, prio, seq, epoch, lane in rows:
        value = json.loads(v)
        # ids are unique across epochs here: a quarantined store's successor starts above the
        # id floor (the fault suite never loses chain.json)
        assert int(id_) not in delivered, f"id {id_} delivered in two epochs"
        delivered[int(id_)] = {"id": int(id_), "t": t, "tq": tq, "src": src, "type": type_,
                               "v": value, "prio": prio, "seq": seq, "epoch": bytes(epoch),
                               "lane": int(lane)}
        if type_ == "gateway.dropped" and isinstance(value, dict):
            dropped |= _ranges_to_ids(value.get("ids", []))
            prios.append(int(value.get("priority", -1)))
        elif type_ == "gateway.store_reset" and isinstance(value, dict):
            resets.append(int(value["first_new_id"]))
    return PlatformView(delivered, received, dropped,
                        prios, sorted(resets))


@dataclass
class Ledger:
    """Accepted ids of one gateway, learned from its outbox after each kill or stop."""

    db: Path
    platform_store: Path
    gw: str
    accepted_upto: int = 0  # the highest id seen committed
    observed: list[int] = field(default_factory=list)  # accepted_upto at each observation
    kills: int = 0
    kills_with_batch_in_flight: int = 0

    def accepted(self, resets: Iterable[int]) -> set[int]:
        """1..accepted_upto, minus ids a store reset skipped (never assigned)."""
        ids = set(range(1, self.accepted_upto + 1))
        for first_new in resets:
            before = max((u for u in self.observed if u < first_new), default=0)
            ids -= set(range(before + 1, first_new))
        return ids

    def observe(self, killed: bool = False) -> OutboxSnapshot:
        """Read the stopped agent's outbox and assert that nothing accepted so far is missing:
        each id is still in the outbox, at the platform, or named by a drop/reset record."""
        snap = read_outbox(self.db)
        assert snap is not None, f"no readable outbox at {self.db}"
        assert snap.next_id - 1 >= self.accepted_upto, \
            f"ids reused: next_id {snap.next_id} after {self.accepted_upto} were accepted"
        self.accepted_upto = max(self.accepted_upto, snap.next_id - 1)
        self.observed.append(snap.next_id - 1)
        if killed:
            self.kills += 1
            if snap.batches:
                self.kills_with_batch_in_flight += 1
        view = platform_view(self.platform_store, self.gw)  # read after the outbox: it only grows
        missing = self.accepted(view.resets) - snap.ids - set(view.delivered) - view.dropped
        missing -= _reset_covered(missing, view.resets)
        assert not missing, (
            f"accepted ids neither in the outbox nor at the platform nor dropped: "
            f"{sorted(missing)[:20]} (of {len(missing)}; outbox next_id {snap.next_id})"
        )
        return snap


def _reset_covered(ids: set[int], resets: list[int]) -> set[int]:
    """Ids below a store reset's first_new_id: the quarantined store held them and the reset
    record reports their loss (the platform can list them: below first_new_id, not delivered)."""
    if not resets:
        return set()
    top = max(resets)
    return {i for i in ids if i < top}


@dataclass
class Report:
    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0  # ids delivered in more than one accepted batch
    dropped: int = 0  # accepted, not delivered, named in a gateway.dropped record
    reset_reported: int = 0  # accepted, not delivered, reported by gateway.store_reset
    lost: int = 0
    unknown: int = 0  # delivered but never accepted
    batches: int = 0
    max_alarm_latency: float = 0.0
    alarms: int = 0


def check_platform(ledger: Ledger, counter_sources: Iterable[str] = (),
                   latency_clock_ok: bool = True) -> Report:
    """Verify the platform store against the ledger; assert the guarantees; return figures."""
    store, gw = ledger.platform_store, ledger.gw
    with _ro(store) as c:
        pem = c.execute("SELECT pubkey FROM gateways WHERE gw=?", (gw,)).fetchone()
        raws = c.execute(
            "SELECT b.epoch, b.lane, b.seq, b.hash, b.raw FROM batches b JOIN epochs p "
            "ON p.gw = b.gw AND p.epoch = b.epoch WHERE b.gw=? ORDER BY p.n, b.lane, b.seq",
            (gw,),
        ).fetchall()
        heads = {int(lane): (bytes(ep), int(last)) for lane, ep, last in c.execute(
            "SELECT lane, epoch, last_seq FROM chain WHERE gw=?", (gw,))}
    assert pem is not None, f"{gw} is not registered at the platform"
    key = serialization.load_pem_public_key(bytes(pem[0]))
    assert isinstance(key, Ed25519PublicKey)
    rep = Report(batches=len(raws))
    # Signature and chain, from the raw bytes (the Receiver verified them once already): each
    # lane of each epoch (a new one after a quarantined store) a whole chain from seq 1.
    last: dict[int, tuple[bytes, int, bytes]] = {}  # lane -> (epoch, seq, hash) of its last
    per_id: Counter[int] = Counter()
    for ep, lane, seq, h, raw in raws:
        epoch, lane = bytes(ep), int(lane)
        prev_ep, i, prev = last.get(lane, (epoch, 0, ZERO_HASH))
        if prev_ep != epoch:
            i, prev = 0, ZERO_HASH
        i += 1
        batch = verify_batch(bytes(raw), lambda _kid: key)
        assert batch.epoch == epoch, f"batch {seq}: stored under another epoch"
        assert batch.lane == lane, f"batch {seq}: stored under another lane"
        assert batch.seq == seq == i, f"lane {lane} batch seqs not contiguous at {i}: {seq}"
        assert batch.hash == bytes(h), f"batch {seq}: stored hash does not match its bytes"
        assert batch.prev == prev, f"lane {lane} batch {seq}: prev does not chain to {seq - 1}"
        last[lane] = (epoch, i, batch.hash)
        per_id.update(int(ev["id"]) for ev in batch.events)
    assert {lane: (ep, n) for lane, (ep, n, _) in last.items()} == heads, (
        "a lane's chain head is not its last stored batch")
    rep.duplicates = sum(1 for n in per_id.values() if n > 1)

    view = platform_view(store, gw)
    accepted = ledger.accepted(view.resets)
    delivered = set(view.delivered)
    rep.accepted = len(accepted)
    rep.delivered = len(delivered & accepted)
    undelivered = accepted - delivered
    rep.dropped = len(undelivered & view.dropped)
    reset = _reset_covered(undelivered - view.dropped, view.resets)
    rep.reset_reported = len(reset)
    lost = undelivered - view.dropped - reset
    rep.lost = len(lost)
    unknown = delivered - accepted
    rep.unknown = len(unknown)
    assert not lost, f"LOST accepted ids: {sorted(lost)[:20]} (of {len(lost)})"
    assert not unknown, f"delivered ids never accepted: {sorted(unknown)[:20]}"
    assert rep.duplicates == 0, f"{rep.duplicates} ids delivered by more than one batch"
    assert all(p != ALARM for p in view.drop_priorities), "a drop record names alarms"
    assert not view.dropped & delivered, "ids both delivered and named dropped"

    # Independent of ids: each counter source's delivered values are 0..max without a hole.
    by_src: dict[str, list[float]] = {}
    for ev in view.delivered.values():
        by_src.setdefault(str(ev["src"]), []).append(float(ev["v"]) if isinstance(
            ev["v"], int | float) else -1.0)
    for src in counter_sources:
        values = sorted(by_src.get(src, []))
        assert values, f"nothing delivered from {src}"
        assert values == [float(i) for i in range(len(values))], (
            f"{src}: delivered counter values have holes or repeats: "
            f"{_holes(values)[:10]}"
        )

    alarms = [ev for ev in view.delivered.values() if ev["prio"] == ALARM and
              ev["src"] != "gateway"]
    rep.alarms = len(alarms)
    if latency_clock_ok and alarms:
        rep.max_alarm_latency = max(view.received_at[(ev["epoch"], ev["lane"], int(ev["seq"]))]
                                    - float(ev["t"])
                                    for ev in alarms)
    return rep


def _holes(values: list[float]) -> list[int]:
    have = {int(v) for v in values}
    return [i for i in range(int(max(values)) + 1) if i not in have]


@dataclass
class Summary:
    """Figures accumulated over a pytest session, printed as the fault suite's table."""

    faults: Counter[str] = field(default_factory=Counter)
    totals: Counter[str] = field(default_factory=Counter)
    max_alarm_latency: float = 0.0
    runs: list[tuple[str, Report]] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)  # e.g. soak RSS and fds

    def add(self, test: str, rep: Report) -> None:
        self.runs.append((test, rep))
        for k in ("accepted", "delivered", "duplicates", "dropped", "reset_reported", "lost",
                  "unknown", "batches", "alarms"):
            self.totals[k] += int(getattr(rep, k))
        self.max_alarm_latency = max(self.max_alarm_latency, rep.max_alarm_latency)

    def table(self) -> str:
        lines = ["fault suite summary", "-" * 48, "faults injected:"]
        for kind, n in sorted(self.faults.items()):
            lines.append(f"  {kind:<34}{n:>12}")
        t = self.totals
        rows = [
            ("runs checked", len(self.runs)),
            ("events accepted", t["accepted"]),
            ("delivered", t["delivered"]),
            ("duplicates after dedup", t["duplicates"]),
            ("dropped with records", t["dropped"]),
            ("lost, reported by store_reset", t["reset_reported"]),
            ("lost (must be 0)", t["lost"]),
            ("delivered never accepted", t["unknown"]),
            ("signed batches verified", t["batches"]),
            ("alarms delivered", t["alarms"]),
        ]
        lines += [f"{k:<36}{v:>12}" for k, v in rows]
        lines.append(f"{'max alarm latency (s)':<36}{self.max_alarm_latency:>12.3f}")
        lines += [f"{k:<36}{v:>12}" for k, v in sorted(self.figures.items())]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"faults": dict(self.faults), "totals": dict(self.totals),
                "max_alarm_latency_s": round(self.max_alarm_latency, 3),
                "figures": dict(self.figures),
                "runs": {name: vars(r) for name, r in self.runs}}


SUMMARY = Summary()
