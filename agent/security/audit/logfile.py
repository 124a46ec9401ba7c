"""The local log file: each append takes an exclusive `flock`, re-reads the chain head, writes
one JSON line and fsyncs it; past `max_bytes` the file is rotated and the chain continues in the
new one. Reading (`AuditLog.read`) waits for appends under a shared lock."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.core.atomic import fsync_dir
from agent.core.paths import StateLayout
from agent.security.audit.record import ZERO, AuditRecord, current_actor, digest
from agent.security.audit.verification import VerifyResult, check, generations, records
from agent.security.config import AuditConfig

__all__ = ["TAIL", "AuditLog", "AuditWriteError"]

log = structlog.get_logger(__name__)

TAIL = 16 * 1024  # a record is far smaller; reading this much from the end finds the last one


class AuditWriteError(OSError):
    """The local audit log cannot be written (the outbox copy still goes out)."""


def _last_line(fd: int) -> bytes | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - TAIL)
    data = os.pread(fd, size - start, start)
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    return lines[-1] if lines else None


class AuditLog:
    """The local log. `append` raises AuditWriteError; reading is `verify` / `export`."""

    def __init__(self, path: Path, *, max_bytes: int = 4 * 1024 * 1024, keep: int = 4,
                 group: str | None = None, wall: Callable[[], float] | None = None) -> None:
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
        """Open (creating 0640 in a 0750 directory) for appending; the umask cannot widen it.
        A directory or file created here is made durable (its parent fsynced) before the first
        record goes in: each record is fsynced, and a power cut must not take its name away
        (tests/faults/test_powercut.py showed the whole log gone after a cut)."""
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o750)
            with contextlib.suppress(OSError):
                os.chown(self.path.parent, -1, self._gid())
            fsync_dir(self.path.parent.parent)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        if st.st_size == 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, -1, self._gid())
        if created:
            try:
                fsync_dir(self.path.parent)
            except OSError:
                os.close(fd)
                raise
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
            older = generations(self.path, self.keep)[:-1]
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
        gens = generations(self.path)[:-1]
        for p in gens:
            k = int(p.name.rsplit(".", 1)[1])
            if k >= self.keep:
                p.unlink()
        for k in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{k}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{k + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        fsync_dir(self.path.parent)  # the renames, before the new file takes records

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
                rec = AuditRecord(**body, h=digest(body))
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
                items = list(records(self.path))  # no current file: nobody to wait for
                return [line for _, _, line in items], check(items)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._is_current(fd):
                    items = list(records(self.path))
                    return [line for _, _, line in items], check(items)
            finally:
                os.close(fd)  # also releases the lock
