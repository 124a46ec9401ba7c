"""The one way the agent writes a small file: whole or not at all, also across a power cut.

A process kill keeps the page cache; a power cut does not. After a cut, a file written in place
can be empty or half written, and a renamed file can be back to its old content or gone: the
data is durable once the file is fsynced, its name once its directory is. So every small file
(keys, the command replay guard, the chain position, the manifest, configs) is written as:

1. a temporary file beside it, created with its final mode (O_EXCL: never wider, not even for
   an instant), the data written and fsynced;
2. renamed over the target (or, for `exclusive`, linked to it, which fails if it exists);
3. the directory fsynced, so that the new name survives a cut.

`durable=False` keeps 1-2 without the fsyncs, for advisory files rewritten every few seconds
(status.json) where a cut may lose the last version but must not leave a torn one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic"]

_counter = itertools.count()


def fsync_dir(path: Path) -> None:
    """fsync a directory: the names created, renamed or removed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, exclusive: bool = False,
                 durable: bool = True) -> bool:
    """Write `data` to `path` with `mode`, atomically (see the module). With `exclusive`, only
    if `path` does not exist yet: False (and nothing written) when it does. True otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_counter)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have removed bits we want (0644)
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # atomic create-if-absent, with the data already in place
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)
    return True
