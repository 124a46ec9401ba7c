"""The power switch: a unix socket beside (never inside) the mount, one command per line, one
JSON object per reply line.

    cut               SIGKILL every process using the mount, then drop everything not durable
    cut pids 12 34    SIGKILL those processes only, then drop
    cut pgid 12       SIGKILL that process group, then drop
    sync              make everything durable (sync(2); FUSE does not pass syncfs on)
    stats             counters: bytes written, writes, fsyncs, dir_fsyncs, syncs, cuts, last_cut
    unmount           detach the mount; the daemon exits when the last open file is closed

A reply is `{"ok": true, ...}` or `{"error": "..."}`. By shell: `echo cut | socat - UNIX:PATH`.
`PowerControl` is the Python client. A `cut` asked by a process that itself uses the mount is
refused (it would be killed before reading the answer).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypedDict

import structlog

from branchsim.powerfs.mounts import detach
from branchsim.powerfs.users import group_members, kill, kill_users, users
from branchsim.powerfs.volume import Volume

__all__ = ["ControlServer", "LastCut", "PowerControl", "PowerFsError", "Stats", "Switch"]

log = structlog.get_logger(__name__)


class PowerFsError(RuntimeError):
    """A command the power-cut file system refused or could not carry out."""


class LastCut(TypedDict):
    killed: list[int]
    bytes_discarded: int  # written since their file's fsync, plus files whose name was lost
    names_undone: int  # directory entries put back or removed
    files_lost: int  # files whose name did not survive
    seconds: float  # from the first SIGKILL to the durable state in place


class Stats(TypedDict):
    bytes_written: int
    writes: int
    fsyncs: int  # fsync/fdatasync of files
    dir_fsyncs: int
    syncs: int
    cuts: int
    last_cut: LastCut | None


def _nothing() -> None:
    """What a command does after its reply, for all but unmount."""


class Switch:
    """The commands, on the daemon's side."""

    def __init__(self, volume: Volume, mountpoint: str, kill_timeout: float) -> None:
        self.volume = volume
        self.mountpoint = mountpoint
        self.kill_timeout = kill_timeout
        self.last_cut: LastCut | None = None
        self._cutting = threading.Lock()  # one cut at a time

    def command(self, words: list[str], peer: int) -> tuple[dict[str, Any], Callable[[], None]]:
        """The reply, and what to do once it is sent."""
        match words:
            case ["cut"]:
                return self.cut(None, peer), _nothing
            case ["cut", "pids", *pids] if pids and all(p.isdigit() for p in pids):
                return self.cut([int(p) for p in pids], peer), _nothing
            case ["cut", "pgid", pgid] if pgid.isdigit():
                os.killpg(int(pgid), 0)  # ProcessLookupError when there is no such group
                return self.cut(group_members(int(pgid)), peer, pgid=int(pgid)), _nothing
            case ["sync"]:
                self.volume.sync_all()
                return {"ok": True}, _nothing
            case ["stats"]:
                with self.volume.lock:
                    counters = dict(self.volume.counters)
                return {"ok": True, **counters, "last_cut": self.last_cut}, _nothing
            case ["unmount"]:
                return {"ok": True}, lambda: detach(self.mountpoint)
        raise ValueError(f"unknown command {' '.join(words)!r}: cut [pids N... | pgid N], "
                         "sync, stats, unmount")

    def cut(self, pids: list[int] | None, peer: int, pgid: int | None = None) -> dict[str, Any]:
        with self._cutting:
            if pids is None and (how := users(self.mountpoint).get(peer)):
                raise PowerFsError(f"the caller (pid {peer}) uses the mount ({how}): a cut "
                                   "would kill it before it reads the answer; close its files "
                                   "there, or name the pids to kill")
            start = time.monotonic()
            if pids is None:
                killed = kill_users(self.mountpoint, self.kill_timeout)
            else:
                if pgid is not None:
                    os.killpg(pgid, signal.SIGKILL)  # also what it forks while we wait
                killed = kill(pids, self.kill_timeout)
            report = self.volume.cut()
            self.last_cut = LastCut(killed=killed, bytes_discarded=report.bytes_discarded,
                                    names_undone=report.names_undone,
                                    files_lost=report.files_lost,
                                    seconds=round(time.monotonic() - start, 6))
        log.info("powerfs.cut", mountpoint=self.mountpoint, **self.last_cut)
        return {"ok": True, **self.last_cut}


class _Handler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        creds = self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                           struct.calcsize("3i"))
        peer = struct.unpack("3i", creds)[0]
        for line in self.rfile:
            after = _nothing
            try:
                reply, after = self.server.switch.command(line.decode().split(), peer)
            except (OSError, ValueError, RuntimeError) as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()
            after()


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves the switch on `path` from threads of its own (started by `start`)."""

    daemon_threads = True

    def __init__(self, path: str, switch: Switch) -> None:
        self.switch = switch
        self.path = path
        super().__init__(path, _Handler)

    def start(self) -> None:
        def run() -> None:
            # Termination signals belong to the FUSE loop's thread: libfuse's handler ends the
            # loop only when the signal interrupts that thread's read of /dev/fuse.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT,
                                                      signal.SIGHUP})
            self.serve_forever(poll_interval=0.5)
        threading.Thread(target=run, name="powerfs-control", daemon=True).start()

    def server_close(self) -> None:
        super().server_close()
        Path(self.path).unlink(missing_ok=True)


class PowerControl:
    """The client: one connection per command."""

    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def _ask(self, command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.sendall(command.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise PowerFsError(f"powerfs closed the control socket during {command!r}")
                data += chunk
        reply: dict[str, Any] = json.loads(data)
        if "error" in reply:
            raise PowerFsError(reply["error"])
        return reply

    def cut(self, pids: Iterable[int] | None = None, pgid: int | None = None) -> LastCut:
        """Cut the power: kill (every process using the mount, or `pids`, or the process group
        `pgid`), then only what was durable remains."""
        if pids is not None:
            command = "cut pids " + " ".join(str(p) for p in pids)
        elif pgid is not None:
            command = f"cut pgid {pgid}"
        else:
            command = "cut"
        reply = self._ask(command)
        return LastCut(killed=reply["killed"], bytes_discarded=reply["bytes_discarded"],
                       names_undone=reply["names_undone"], files_lost=reply["files_lost"],
                       seconds=reply["seconds"])

    def sync(self) -> None:
        """Make everything durable, as sync(2) does on a disk."""
        self._ask("sync")

    def stats(self) -> Stats:
        r = self._ask("stats")
        return Stats(bytes_written=r["bytes_written"], writes=r["writes"], fsyncs=r["fsyncs"],
                     dir_fsyncs=r["dir_fsyncs"], syncs=r["syncs"], cuts=r["cuts"],
                     last_cut=r["last_cut"])

    def unmount(self) -> None:
        self._ask("unmount")
