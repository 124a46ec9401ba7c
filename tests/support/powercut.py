"""What a power cut leaves of a directory, from the real system calls a process made.

A process kill keeps the page cache, so it cannot show what a power cut loses. This replays
a `strace -y` trace of a real process against a model of a file system after a cut: file data
survives only once the file was fsynced after its last write (as in LazyFS). A name (create,
rename, link, unlink) is certain to survive once its directory was fsynced after the change;
before that a cut may keep it or not (ext4 commits directory changes with its journal, every
few seconds, whether the file's data was synced or not). So there are two cuts to ask about:

- `names="lazy"`: no unsynced name change survived. What a write promised must still be there
  (a missing directory fsync shows here: the old file comes back).
- `names="eager"`: every name change survived, the data only where synced. Nothing may be torn
  (a file created or truncated in place, then written, shows here: it is empty after a cut).

`cut_after(trace, dir, before, names)` says, for each name in `dir`, what a cut at the end of
the trace leaves behind it:

    "before"   the file as it was before the traced process ran (assumed durable)
    "new"      a file the process wrote, whole (its data synced)
    "torn"     a file the process wrote, its data not synced: empty or partly written
    (absent)   no such name after the cut

`traced(code, dir)` runs `python -c code` under strace and returns its trace.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["cut_after", "traced"]

CALLS = ("openat", "open", "creat", "write", "pwrite64", "writev", "ftruncate", "truncate",
         "fsync", "fdatasync", "rename", "renameat", "renameat2", "link", "linkat", "unlink",
         "unlinkat")
_LINE = re.compile(r"^(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)")
_FD_PATH = re.compile(r"^-?\d+<(?P<path>[^>]*)>")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def traced(code: str, dir: Path, timeout: float = 60) -> list[str]:
    """The system calls `python -c code` made on files in `dir` or on `dir` itself (strace -y:
    fds shown with their paths)."""
    out = dir.parent / f"{dir.name}.strace"
    subprocess.run(["strace", "-y", "-s", "0", "-o", str(out), "-e", "trace=" + ",".join(CALLS),
                    sys.executable, "-c", code], check=True, timeout=timeout,
                   capture_output=True)
    lines = [line for line in out.read_text().splitlines() if str(dir) in line]
    out.unlink()
    return lines


@dataclass
class _Inode:
    state: str  # "before", or for data written by the process: "new" once synced, else "torn"
    dirty: bool = False


@dataclass
class _Fs:
    live: dict[str, _Inode]  # the names the process sees
    durable: dict[str, _Inode]  # the names a cut would keep
    pending: dict[str, list[tuple[str, str, _Inode | None]]] = field(default_factory=dict)

    def name_op(self, path: str, inode: _Inode | None) -> None:
        """`path` now names `inode` (None: removed); durable when its directory is synced."""
        if inode is None:
            self.live.pop(path, None)
        else:
            self.live[path] = inode
        self.pending.setdefault(str(Path(path).parent), []).append(("set", path, inode))

    def sync_dir(self, dir: str) -> None:
        for _, path, inode in self.pending.pop(dir, []):
            if inode is None:
                self.durable.pop(path, None)
            else:
                self.durable[path] = inode


def _fd_path(arg: str) -> str | None:
    m = _FD_PATH.match(arg.strip())
    return m["path"] if m else None


def cut_after(trace: list[str], dir: Path, before: list[str],
              names: str = "lazy") -> dict[str, str]:
    """What a cut right after the traced lines leaves in `dir` (see the module)."""
    root = str(dir)
    pre = {f"{root}/{n}": _Inode("before") for n in before}
    fs = _Fs(live=dict(pre), durable=dict(pre))
    for line in trace:
        m = _LINE.match(line)
        if not m or int(m["ret"]) < 0:
            continue
        call, args = m["call"], m["args"]
        strings = [bytes(s, "utf-8").decode("unicode_escape") for s in _STR.findall(args)]
        if call in ("openat", "open", "creat"):
            path = next((s for s in strings if s.startswith(root)), None)
            if path is None or "O_DIRECTORY" in args:
                continue
            if path not in fs.live and ("O_CREAT" in args or call == "creat"):
                fs.name_op(path, _Inode("torn"))
            if "O_TRUNC" in args and path in fs.live:
                fs.live[path].state, fs.live[path].dirty = "torn", True
        elif call in ("write", "pwrite64", "writev", "ftruncate"):
            path = _fd_path(args)
            if path in fs.live:
                fs.live[path].state, fs.live[path].dirty = "torn", True
        elif call in ("fsync", "fdatasync"):
            path = _fd_path(args)
            if path is None:
                continue
            if path in fs.live:
                inode = fs.live[path]
                if inode.dirty:
                    inode.state, inode.dirty = "new", False
            fs.sync_dir(path)  # a directory's fsync makes its names durable
        elif call in ("rename", "renameat", "renameat2"):
            old, new = strings[:2]
            if old in fs.live:
                inode = fs.live[old]
                fs.name_op(old, None)
                fs.name_op(new, inode)
        elif call in ("link", "linkat"):
            old, new = strings[:2]
            if old in fs.live:
                fs.name_op(new, fs.live[old])
        elif call in ("unlink", "unlinkat") and strings and strings[0] in fs.live:
            fs.name_op(strings[0], None)
    if names == "eager":
        for pending_dir in list(fs.pending):
            fs.sync_dir(pending_dir)
    return {Path(p).name: inode.state for p, inode in fs.durable.items()
            if str(Path(p).parent) == root}
