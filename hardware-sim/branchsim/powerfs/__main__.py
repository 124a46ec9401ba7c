"""`python -m branchsim.powerfs MOUNTPOINT`: mount the power-cut file system there and serve its
control socket (control.py) until it is unmounted, or the process gets SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from branchsim.powerfs.control import ControlServer, Switch
from branchsim.powerfs.volume import Volume

log = structlog.get_logger("branchsim.powerfs")

PR_SET_PDEATHSIG = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m branchsim.powerfs",
        description="A FUSE file system that keeps every write in memory until it is synced, "
                    "and on `cut` kills the processes using it and drops what was not synced.")
    p.add_argument("mountpoint", type=Path, help="an existing directory")
    p.add_argument("--control", type=Path,
                   help="the control socket (default: MOUNTPOINT.power, beside the mount)")
    p.add_argument("--capacity", type=int, default=1 << 30,
                   help="bytes of file data it holds before writes fail with ENOSPC (1 GiB)")
    p.add_argument("--kill-timeout", type=float, default=10.0,
                   help="seconds a killed process may take to exit before the cut fails")
    p.add_argument("--ready-fd", type=int,
                   help="write one JSON line to this descriptor once mounted, then close it")
    p.add_argument("--parent", type=int, metavar="PID",
                   help="stop (unmounting) when this process, the parent, exits")
    return p


def _stop_with_parent(parent: int) -> None:
    """SIGTERM when the parent exits (prctl PR_SET_PDEATHSIG): a test run that dies does not
    leave a mount and a daemon behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        raise SystemExit("powerfs: the parent is gone already")


def _claim(path: Path) -> None:
    """Remove a control socket left by a daemon that died; refuse one still answering."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SystemExit(f"powerfs: {path} exists and is not a socket")
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise SystemExit(f"powerfs: another powerfs answers on {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.parent is not None:
        _stop_with_parent(args.parent)
    from agent.core.log import configure_logging

    configure_logging("info", "auto")
    mountpoint = os.path.realpath(args.mountpoint)
    control = Path(os.path.abspath(args.control or mountpoint + ".power"))
    if not os.path.isdir(mountpoint):
        print(f"powerfs: {mountpoint} is not a directory", file=sys.stderr)
        return 2
    if str(control).startswith(mountpoint + "/"):
        print("powerfs: the control socket must be outside the mount", file=sys.stderr)
        return 2
    try:
        from branchsim.powerfs.fuse import serve  # loads libfuse3
    except OSError as exc:
        print(f"powerfs: {exc}: install Debian's fuse3 (`make sysdeps`, or apt-get install "
              "fuse3)", file=sys.stderr)
        return 2
    _claim(control)
    volume = Volume(args.capacity)
    server = ControlServer(str(control), Switch(volume, mountpoint, args.kill_timeout))
    server.start()

    up = []

    def mounted() -> None:
        up.append(True)
        log.info("powerfs.mounted", mountpoint=mountpoint, control=str(control), pid=os.getpid())
        if args.ready_fd is not None:
            os.write(args.ready_fd, json.dumps({"mountpoint": mountpoint, "control": str(control),
                                                "pid": os.getpid()}).encode() + b"\n")
            os.close(args.ready_fd)

    try:
        serve(volume, mountpoint, mounted)
    except RuntimeError as exc:  # mfusepy: fuse_main returned non-zero
        if up:  # libfuse's loop ended by SIGTERM/SIGINT/SIGHUP (it returns the signal): a stop
            log.info("powerfs.stopped_by_signal", mountpoint=mountpoint)
        else:
            print(f"powerfs: mounting {mountpoint} failed ({exc}); it needs /dev/fuse and root "
                  "(or fusermount3 and user_allow_other in /etc/fuse.conf)", file=sys.stderr)
            return 1
    finally:
        # No server.shutdown(): it waits for a poll interval; the process ends its threads.
        server.server_close()
    log.info("powerfs.unmounted", mountpoint=mountpoint, **volume.counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
