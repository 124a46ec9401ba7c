"""The processes a power cut takes down: who uses a mount, and killing them for certain.

A process uses the mount when its working directory or root is under it, when it holds a file
descriptor on a file under it, or when it has a file under it mapped (/proc/PID/maps: a mapping
outlives the descriptor it was made from). Killing is SIGKILL through a pidfd (no pid reuse
race), then a wait until each process has exited: by then its descriptors are closed and its
shared mappings written back (the kernel's exit path does both before the process becomes a
zombie), so no write of the dead process can reach the file system after the cut.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterable

__all__ = ["group_members", "kill", "kill_users", "users"]


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount + "/")


def _use(pid: int, mount: str) -> str | None:
    """How `pid` uses `mount` ("cwd", "fd 7", "mmap ..."), or None."""
    base = f"/proc/{pid}"
    for link in ("cwd", "root"):
        try:
            if _under(os.readlink(f"{base}/{link}"), mount):
                return link
        except OSError:
            pass  # gone, a zombie, or a kernel thread
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            if _under(os.readlink(f"{base}/fd/{fd}"), mount):
                return f"fd {fd}"
        except OSError:
            pass  # closed meanwhile
    try:
        with open(f"{base}/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and _under(parts[5].rstrip("\n"), mount):
                    return f"mmap {parts[5].strip()}"
    except OSError:
        pass
    return None


def users(mount: str, exclude: Iterable[int] = ()) -> dict[int, str]:
    """Every process using `mount` (an absolute, resolved path), with how it uses it."""
    skip = {os.getpid(), *exclude}
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in skip and (how := _use(int(name), mount)):
            found[int(name)] = how
    return found


def group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid`."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                # the command name is in parentheses and may hold spaces: fields follow the ")"
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def kill(pids: Iterable[int], timeout: float) -> list[int]:
    """SIGKILL each process and wait until all have exited; the pids that were alive."""
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
        for fd in fds.values():
            # one that exited meanwhile is seen by the poll below at once
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        poller = select.poll()
        for fd in fds.values():
            poller.register(fd, select.POLLIN)
        waiting = set(fds.values())
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                alive = sorted(p for p, fd in fds.items() if fd in waiting)
                raise TimeoutError(f"processes {alive} did not exit within {timeout} s of "
                                   "SIGKILL (stuck in the kernel? see /proc/PID/stack)")
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting.discard(fd)
        return sorted(fds)
    finally:
        for fd in fds.values():
            os.close(fd)


def kill_users(mount: str, timeout: float, exclude: Iterable[int] = ()) -> list[int]:
    """Kill every process using `mount` until none is left (a process may fork, passing its
    descriptors on, between a scan and its death): the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while found := users(mount, exclude):
        killed += kill(found, max(0.0, deadline - time.monotonic()))
    return sorted(killed)
