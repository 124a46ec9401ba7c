"""Operator commands' records into the outbox: `AuditForwarder` runs at agent start and commits
each record the agent did not write itself as its `audit.*` event, once, remembering where it
stopped in a cursor file."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.core.types import ALERT, TQ_SYNCED, TQ_UNSYNCED, Event
from agent.security.audit.logfile import TAIL, AuditLog
from agent.security.audit.record import ZERO, AuditRecord, digest
from agent.security.audit.trail import AuditTrail
from agent.security.audit.verification import VerifyResult

__all__ = ["AGENT_ACTORS", "FORWARD_CHUNK", "AuditForwarder"]

log = structlog.get_logger(__name__)

# Actors of the records the running agent writes through AuditTrail, whose events are in the
# outbox already. Operator commands write `current_actor()` ("name(uid)..."), never one of these.
AGENT_ACTORS = frozenset({"agent", "platform", "sensor"})
FORWARD_CHUNK = 256  # records per commit group, and per cursor write, when catching up


def _parse(line: bytes) -> AuditRecord | None:
    """A record whose fields have the types the event needs (verify judges its hash)."""
    try:
        doc = json.loads(line)
        rec = AuditRecord(**{k: doc[k] for k in ("n", "t", "type", "actor", "pid", "attrs",
                                                 "prev", "h")})
    except (ValueError, KeyError, TypeError):
        return None
    ok = (type(rec.n) is int and type(rec.t) in (int, float) and math.isfinite(rec.t)
          and isinstance(rec.type, str) and isinstance(rec.actor, str)
          and isinstance(rec.attrs, dict) and isinstance(rec.h, str))
    return rec if ok else None


def _plain(x: object, depth: int = 0) -> bool:
    """JSON data the wire format carries as it is, checked at least as strictly as the
    platform does (`protocol._check_event`): one edited record that the platform refused as
    malformed would hold up every batch behind it."""
    if x is None or isinstance(x, bool | str):
        return True
    if isinstance(x, int):
        return -(2**63) <= x < 2**63
    if isinstance(x, float):
        return math.isfinite(x)
    if depth >= 4:
        return False
    if isinstance(x, list):
        return all(_plain(v, depth + 1) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in x.items())
    return False


@dataclass(frozen=True)
class _Cursor:
    """The last record read (forwarded or skipped), and the digest of the log's damage last
    alerted on."""

    n: int = 0
    h: str = ZERO
    t: float = 0.0
    reported: str | None = None


class AuditForwarder:
    """`await AuditForwarder(trail, cursor_path, outbox.append_many).run()` at agent start.

    Operator commands (provision, keygen, renew, install_cert, doctor, wipe) run in their own
    short-lived processes, without the outbox: they only append to the local log. This reads
    the log (every generation, oldest first, under a shared lock) and commits each record not
    forwarded yet as its `audit.*` event: priority ALERT, the actor as `v`, the record's own
    time, its attrs plus its `n` and `h` (what `branch-agent audit export` shows). Once each:

    - the cursor file (the last record read, fsync'd) says where the previous start stopped;
    - each record is appended under the idempotency key `audit:{h}`, so after a crash between
      the commit and the cursor write, the next start commits nothing twice (the outbox keeps
      these keys for AUDIT_KEY_TTL, a year);
    - records the agent wrote itself through AuditTrail (AGENT_ACTORS) are in the outbox
      already: skipped.

    A log that does not verify (alerted once per distinct damage, not at every start), a
    cursor record that is gone from the log (truncated, replaced, rewritten) or a new record
    that cannot be forwarded raise one `audit.integrity_failure` alert (`reason` "audit_log",
    the problems); whatever can be read is forwarded all the same. The log is bounded by
    rotation, so is the work here.
    """

    def __init__(self, trail: AuditTrail, cursor_path: Path,
                 append: Callable[[Sequence[Event], str | None], Awaitable[Any]]) -> None:
        self.trail = trail
        self.cursor_path = cursor_path
        self.append = append

    async def run(self) -> int:
        """Forward what is not forwarded yet; return how many records were. Never raises: the
        agent starts whatever the log holds (the outbox reports its own failures)."""
        if self.trail.local is None:
            return 0
        try:
            return await self._run(self.trail.local)
        except Exception:
            log.exception("audit.forward_failed")
            return 0

    async def _run(self, local: AuditLog) -> int:
        cur, problem = self._load()
        problems = [problem] if problem else []
        try:
            lines, checked = await asyncio.to_thread(local.read)
        except OSError as exc:
            lines, checked = [], VerifyResult(problems=[f"cannot read {local.path}: "
                                                        f"{exc.strerror}"])
        todo, found = self._unforwarded(lines, cur)
        problems += found
        plan: list[tuple[AuditRecord, Event | None]] = []
        seen: set[str] = set()
        for rec in todo:
            ev: Event | str | None = None
            if rec.actor not in AGENT_ACTORS and rec.h not in seen:
                seen.add(rec.h)  # a duplicated line (verify names it) goes once
                ev = self._event(rec)
            if isinstance(ev, str):
                problems.append(ev)
                ev = None
            plan.append((rec, ev))
        # `problems` concern this start's records (next time they are behind the cursor); the
        # damage verify finds stays in the log until rotated away: alerted on once, not at
        # every start (a repaired log clears it, so the same damage again is news).
        damage = digest({"problems": checked.problems}) if checked.problems else None
        if problems or damage not in (None, cur.reported):
            problems = checked.problems + problems
            log.error("audit.log_problems", problems=problems[:10], count=len(problems))
            await self.trail.record("audit.integrity_failure",
                                    {"reason": "audit_log", "problems": problems[:10],
                                     "count": len(problems)}, actor="agent")
        cur = _Cursor(cur.n, cur.h, cur.t, damage)
        forwarded = 0
        for i in range(0, len(plan), FORWARD_CHUNK):
            chunk = plan[i:i + FORWARD_CHUNK]
            sends = [(rec, ev) for rec, ev in chunk if ev is not None]
            await asyncio.gather(*(self.append([ev], f"audit:{rec.h}") for rec, ev in sends))
            forwarded += len(sends)
            last = chunk[-1][0]
            cur = _Cursor(last.n, last.h, float(last.t), cur.reported)
            await asyncio.to_thread(self._save, cur)
        if not plan:
            await asyncio.to_thread(self._save, cur)
        if forwarded:
            log.info("audit.forwarded", records=forwarded, last_n=cur.n)
        return forwarded

    def _unforwarded(self, lines: list[bytes],
                     cur: _Cursor) -> tuple[list[AuditRecord], list[str]]:
        """The records after the cursor, and the problems found on the way. Parsed from the end
        back to the cursor only: on a long log that is most of the work saved at each start."""
        records: list[AuditRecord] = []
        malformed = 0
        found = False
        for line in reversed(lines):
            rec = _parse(line)
            if rec is None:
                malformed += 1  # verify names the line
            elif cur.n and rec.n == cur.n and rec.h == cur.h:
                found = True
                break
            else:
                records.append(rec)
        records.reverse()
        problems = [f"{malformed} malformed record(s) not forwarded"] if malformed else []
        if found or cur.n == 0:  # cur.n == 0: nothing forwarded yet, a fresh gateway
            return records, problems
        if records and records[0].n > cur.n:
            if records[0].n > cur.n + 1:
                log.warning("audit.forward_gap", first_unread=cur.n + 1,
                            first_kept=records[0].n, advice="records were rotated away before "
                            "the agent started again; raise [audit] max_bytes or keep")
            return records, problems  # the cursor's record was rotated away; the rest is newer
        # Truncated or replaced: the numbers after the cut are reused, so newer is also by time.
        problems.append(f"the record forwarded last (n={cur.n}, h={cur.h[:16]}) is not in the "
                        "log: it was truncated, replaced or rewritten")
        return [r for r in records if r.n > cur.n or r.t > cur.t], problems

    def _event(self, rec: AuditRecord) -> Event | str:
        """The record's event, or why it cannot be forwarded."""
        if not rec.type.startswith("audit."):
            return f"n={rec.n}: type {rec.type[:40]!r} is not audit.*, not forwarded"
        if not _plain(rec.attrs) or len(json.dumps(rec.attrs)) > TAIL:
            return f"n={rec.n}: attrs not forwardable (nested, huge or non-finite), not forwarded"
        clock = self.trail.clock
        return Event(src=AuditTrail.SOURCE, type=rec.type, v=rec.actor, t=float(rec.t),
                     tq=TQ_SYNCED if clock.synchronized() else TQ_UNSYNCED, prio=ALERT,
                     attrs={**rec.attrs, "n": rec.n, "h": rec.h})

    def _load(self) -> tuple[_Cursor, str | None]:
        try:
            doc = json.loads(self.cursor_path.read_text())
            reported = doc.get("reported")
            return _Cursor(int(doc["n"]), str(doc["h"]), float(doc["t"]),
                           reported if isinstance(reported, str) else None), None
        except FileNotFoundError:
            return _Cursor(), None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return _Cursor(), f"{self.cursor_path} unreadable ({exc}): the log is forwarded again"

    def _save(self, cur: _Cursor) -> None:
        from agent.core.atomic import write_atomic

        doc = {"n": cur.n, "h": cur.h, "t": cur.t, "reported": cur.reported}
        write_atomic(self.cursor_path, json.dumps(doc, sort_keys=True).encode(), 0o600)
