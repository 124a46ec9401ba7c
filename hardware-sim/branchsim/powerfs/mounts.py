"""The mount table: whether a path is a FUSE mount point, and detaching one."""

from __future__ import annotations

import ctypes
import os
import re

__all__ = ["detach", "is_mounted"]

MNT_DETACH = 2


def is_mounted(path: str) -> bool:
    """Whether `path` (absolute, resolved) is a mount point in this mount namespace. Read from
    /proc/self/mountinfo rather than stat(2): a mount whose daemon died answers stat with
    ENOTCONN."""
    want = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # field 5 is the mount point, with space, tab, newline and backslash octal-escaped
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[4])
            if point == want:
                return True
    return False


def detach(path: str) -> None:
    """Lazily unmount `path` (umount2 MNT_DETACH, as `fusermount3 -u -z`): it leaves the
    namespace at once; a FUSE daemon's loop ends when the last open file on it is closed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2({path}): {os.strerror(err)}")
