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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import hashlib
import json
import os
import pwd
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog
from pydantic import Field

from agent.events import ALERT, TQ_SYNCED, TQ_UNSYNCED, Event
from drivers.base import Clock
from drivers.configbase import StrictModel

__all__ = [
    "DEFAULT_PATH",
    "ZERO",
    "AuditConfig",
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
        return cls(cfg.path or state_dir / "audit" / "audit.log", max_bytes=cfg.max_bytes,
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
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

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
    res = VerifyResult()
    prev_h: str | None = None
    prev_n: int | None = None
    for name, lineno, line in _records(Path(path)):
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
