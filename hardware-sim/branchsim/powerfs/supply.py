"""`PowerSupply`: the power-cut file system as a context manager, for tests and tools.

    with PowerSupply(tmp_path / "state") as power:
        ...                  # run processes that keep their files there
        power.cut()          # they are SIGKILLed, what they did not sync is gone
        ...                  # restart them on what is left

It starts `python -m branchsim.powerfs` as a process of its own (FUSE callbacks must not wait
on the caller's GIL or event loop), waits until the kernel has the mount (the daemon reports it
from FUSE's init, on a pipe), and on exit unmounts it and stops the daemon, by SIGTERM then
SIGKILL if it does not go; a mount left behind by a dead daemon is detached. Should the caller
die first, the daemon gets SIGTERM (PR_SET_PDEATHSIG: when the *thread* that entered the
`with` ends, so enter it from a thread that outlives the block) and unmounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from branchsim.powerfs.control import LastCut, PowerControl, PowerFsError, Stats
from branchsim.powerfs.mounts import detach, is_mounted

__all__ = ["PowerSupply", "fuse_unavailable"]


def fuse_unavailable() -> str | None:
    """Why this machine cannot mount a power-cut file system (no /dev/fuse, not root), or None.
    A missing libfuse3 is not such a reason: it is installed by `make sysdeps`, and the daemon
    says so when it is missing."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (FUSE is not available in this kernel or container)"
    if os.geteuid() != 0:
        return "not root: mounting FUSE with allow_other needs root"
    return None


class PowerSupply:
    """Mount the power-cut file system on `mountpoint` (created if missing) for a `with` block."""

    def __init__(self, mountpoint: Path, *, capacity: int = 1 << 30, timeout: float = 10.0,
                 python: str = sys.executable) -> None:
        self.mountpoint = Path(os.path.realpath(mountpoint))
        self.capacity = capacity
        self.timeout = timeout
        self.python = python
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._control: PowerControl | None = None

    @property
    def control(self) -> PowerControl:
        if self._control is None:
            raise PowerFsError("the power supply is not on (use it in a `with` block)")
        return self._control

    @property
    def log(self) -> str:
        """What the daemon logged so far."""
        if self._dir is None:
            return ""
        return (self._dir / "powerfs.log").read_text(errors="replace")

    def cut(self, pids: list[int] | None = None, pgid: int | None = None) -> LastCut:
        return self.control.cut(pids, pgid)

    def sync(self) -> None:
        self.control.sync()

    def stats(self) -> Stats:
        return self.control.stats()

    def wait(self, timeout: float) -> int:
        """Wait for the daemon to exit (after `unmount` or a signal): its exit code."""
        if self._proc is None:
            raise PowerFsError("the power supply is not on (use it in a `with` block)")
        return self._proc.wait(timeout)

    def __enter__(self) -> PowerSupply:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        # A short path of its own: a unix socket path is limited to 107 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="powerfs-"))
        control = self._dir / "control"
        ready_r, ready_w = os.pipe()
        try:
            with open(self._dir / "powerfs.log", "wb") as log:
                self._proc = subprocess.Popen(
                    [self.python, "-m", "branchsim.powerfs", str(self.mountpoint),
                     "--control", str(control), "--capacity", str(self.capacity),
                     "--ready-fd", str(ready_w), "--parent", str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(ready_w,))
            os.close(ready_w)
            ready_w = -1
            line = self._read_line(ready_r)
            if not line:
                raise PowerFsError(f"powerfs did not mount {self.mountpoint} (exit "
                                   f"{self._proc.poll()}):\n{self.log}")
            self.pid = int(json.loads(line)["pid"])
            self._control = PowerControl(control)
        except BaseException:
            self._stop()
            raise
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)
        return self

    def _read_line(self, fd: int) -> bytes:
        """One line from the readiness pipe; b"" if the daemon closed it (died) first."""
        data = b""
        deadline = time.monotonic() + self.timeout
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise PowerFsError(f"powerfs did not mount {self.mountpoint} within "
                                   f"{self.timeout} s:\n{self.log}")
            chunk = os.read(fd, 4096)
            if not chunk:
                return b""
            data += chunk
        return data

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def _stop(self) -> None:
        """Unmount, stop the daemon, remove the control directory. Idempotent."""
        proc, self._proc = self._proc, None
        control, self._control = self._control, None
        if proc is not None:
            if control is not None and proc.poll() is None:
                with contextlib.suppress(OSError, PowerFsError):  # then SIGTERM does it
                    control.unmount()
            # unmounted: it exits once the last file open there is closed; else SIGTERM
            # (libfuse ends its loop), else SIGKILL
            for stop in (None, proc.terminate, proc.kill):
                if stop is not None:
                    stop()
                try:
                    proc.wait(self.timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if is_mounted(str(self.mountpoint)):
            detach(str(self.mountpoint))  # the daemon died: "transport endpoint not connected"
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
