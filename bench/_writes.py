"""Where a process's writes go: `strace` output attributed per file and per cause.

Two halves, used by bench/footprint.py:

* As the agent's main, ``python bench/_writes.py -m agent.ops.cli run ...`` runs the module with
  every SQLite statement announced as a write of ``SQL <statement start>`` to /dev/null
  (sqlite3's trace callback), so that strace shows which statement a WAL write, fsync or
  checkpoint follows. Those writes reach no storage (/proc/PID/io ``write_bytes`` does not count
  them) and the statements run unchanged.
* `attribute` reads ``strace -f -y -ttt -s 96 -e trace=...`` output (`STRACE_ARGS`) and sums,
  per file and per cause, the bytes the syscalls wrote, the 4 KiB pages they dirtied (a page
  counts again only after an fsync of its file cleaned it: what write_bytes counts, as far as
  syscalls show it; the -shm file is written through mmap and is not seen), the fsyncs, and the
  outbox's transactions and WAL frames.

Causes: an outbox transaction is named by its first data-changing statement (`CAUSES`); WAL
frames belong to the transaction that wrote them; writes to ``outbox.db``, its fsyncs, the WAL
header (32 bytes at offset 0, after a checkpoint restarted the WAL) and WAL truncation are the
checkpoint; the other files are their own cause (status.json, chain.json, the audit log, the
stdout log), a directory fsync belonging to the file renamed into it just before.
"""

from __future__ import annotations

import os
import re
import runpy
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CAUSES", "CHECKPOINT", "INSERT", "STRACE_ARGS", "Attribution", "Tally", "attribute"]

PAGE = 4096  # the outbox's page_size (SQLite's default) and the OS page
FRAME_HEADER = 24  # a WAL frame: 24-byte header (page number first), then the page
MARK = "SQL "
STRACE_ARGS = ["-f", "-y", "-ttt", "-xx", "-s", "96", "-e",
               "trace=write,pwrite64,writev,pwritev,fsync,fdatasync,ftruncate,rename,renameat2"]

CHECKPOINT = "checkpoint (WAL -> outbox.db)"
INSERT = "event commit (group commit: rows or a direct batch)"
# (statement prefix, cause), first match wins; statements that change nothing are not listed.
CAUSES: list[tuple[str, str]] = [
    ("INSERT INTO events", INSERT),
    ("INSERT OR IGNORE INTO ingest_keys", INSERT),
    ("INSERT INTO batches(seq, hash, created, count, top_prio, data, held)", INSERT),
    ("UPDATE events SET batch", "batch claim (UPDATE events, INSERT batches, meta)"),
    ("DELETE FROM events WHERE batch", "ack (DELETE events, batches, meta)"),
    ("DELETE FROM events WHERE id IN", "quota eviction"),
    ("DELETE FROM ingest_keys", "idempotency key prune"),
    ("UPDATE meta SET value=value", "writable check (start-up)"),
    ("PRAGMA wal_checkpoint", CHECKPOINT),
]
_RANK = {c: i for i, (_, c) in reversed(list(enumerate(CAUSES)))}
_CHANGING = ("INSERT", "UPDATE", "DELETE", "REPLACE", "PRAGMA wal_checkpoint", "CREATE", "DROP")


# ------------------------------------------------------------------ the announcer (agent side)

def _announce_main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: _writes.py -m MODULE [ARGS...]")
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    connect = sqlite3.connect

    def announce(sql: str) -> None:
        os.write(null, (MARK + " ".join(sql[:80].split())).encode(errors="replace"))

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.set_trace_callback(announce)
        return conn

    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    sqlite3.connect = traced  # type: ignore[assignment]  # the instrumentation itself
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# ------------------------------------------------------------------ the parser (bench side)

@dataclass(slots=True)
class Tally:
    syscall_bytes: int = 0  # bytes the write syscalls were given
    page_bytes: int = 0  # 4 KiB pages they dirtied (clean before), x 4096
    writes: int = 0
    fsyncs: int = 0
    txns: int = 0  # outbox transactions that wrote to the WAL (causes only)
    frames: int = 0  # WAL frames (page images) they wrote

    def add(self, other: Tally) -> None:
        for f in ("syscall_bytes", "page_bytes", "writes", "fsyncs", "txns", "frames"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass(slots=True)
class Attribution:
    seconds: float
    by_file: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    by_cause: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    frames_per_txn: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # cause -> database page number -> WAL frames holding that page (from the frame headers)
    frame_pages: dict[str, dict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    owners: dict[int, str] = field(default_factory=dict)  # page -> table or index (the caller)

    @property
    def total(self) -> Tally:
        t = Tally()
        for v in self.by_file.values():
            t.add(v)
        return t


_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)")
_FD = re.compile(r"^(-?\d+)<([^>]*)>")
_TMP = re.compile(r"^\.(.+)\.\d+\.\d+\.tmp$")  # agent.core.atomic's temporary names
_STR = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')  # -xx: every byte as \xHH


def _bytes(args: str) -> bytes:
    """The (first 96) bytes of the string argument, as strace -xx printed them."""
    m = _STR.search(args)
    return bytes.fromhex(m.group(1).replace("\\x", "")) if m else b""


def _unhex(text: str) -> str:
    """A path as strace -xx printed it (\\xHH for every byte)."""
    if "\\x" not in text:
        return text
    return bytes.fromhex(text.replace("\\x", "")).decode(errors="replace")


def file_name(path: str) -> str | None:
    """The file a path counts under, None for what is not storage (sockets, pipes, /dev)."""
    if not path.startswith("/") or path.startswith(("/dev/", "/proc/", "/sys/")):
        return None
    base = path.rsplit("/", 1)[-1]
    m = _TMP.match(base)
    if m:
        base = m.group(1)
    if "/audit/" in path:
        return "audit log"
    if base.endswith(".log"):
        return f"{base} (stdout: journald in production)"
    return base


def cause_of(sql: str) -> str | None:
    for prefix, cause in CAUSES:
        if sql.startswith(prefix):
            return cause
    if sql.startswith(_CHANGING):
        return "other SQL: " + sql[:40]
    return None


def _joined(lines: Iterable[str]) -> Iterable[tuple[int, float, str]]:
    """(pid, time, 'call(args) = ret') with strace's unfinished/resumed halves joined."""
    pending: dict[int, str] = {}
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if m is None:
            continue
        pid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        if rest.startswith("<... "):
            head = pending.pop(pid, None)
            if head is None:
                continue
            rest = head + rest.split("resumed>", 1)[1]
        yield pid, t, rest


def attribute(lines: Iterable[str], seconds: float) -> Attribution:
    out = Attribution(seconds)
    dirty: dict[str, set[int]] = defaultdict(set)  # path -> pages dirtied since its last fsync
    pos: dict[str, int] = defaultdict(int)  # path -> where a plain write() lands (files we see
    # written from their start: the temporary files; O_APPEND logs are approximated)
    cause: dict[int, str | None] = {}  # thread -> cause of its open transaction
    in_txn: dict[int, bool] = {}
    txn_frames: dict[int, int] = defaultdict(int)
    last_small: dict[int, str] = {}  # thread -> the last non-database file it wrote
    page_of: dict[int, int] = {}  # thread -> page number in the frame header it just wrote

    def close_txn(pid: int) -> None:
        c = cause.get(pid)
        if c is not None and txn_frames[pid]:
            out.by_cause[c].txns += 1
            out.frames_per_txn[c].append(txn_frames[pid])
        txn_frames[pid] = 0

    for pid, _t, rest in _joined(lines):
        m = _CALL.match(rest)
        if m is None:
            continue
        call, args, ret = m.group(1), m.group(2), int(m.group(3))
        if call in ("rename", "renameat2"):
            continue
        fd = _FD.match(args)
        if fd is None:
            continue
        path = _unhex(fd.group(2))
        if path == os.devnull and call == "write":
            data = _bytes(args)
            if not data.startswith(MARK.encode()):
                continue
            sql = data[len(MARK):].decode(errors="replace")
            if sql.startswith("BEGIN"):
                close_txn(pid)
                in_txn[pid], cause[pid] = True, None
            elif sql.startswith(("COMMIT", "ROLLBACK")):
                in_txn[pid] = False  # the WAL writes follow (they happen inside COMMIT)
            else:
                c = cause_of(sql)
                if c is None:
                    continue
                if in_txn.get(pid):
                    # the earliest cause in CAUSES names the transaction (a commit that also
                    # deletes acknowledged batches is a commit)
                    now = cause.get(pid)
                    if now is None or _RANK.get(c, 99) < _RANK.get(now, 99):
                        cause[pid] = c
                else:  # an autocommit statement: its own transaction
                    close_txn(pid)
                    cause[pid] = c
            continue
        name = file_name(path)
        if name is None or ret < 0:
            continue
        t = Tally()
        if call in ("fsync", "fdatasync"):
            t.fsyncs = 1
            dirty.pop(path, None)
        elif call == "ftruncate":
            pass
        else:
            n = ret
            if call in ("pwrite64", "pwritev"):
                off = int(args.rsplit(",", 1)[1])
            else:
                off = pos[path]
                pos[path] = off + n
            t.writes, t.syscall_bytes = 1, n
            if n:
                pages = set(range(off // PAGE, (off + n - 1) // PAGE + 1))
                t.page_bytes = len(pages - dirty[path]) * PAGE
                dirty[path] |= pages
        # the cause
        if name == "outbox.db-wal":
            is_frame = call == "pwrite64" and ret == PAGE
            header = call == "pwrite64" and args.rsplit(",", 1)[1].strip() == "0"
            if call == "pwrite64" and ret == FRAME_HEADER and not header:
                page_of[pid] = int.from_bytes(_bytes(args)[:4], "big")
            if call == "ftruncate" or header or (call in ("fsync", "fdatasync")
                                                  and not txn_frames[pid]):
                c = CHECKPOINT  # (a checkpoint syncs the WAL before copying it)
            else:
                c = cause.get(pid) or "other SQL (unannounced)"
            if is_frame:
                txn_frames[pid] += 1
                t.frames = 1
                out.frame_pages[c][page_of.pop(pid, 0)] += 1
            if call in ("fsync", "fdatasync") and c != CHECKPOINT:
                close_txn(pid)
        elif name in ("outbox.db", "outbox.db-shm", "outbox.db-journal"):
            c = CHECKPOINT if name == "outbox.db" else name
        elif call in ("fsync", "fdatasync") and os.path.isdir(path):
            # a directory (state dir) fsynced after a rename into it: the file renamed
            c = last_small.get(pid, "directory fsync")
            name = last_small.get(pid, name)
        else:
            c = name
            last_small[pid] = name
        out.by_file[name].add(t)
        out.by_cause[c].add(t)
    for pid in list(txn_frames):
        close_txn(pid)
    return out


if __name__ == "__main__":
    _announce_main()
