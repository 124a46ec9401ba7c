"""The FUSE side: libfuse3's high-level callbacks (through mfusepy) translated to `Volume` calls.

The mount is set up so that every system call reaches the volume, in order, and nothing the
kernel caches can outlive a cut:

- No writeback cache: each write(2) is a FUSE write before it returns, so an unsynced write is
  in the volume (and lost by a cut) rather than in the kernel. libfuse3 leaves it off by
  default; `init_with_config` clears it anyway.
- Entry, attribute and negative timeouts of 0: names and sizes are looked up again after a cut
  instead of being served from the dentry cache. File pages are dropped on each open (no
  keep_cache) and when the size or mtime seen changes (auto_inval_data, libfuse3's default).
- No direct_io, so shared writable mmap works (SQLite maps the WAL's -shm file). Its pages are
  written back by the kernel (at msync, at unmap, or when a process exits: fuse_vma_close) and
  arrive as ordinary unsynced writes. SQLite never fsyncs -shm and rebuilds it from the WAL
  when the first connection opens the database, so its loss at a cut is what a real disk does.
- No hard_remove: libfuse renames a file unlinked while open to a hidden name (its high-level
  API needs a path for fstat(2)), which the volume takes for the unlink (volume.HIDDEN). And
  nullpath_ok: calls on a handle get the handle, never a path.
- Single-threaded loop: callbacks run one at a time, in arrival order.

mfusepy 3.1 passes no file handle to fuse3's truncate, chmod, chown and utimens, and drops
rename's flags; `_Fuse` overrides those five wrappers so that ftruncate(2) on an unlinked file
and renameat2(RENAME_NOREPLACE) behave.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

# mfusepy loads libfuse 2 when both are installed (Debian's libfuse2 often is); this adapter
# speaks libfuse 3. The variable is read when mfusepy is imported.
os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

import mfusepy  # type: ignore[import-untyped]  # mfusepy ships no type hints (no py.typed)

from branchsim.powerfs.volume import Volume

__all__ = ["serve"]

FUSE_CAP_WRITEBACK_CACHE = 1 << 16  # fuse_common.h


class _Ops:
    """The callbacks mfusepy looks up by name (a plain object: mfusepy's Operations base
    class only adds stubs)."""

    use_ns = True  # times in integer nanoseconds

    def __init__(self, volume: Volume, on_mounted: Callable[[], None]) -> None:
        self.v = volume
        self._on_mounted = on_mounted

    def init_with_config(self, conn: Any, config: Any) -> None:
        config.entry_timeout = config.attr_timeout = config.negative_timeout = 0.0
        config.hard_remove = 0
        config.use_ino = 1
        config.nullpath_ok = 1
        conn.want &= ~FUSE_CAP_WRITEBACK_CACHE
        self._on_mounted()

    @staticmethod
    def _caller() -> tuple[int, int]:
        uid, gid, _pid = mfusepy.fuse_get_context()
        return int(uid), int(gid)

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        return self.v.getattr(path, fh)

    def statfs(self, path: str) -> dict[str, int]:
        return self.v.statfs()

    def readlink(self, path: str) -> str:
        return self.v.readlink(path)

    def mknod(self, path: str, mode: int, dev: int) -> None:
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise OSError(errno.EPERM, "only regular files")  # no devices, fifos or sockets
        self.v.release(self.v.create(path, mode, *self._caller()))

    def mkdir(self, path: str, mode: int) -> None:
        self.v.mkdir(path, mode, *self._caller())

    def symlink(self, path: str, target: str) -> None:
        self.v.symlink(path, target, *self._caller())

    def link(self, path: str, existing: str) -> None:
        self.v.link(existing, path)

    def unlink(self, path: str) -> None:
        self.v.unlink(path)

    def rmdir(self, path: str) -> None:
        self.v.rmdir(path)

    def create(self, path: str, mode: int, flags: int) -> int:
        return self.v.create(path, mode, *self._caller())

    def open(self, path: str, flags: int) -> int:
        return self.v.open(path, flags)

    def opendir(self, path: str) -> int:
        return self.v.opendir(path)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self.v.read(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self.v.write(fh, data, offset)

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> None:
        self.v.fallocate(fh, mode, offset, size)

    def fsync(self, path: str | None, datasync: int, fh: int) -> None:
        self.v.fsync(fh)

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> None:
        self.v.fsync(fh)

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # With use_ino the entry's inode number is ours: 0 would make readdir(3) skip it.
        return [(name, {"st_mode": mode, "st_ino": ino}, 0)
                for name, mode, ino in self.v.readdir(path, fh)]

    # mfusepy registers a callback only where this class has the method; `_Fuse` calls these
    # five with the handle (and rename with its flags) instead of mfusepy's own wrappers.

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self.v.rename(old, new, flags)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        self.v.truncate(path, length, fh)

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        self.v.chmod(path, mode, fh)

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        # uid_t/gid_t -1 ("leave unchanged") arrives as its unsigned value
        self.v.chown(path, -1 if uid == 0xFFFFFFFF else uid, -1 if gid == 0xFFFFFFFF else gid,
                     fh)

    def utimens(self, path: str | None, times: tuple[int, int] | None,
                fh: int | None = None) -> None:
        self.v.utimens(path, times, fh)

    def release(self, path: str | None, fh: int) -> None:
        self.v.release(fh)

    def releasedir(self, path: str | None, fh: int) -> None:
        self.v.release(fh)


class _Fuse(mfusepy.FUSE):  # type: ignore[misc]  # mfusepy is untyped
    """mfusepy's wrappers, with the file handle and rename flags passed on (module docstring)."""

    operations: _Ops

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    @staticmethod
    def _fh(fip: Any) -> int | None:
        return int(fip.contents.fh) if fip else None

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> None:
        self.operations.rename(old.decode(self.encoding, self.errors),
                               new.decode(self.encoding, self.errors), flags)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> None:
        self.operations.truncate(self._path(path), length, self._fh(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> None:
        self.operations.chmod(self._path(path), mode, self._fh(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> None:
        self.operations.chown(self._path(path), uid, gid, self._fh(fip))

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> None:
        times = None
        if buf:
            # libfuse passes UTIME_NOW and UTIME_OMIT as tv_nsec with tv_sec 0
            a, m = buf.contents.actime, buf.contents.modtime
            times = (a.tv_sec * 10**9 + a.tv_nsec, m.tv_sec * 10**9 + m.tv_nsec)
        self.operations.utimens(self._path(path), times, self._fh(fip))


def serve(volume: Volume, mountpoint: str, on_mounted: Callable[[], None]) -> None:
    """Mount `volume` on `mountpoint` and serve it until unmounted (blocks; main thread)."""
    _Fuse(_Ops(volume, on_mounted), mountpoint, foreground=True, nothreads=True,
          fsname="powerfs", subtype="powerfs", allow_other=True, default_permissions=True)
