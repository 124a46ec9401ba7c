"""The storage seam: the filesystem under the store, as far as the outbox uses it.

The outbox opens its database and keeps a reserve file through a `Storage`; `OsStorage` makes
the real calls. A test hands the outbox one that models a full disk (tests/test_outbox.py), so
that what a full disk does to the outbox is checked without root; the real-disk check is the
4 MiB tmpfs of tests/faults/test_disk.py.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Protocol

__all__ = ["OsStorage", "Storage"]


class Storage(Protocol):
    def connect(self, path: Path) -> sqlite3.Connection:
        """A connection to the database at `path`, in autocommit mode (isolation_level=None:
        the outbox opens its own transactions), used from one thread."""
        ...

    def preallocate(self, path: Path, size: int) -> None:
        """Make `path` hold `size` bytes of allocated disk space (creating it with mode 0600),
        or raise OSError (ENOSPC when the disk has no room)."""
        ...

    def release(self, path: Path) -> None:
        """Give the space of `path` back to the filesystem; nothing to do if it is gone."""
        ...


class OsStorage:
    """The real filesystem."""

    def connect(self, path: Path) -> sqlite3.Connection:
        return sqlite3.connect(path, isolation_level=None, check_same_thread=True)

    def preallocate(self, path: Path, size: int) -> None:
        if path.exists() and path.stat().st_size >= size:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            # Allocated blocks, not a sparse file: only those are really given back on release.
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)

    def release(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
