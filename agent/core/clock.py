"""Is the wall clock synchronised? A Pi has no RTC: after a power cut it boots at the last saved
time until NTP answers, and events captured then must say so (`tq` = 1)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

__all__ = ["Clock", "SystemClock", "adjtimex_synchronized", "make_clock", "sync_probe"]

class Clock(Protocol):
    """Wall time, monotonic time and whether the wall clock is synchronised (a Pi has no RTC)."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def synchronized(self) -> bool: ...


class SystemClock:
    """The real clock. `synchronized` is decided by a probe chosen in config (see agent.clock)."""

    def __init__(self, synchronized: Callable[[], bool] | None = None) -> None:
        self._sync = synchronized or (lambda: True)

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def synchronized(self) -> bool:
        return self._sync()


TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
_TIME_ERROR = 5  # adjtimex(2): clock not synchronised


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (64-bit layout); only `status`'s return code is used.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


def adjtimex_synchronized() -> bool | None:
    """The kernel's view (read-only adjtimex call); None when it cannot be asked."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        tx = _Timex()
        rc = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return None
    if rc < 0:
        return None
    return rc != _TIME_ERROR


def sync_probe(mode: str) -> Callable[[], bool]:
    """`auto`: systemd-timesyncd's flag file if timesyncd runs, else the kernel (adjtimex);
    `synced` / `unsynced`: fixed (tests, or a gateway with a GPS clock); `file:PATH`: the clock
    counts as synchronised while PATH exists (tests fake time sync by creating the file)."""
    if mode == "synced":
        return lambda: True
    if mode == "unsynced":
        return lambda: False
    if mode.startswith("file:"):
        path = Path(mode[5:])
        return path.exists

    def auto() -> bool:
        if TIMESYNC_FLAG.parent.is_dir():
            return TIMESYNC_FLAG.exists()
        kernel = adjtimex_synchronized()
        return bool(kernel) if kernel is not None else False

    return auto


def make_clock(mode: str) -> SystemClock:
    return SystemClock(synchronized=_cached(sync_probe(mode)))


def _cached(probe: Callable[[], bool], ttl: float = 5.0) -> Callable[[], bool]:
    """Probing costs a syscall or a stat and events arrive by the thousand: re-probe every ttl s."""
    state = {"at": -1e18, "value": False}

    def cached() -> bool:
        now = time.monotonic()
        if now - state["at"] >= ttl:
            state["value"] = probe()
            state["at"] = now
        return bool(state["value"])

    return cached


if os.name != "posix":  # pragma: no cover - the agent runs on Linux only
    raise ImportError("agent.core.clock supports Linux only")
