"""The audit trail: a bounded, append-only, hash-chained local log, and `audit.*` events.

Each security-relevant fact (configuration loaded or reloaded, operator command, refused
platform command, TLS or authentication failure, integrity failure, clock jump, tamper contact,
store reset) is written twice:

- as one JSON line in the local log (`audit.log`, mode 0640, in a 0750 directory: the service
  user writes, an admin group reads). Each record carries `prev`, the hash of the record before
  it, and `h`, the SHA-256 of its own canonical JSON, so editing, deleting or reordering any
  record breaks the chain (`branch-agent audit verify`). The log is bounded: past `max_bytes`
  it is rotated (`audit.log.1` ... `audit.log.{keep}`), and the chain continues across files;
- as an event of type `audit.*`, priority ALERT, in the outbox, so it also travels in a signed,
  hash-chained batch. The event names the local record (`n`, `h`), so the platform holds the
  chain head and a local truncation is detectable from the platform side too.

If the local log cannot be written (read-only, disk full), the event still goes to the outbox,
and one `audit.degraded` alert says so; alarms are not held up by the audit log, which is only
touched from a worker thread.

Several processes append (the agent, and `branch-agent provision/keygen/wipe` run by an
operator): each append takes an exclusive `flock` on the log and re-reads the chain head.
Operator commands have no outbox: their records become `audit.*` events when the agent next
starts (`AuditForwarder`), each once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import hashlib
import json
import math
import os
import pwd
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog
from pydantic import Field

from agent.core.clock import Clock
from agent.core.config import StrictModel
from agent.core.paths import StateLayout
from agent.core.types import ALERT, TQ_SYNCED, TQ_UNSYNCED, Event

__all__ = [
    "AGENT_ACTORS",
    "DEFAULT_PATH",
    "ZERO",
    "AuditConfig",
    "AuditForwarder",
    "AuditLog",
    "AuditRecord",
    "AuditTrail",
    "AuditWriteError",
    "VerifyResult",
    "config_digest",
    "current_actor",
    "export",
    "main",
    "verify",
]

log = structlog.get_logger(__name__)

DEFAULT_PATH = Path("/var/lib/branch-agent/audit/audit.log")
ZERO = "0" * 64
_TAIL = 16 * 1024  # a record is far smaller; reading this much from the end finds the last one


class AuditConfig(StrictModel):
    """`[audit]`: the local audit log (the `audit.*` events go to the outbox regardless)."""

    path: Path | None = Field(default=None,
                              description="default: {gateway.state_dir}/audit/audit.log")
    max_bytes: int = Field(default=4 * 1024 * 1024, ge=4096,
                           description="rotate the log past this size")
    keep: int = Field(default=4, ge=1, le=100, description="rotated files kept")
    group: str | None = Field(default=None,
                              description="admin group that may read the log (e.g. branch-admin)")


class AuditWriteError(OSError):
    """The local audit log cannot be written (the outbox copy still goes out)."""


@dataclass(frozen=True)
class AuditRecord:
    n: int
    t: float
    type: str
    actor: str
    pid: int
    attrs: dict[str, Any]
    prev: str
    h: str

    def body(self) -> dict[str, Any]:
        return {"n": self.n, "t": self.t, "type": self.type, "actor": self.actor,
                "pid": self.pid, "attrs": self.attrs, "prev": self.prev}


def _digest(body: Mapping[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                       default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def config_digest(doc: Mapping[str, Any]) -> str:
    """SHA-256 of a configuration's canonical JSON (`cfg.model_dump(mode="json")`): what the
    `audit.config_loaded` record holds instead of the configuration itself."""
    return _digest(doc)


def current_actor() -> str:
    """Who is running this process: `user(uid)`, plus the operator behind sudo if any."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    sudo = os.environ.get("SUDO_USER")
    return f"{name}({uid})" + (f" via sudo by {sudo}" if sudo else "")


def _generations(path: Path, keep: int | None = None) -> list[Path]:
    """The log's files, oldest first: audit.log.{k} ... audit.log.1, audit.log."""
    rotated: list[tuple[int, Path]] = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit() and (keep is None or int(suffix) <= keep):
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + [path]


def _last_line(fd: int) -> bytes | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - _TAIL)
    data = os.pread(fd, size - start, start)
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    return lines[-1] if lines else None


class AuditLog:
    """The local log. `append` raises AuditWriteError; reading is `verify` / `export`."""

    def __init__(self, path: Path, *, max_bytes: int = 4 * 1024 * 1024, keep: int = 4,
                 group: str | None = None, wall: Callable[[], float] | None = None) -> None:
        import time

        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.group = group
        self._wall = wall or time.time

    @classmethod
    def from_config(cls, cfg: AuditConfig, state_dir: Path,
                    wall: Callable[[], float] | None = None) -> AuditLog:
        return cls(cfg.path or StateLayout(state_dir).audit_log, max_bytes=cfg.max_bytes,
                   keep=cfg.keep, group=cfg.group, wall=wall)

    def _gid(self) -> int:
        if self.group is None:
            return -1
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.warning("audit.group_unknown", group=self.group)
            return -1

    def _open(self) -> int:
        """Open (creating 0640 in a 0750 directory) for appending; the umask cannot widen it."""
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o750)
            with contextlib.suppress(OSError):
                os.chown(self.path.parent, -1, self._gid())
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        if st.st_size == 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, -1, self._gid())
        return fd

    def _locked_fd(self) -> int:
        """An fd on the current log file under an exclusive lock (re-opened if another process
        rotated the file while we waited for the lock)."""
        while True:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._is_current(fd):
                return fd
            os.close(fd)

    def _is_current(self, fd: int) -> bool:
        """Whether `fd` (locked) is still the log file, not one another process rotated away
        while we waited for the lock."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _head(self, fd: int) -> tuple[int, str]:
        """(n, h) of the last record: in this file, else in the newest rotated one."""
        line = _last_line(fd)
        if line is None:
            older = _generations(self.path, self.keep)[:-1]
            if older:
                with contextlib.suppress(OSError), open(older[-1], "rb") as f:
                    line = _last_line(f.fileno())
        if line is None:
            return 0, ZERO
        try:
            doc = json.loads(line)
            return int(doc["n"]), str(doc["h"])
        except (ValueError, KeyError, TypeError):
            # A damaged tail: keep appending (verify reports the damage), chained to its hash.
            return -1, hashlib.sha256(line).hexdigest()

    def _rotate(self) -> None:
        gens = _generations(self.path)[:-1]
        for p in gens:
            k = int(p.name.rsplit(".", 1)[1])
            if k >= self.keep:
                p.unlink()
        for k in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{k}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{k + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def append(self, type: str, attrs: Mapping[str, Any] | None = None,
               actor: str | None = None) -> AuditRecord:
        """Append one record (fsync'd) and return it. Raises AuditWriteError."""
        try:
            fd = self._locked_fd()
            try:
                n, prev = self._head(fd)
                if os.fstat(fd).st_size >= self.max_bytes:
                    self._rotate()  # we hold the lock on the old inode: writers wait for us
                    os.close(fd)
                    fd = self._locked_fd()
                    # Another writer may have taken the new file's lock first and appended:
                    # the head must be read again under the lock we now hold.
                    n, prev = self._head(fd)
                body: dict[str, Any] = {
                        "n": n + 1 if n >= 0 else 0, "t": self._wall(), "type": type,
                        "actor": actor or current_actor(), "pid": os.getpid(),
                        "attrs": dict(attrs or {}), "prev": prev}
                rec = AuditRecord(**body, h=_digest(body))
                line = json.dumps({**body, "h": rec.h}, sort_keys=True, default=str) + "\n"
                os.write(fd, line.encode())
                os.fsync(fd)
                return rec
            finally:
                os.close(fd)
        except OSError as exc:
            raise AuditWriteError(exc.errno, f"audit log {self.path}: {exc.strerror}") from None

    def read(self) -> tuple[list[bytes], VerifyResult]:
        """Every record line, oldest first (all generations), and their verification, read
        under a shared lock on the current file: appends, and so rotation, wait meanwhile (a
        rotation in the middle of the read would look like removed records). Creates nothing.
        Raises OSError."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                items = list(_records(self.path))  # no current file: nobody to wait for
                return [line for _, _, line in items], _verify(items)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._is_current(fd):
                    items = list(_records(self.path))
                    return [line for _, _, line in items], _verify(items)
            finally:
                os.close(fd)  # also releases the lock


# --- reading: verify and export ---------------------------------------------------------------


@dataclass
class VerifyResult:
    records: int = 0
    first_n: int | None = None
    last_n: int | None = None
    last_h: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_n": self.first_n,
                "last_n": self.last_n, "last_h": self.last_h, "problems": self.problems,
                "notes": self.notes}


def _records(path: Path) -> Iterator[tuple[str, int, bytes]]:
    for p in _generations(path):
        with contextlib.suppress(FileNotFoundError), open(p, "rb") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield p.name, i, line.rstrip(b"\n")


def verify(path: Path) -> VerifyResult:
    """Check every record's hash, the chain between records, and the numbering."""
    return _verify(_records(Path(path)))


def _verify(items: Iterable[tuple[str, int, bytes]]) -> VerifyResult:
    res = VerifyResult()
    prev_h: str | None = None
    prev_n: int | None = None
    for name, lineno, line in items:
        where = f"{name}:{lineno}"
        try:
            doc = json.loads(line)
            body = {k: doc[k] for k in ("n", "t", "type", "actor", "pid", "attrs", "prev")}
            n, h = int(doc["n"]), str(doc["h"])
        except (ValueError, KeyError, TypeError):
            res.problems.append(f"{where}: not an audit record")
            prev_h, prev_n = hashlib.sha256(line).hexdigest(), None
            continue
        if _digest(body) != h:
            res.problems.append(f"{where}: record n={n} was altered (hash mismatch)")
        if prev_h is None:
            if n != 1 or body["prev"] != ZERO:
                res.notes.append(f"{where}: starts at n={n}; older records were rotated away")
        elif body["prev"] != prev_h:
            res.problems.append(f"{where}: chain broken before n={n} (a record was removed, "
                                "inserted or altered)")
        if prev_n is not None and n != prev_n + 1:
            res.problems.append(f"{where}: n={n} follows n={prev_n}")
        res.first_n = n if res.first_n is None else res.first_n
        res.records += 1
        res.last_n, res.last_h, prev_h, prev_n = n, h, h, n
    return res


def export(path: Path, out: IO[str]) -> VerifyResult:
    """Write every record, oldest first, as JSON lines; return the verification of the same."""
    for _name, _lineno, line in _records(Path(path)):
        out.write(line.decode("utf-8", "replace") + "\n")
    return verify(path)


# --- the agent side: local log + outbox events ------------------------------------------------


class AuditTrail:
    """`await trail.record("audit.x", {...})`: the local record (in a worker thread) and the
    `audit.x` event (priority ALERT) through `emit` (the runtime's outbox append)."""

    SOURCE = "agent.audit"

    def __init__(self, local: AuditLog | None, emit: Callable[[Event], Awaitable[Any]],
                 clock: Clock) -> None:
        self.local = local
        self.emit = emit
        self.clock = clock
        self.degraded = False
        self.failures = 0

    async def record(self, type: str, attrs: Mapping[str, Any] | None = None,
                     actor: str | None = None) -> AuditRecord | None:
        """Never raises for a broken audit log; the outbox event goes out either way."""
        actor = actor or current_actor()
        rec: AuditRecord | None = None
        error: str | None = None
        if self.local is not None:
            try:
                if self.degraded:  # the gap in the local log is itself recorded
                    back = await asyncio.to_thread(self.local.append, "audit.recovered",
                                                   {"failures": self.failures}, "agent")
                    self.degraded = False
                    log.warning("audit.recovered", failures=self.failures)
                    await self._emit("audit.recovered", {"failures": self.failures,
                                                         "n": back.n, "h": back.h}, "agent")
                rec = await asyncio.to_thread(self.local.append, type, attrs, actor)
            except AuditWriteError as exc:
                error = str(exc)
        if error is not None:
            self.failures += 1
            if not self.degraded:
                self.degraded = True
                log.error("audit.degraded", error=error)
                await self._emit("audit.degraded", {"error": error}, actor="agent")
        extra = {"n": rec.n, "h": rec.h} if rec is not None else {"n": None}
        await self._emit(type, {**(attrs or {}), **extra}, actor)
        return rec

    async def _emit(self, type: str, attrs: Mapping[str, Any], actor: str) -> None:
        event = Event(src=self.SOURCE, type=type, v=actor, t=self.clock.time(),
                      tq=TQ_SYNCED if self.clock.synchronized() else TQ_UNSYNCED, prio=ALERT,
                      attrs=dict(attrs))
        try:
            await self.emit(event)
        except Exception:  # the outbox reports its own failures; the caller must go on
            log.exception("audit.emit_failed", type=type)


# --- operator records into the outbox -------------------------------------------------------

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
        damage = _digest({"problems": checked.problems}) if checked.problems else None
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
        if not _plain(rec.attrs) or len(json.dumps(rec.attrs)) > _TAIL:
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


# --- `branch-agent audit verify|export` -------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`branch-agent audit {verify,export} [--file PATH]`. Exit 0: intact; 1: tampered;
    2: unreadable."""
    p = argparse.ArgumentParser(prog="branch-agent audit",
                                description="check or export the local audit log")
    p.add_argument("action", choices=["verify", "export"])
    p.add_argument("--file", type=Path, default=DEFAULT_PATH, help=f"default {DEFAULT_PATH}")
    p.add_argument("--json", action="store_true", help="verify: print the result as JSON")
    args = p.parse_args(argv)
    if not args.file.exists():
        print(f"branch-agent audit: {args.file} does not exist", file=sys.stderr)
        return 2
    try:
        res = export(args.file, sys.stdout) if args.action == "export" else verify(args.file)
    except OSError as exc:
        print(f"branch-agent audit: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    report = sys.stdout if args.action == "verify" else sys.stderr
    if args.json and args.action == "verify":
        print(json.dumps(res.as_dict(), indent=2), file=report)
    else:
        state = "intact" if res.ok else "TAMPERED"
        print(f"audit log {args.file}: {state}; {res.records} records "
              f"(n={res.first_n}..{res.last_n}); head {res.last_h}", file=report)
        for line in res.notes:
            print(f"  note: {line}", file=report)
        for line in res.problems:
            print(f"  problem: {line}", file=report)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
