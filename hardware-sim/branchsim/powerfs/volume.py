"""The power-cut file system's state: every node twice, as processes see it and as a cut leaves it.

Each node keeps its *live* state (what reads return) and its *durable* state (what survives a
cut). Only syncs move live state into durable state:

- `fsync(fh)` (fsync or fdatasync of a file): the file's data, size and mode become durable.
- `fsync(fh)` of a directory: every entry of that directory (names created, renamed in or out,
  unlinked) becomes durable, and nothing else: a file created, written and fsynced whose
  directory was never fsynced has no durable name and is gone after a cut.
- `sync_all()`: everything (as sync(2) on a real disk; the daemon's `sync` command).

`cut()` replaces the live state with the durable one: the tree reachable from the root through
durable entries, each node with its durable content. Nothing else survives.

File data is kept in 4 KiB blocks shared between the live and the durable copy (bytes objects
are immutable): a write replaces live blocks and marks them dirty, a sync copies only the dirty
ones, a cut copies the durable block table. Bytes past a file's size are always zero in its
blocks, so growing a file shows zeros.

Every method raises OSError with the errno a kernel file system would return. All of them are
serialised by one lock: FUSE callbacks and the control thread share this object.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = ["BLOCK", "CutReport", "Volume"]

BLOCK = 4096
ROOT_INO = 1
# How many nodes may be unlinked (and so possibly garbage) before a sweep frees the dead ones.
GC_EVERY = 256
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# libfuse's high-level API finds a file by its path only (fstat(2) of a file unlinked while open
# fails with ESTALE if it has none), so it renames such a file to a hidden name and unlinks that
# on the last close. The volume takes that rename as the unlink it stands for: the file loses
# its name (st_nlink 0, not listed, never made durable) and keeps a path for libfuse.
HIDDEN = ".fuse_hidden"
# utimensat's special nanosecond values, as libfuse passes them through (tv_sec 0).
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

P = ParamSpec("P")
R = TypeVar("R")


def _err(code: int) -> OSError:
    return OSError(code, errno.errorcode.get(code, str(code)))


@dataclass
class _Attrs:
    mode: int  # type and permission bits
    uid: int
    gid: int
    atime: int  # nanoseconds
    mtime: int
    ctime: int


@dataclass(eq=False)
class _Node:
    ino: int
    attrs: _Attrs
    durable_attrs: _Attrs
    links: int = 0  # live directory entries naming this node
    opens: int = 0

    def revert(self) -> None:
        self.attrs = dataclasses.replace(self.durable_attrs)


@dataclass(eq=False)
class _File(_Node):
    blocks: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    dirty: set[int] = field(default_factory=set)
    durable_blocks: dict[int, bytes] = field(default_factory=dict)
    durable_size: int = 0
    unsynced: int = 0  # bytes written since the last fsync

    def revert(self) -> None:
        super().revert()
        self.blocks = dict(self.durable_blocks)
        self.size = self.durable_size
        self.dirty.clear()
        self.unsynced = 0


@dataclass(eq=False)
class _Dir(_Node):
    entries: dict[str, int] = field(default_factory=dict)
    durable_entries: dict[str, int] = field(default_factory=dict)
    hidden: dict[str, int] = field(default_factory=dict)  # unlinked, open: libfuse's names

    def undone(self) -> int:
        """How many names a cut would change in this directory."""
        names = self.entries.keys() | self.durable_entries.keys()
        return sum(self.entries.get(n) != self.durable_entries.get(n) for n in names)

    def revert(self) -> None:
        super().revert()
        self.entries = dict(self.durable_entries)
        self.hidden.clear()


@dataclass(eq=False)
class _Symlink(_Node):
    target: str = ""  # set at creation, never changed: durable with its name


@dataclass(frozen=True)
class CutReport:
    """What one cut threw away: bytes written since their file's last fsync, plus the whole
    content of every file whose name did not survive; and names put back or removed."""

    bytes_discarded: int
    names_undone: int
    files_lost: int


def _footprint(node: _Node) -> int:
    """The bytes a node takes on the card: its data in whole blocks."""
    return -(-node.size // BLOCK) * BLOCK if isinstance(node, _File) else 0


def _locked(method: Callable[Concatenate[Volume, P], R]) -> Callable[Concatenate[Volume, P], R]:
    @functools.wraps(method)
    def wrapper(self: Volume, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
            return method(self, *args, **kwargs)
    return wrapper


class Volume:
    """An in-memory file system with a durable shadow; `capacity` bounds the live file bytes
    (ENOSPC past it, as a full card)."""

    def __init__(self, capacity: int = 1 << 30, clock: Callable[[], int] = time.time_ns) -> None:
        self.capacity = capacity
        self.clock = clock
        self.lock = threading.RLock()
        now = clock()
        root_attrs = _Attrs(stat.S_IFDIR | 0o755, 0, 0, now, now, now)
        self._nodes: dict[int, _Node] = {
            ROOT_INO: _Dir(ROOT_INO, root_attrs, dataclasses.replace(root_attrs), links=1)}
        self._handles: dict[int, _Node] = {}
        self._next_ino = ROOT_INO + 1
        self._next_fh = 1
        self._used = 0  # blocks of the files with a name or an open handle, in bytes
        self._unlinked = 0
        self.counters = {"bytes_written": 0, "writes": 0, "fsyncs": 0, "dir_fsyncs": 0,
                         "syncs": 0, "cuts": 0}

    # -- lookups -------------------------------------------------------------------------------

    def _resolve(self, path: str) -> _Node:
        node = self._nodes[ROOT_INO]
        for part in path.split("/"):
            if not part:
                continue
            if not isinstance(node, _Dir):
                raise _err(errno.ENOTDIR)
            ino = node.entries.get(part, node.hidden.get(part))
            if ino is None:
                raise _err(errno.ENOENT)
            node = self._nodes[ino]
        return node

    def _parent(self, path: str) -> tuple[_Dir, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._resolve(head)
        if not isinstance(parent, _Dir):
            raise _err(errno.ENOTDIR)
        if not name or name in (".", ".."):
            raise _err(errno.EINVAL)
        if len(name.encode(errors="surrogateescape")) > 255:
            raise _err(errno.ENAMETOOLONG)
        return parent, name

    def _node(self, path: str | None, fh: int | None) -> _Node:
        if fh is not None and fh in self._handles:
            return self._handles[fh]
        if path is None:
            raise _err(errno.EBADF)
        return self._resolve(path)

    def _file(self, path: str | None, fh: int | None) -> _File:
        node = self._node(path, fh)
        if isinstance(node, _Dir):
            raise _err(errno.EISDIR)
        if not isinstance(node, _File):
            raise _err(errno.EINVAL)
        return node

    # -- attributes ----------------------------------------------------------------------------

    @_locked
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        node = self._node(path, fh)
        a = node.attrs
        if isinstance(node, _File):
            size, nlink = node.size, node.links
        elif isinstance(node, _Dir):
            size = len(node.entries)
            nlink = 2 + sum(isinstance(self._nodes.get(i), _Dir) for i in node.entries.values())
            nlink = nlink if node.links else 0
        else:
            assert isinstance(node, _Symlink)
            size, nlink = len(node.target.encode(errors="surrogateescape")), node.links
        return {"st_ino": node.ino, "st_mode": a.mode, "st_nlink": nlink, "st_uid": a.uid,
                "st_gid": a.gid, "st_size": size, "st_blocks": (size + 511) // 512,
                "st_blksize": BLOCK, "st_atime": a.atime, "st_mtime": a.mtime,
                "st_ctime": a.ctime}

    @_locked
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        node = self._node(path, fh)
        node.attrs.mode = stat.S_IFMT(node.attrs.mode) | stat.S_IMODE(mode)
        node.attrs.ctime = self.clock()

    @_locked
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        node = self._node(path, fh)
        if uid != -1:
            node.attrs.uid = uid
        if gid != -1:
            node.attrs.gid = gid
        node.attrs.ctime = self.clock()

    @_locked
    def utimens(self, path: str | None, times: tuple[int, int] | None,
                fh: int | None = None) -> None:
        node = self._node(path, fh)
        now = self.clock()
        atime, mtime = times if times is not None else (UTIME_NOW, UTIME_NOW)
        if atime != UTIME_OMIT:
            node.attrs.atime = now if atime == UTIME_NOW else atime
        if mtime != UTIME_OMIT:
            node.attrs.mtime = now if mtime == UTIME_NOW else mtime
        node.attrs.ctime = now

    @_locked
    def statfs(self) -> dict[str, int]:
        blocks = self.capacity // BLOCK
        free = max(0, (self.capacity - self._used) // BLOCK)
        files = 1 << 20
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": blocks, "f_bfree": free,
                "f_bavail": free, "f_files": files, "f_ffree": files - len(self._nodes),
                "f_favail": files - len(self._nodes), "f_namemax": 255}

    # -- names ---------------------------------------------------------------------------------

    def _new(self, kind: type[_Node], mode: int, uid: int, gid: int, **extra: Any) -> _Node:
        now = self.clock()
        attrs = _Attrs(mode, uid, gid, now, now, now)
        node = kind(self._next_ino, attrs, dataclasses.replace(attrs), **extra)
        self._next_ino += 1
        self._nodes[node.ino] = node
        return node

    def _link(self, parent: _Dir, name: str, node: _Node) -> None:
        parent.entries[name] = node.ino
        node.links += 1
        parent.attrs.mtime = parent.attrs.ctime = self.clock()

    def _unlink(self, parent: _Dir, name: str, hide_as: str | None = None) -> None:
        ino = parent.entries.pop(name)
        if hide_as is not None:
            parent.hidden[hide_as] = ino
        node = self._nodes[ino]
        node.links -= 1
        node.attrs.ctime = parent.attrs.mtime = parent.attrs.ctime = self.clock()
        if node.links == 0:
            if node.opens == 0:
                self._used -= _footprint(node)
            self._unlinked += 1
            if self._unlinked >= GC_EVERY:
                self._collect()

    def _create(self, path: str, kind: type[_Node], mode: int, uid: int, gid: int,
                **extra: Any) -> _Node:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise _err(errno.EEXIST)
        node = self._new(kind, mode, uid, gid, **extra)
        self._link(parent, name, node)
        return node

    @_locked
    def mkdir(self, path: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        self._create(path, _Dir, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)

    @_locked
    def symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> None:
        self._create(path, _Symlink, stat.S_IFLNK | 0o777, uid, gid, target=target)

    @_locked
    def readlink(self, path: str) -> str:
        node = self._resolve(path)
        if not isinstance(node, _Symlink):
            raise _err(errno.EINVAL)
        return node.target

    @_locked
    def link(self, existing: str, path: str) -> None:
        node = self._resolve(existing)
        if isinstance(node, _Dir):
            raise _err(errno.EPERM)
        parent, name = self._parent(path)
        if name in parent.entries:
            raise _err(errno.EEXIST)
        self._link(parent, name, node)

    @_locked
    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        if parent.hidden.pop(name, None) is not None:
            return  # the last close of a file unlinked while open
        if name not in parent.entries:
            raise _err(errno.ENOENT)
        if isinstance(self._nodes[parent.entries[name]], _Dir):
            raise _err(errno.EISDIR)
        self._unlink(parent, name)

    @_locked
    def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        if name not in parent.entries:
            raise _err(errno.ENOENT)
        node = self._nodes[parent.entries[name]]
        if not isinstance(node, _Dir):
            raise _err(errno.ENOTDIR)
        if node.entries:
            raise _err(errno.ENOTEMPTY)
        self._unlink(parent, name)

    @_locked
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE |
                                                                     RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        src_dir, src_name = self._parent(old)
        dst_dir, dst_name = self._parent(new)
        if src_name not in src_dir.entries:
            raise _err(errno.ENOENT)
        node = self._nodes[src_dir.entries[src_name]]
        if dst_name.startswith(HIDDEN) and dst_dir is src_dir and not flags:
            self._unlink(src_dir, src_name, hide_as=dst_name)
            return
        if isinstance(node, _Dir) and self._inside(dst_dir, node):
            raise _err(errno.EINVAL)  # a directory into itself
        target_ino = dst_dir.entries.get(dst_name)
        if flags & RENAME_EXCHANGE:
            if target_ino is None:
                raise _err(errno.ENOENT)
            other = self._nodes[target_ino]
            if isinstance(other, _Dir) and self._inside(src_dir, other):
                raise _err(errno.EINVAL)
            src_dir.entries[src_name], dst_dir.entries[dst_name] = target_ino, node.ino
            now = self.clock()
            for d in (src_dir, dst_dir):
                d.attrs.mtime = d.attrs.ctime = now
            return
        if target_ino == node.ino:
            return  # the same file under both names: rename(2) does nothing
        if target_ino is not None:
            if flags & RENAME_NOREPLACE:
                raise _err(errno.EEXIST)
            target = self._nodes[target_ino]
            if isinstance(target, _Dir):
                if not isinstance(node, _Dir):
                    raise _err(errno.EISDIR)
                if target.entries:
                    raise _err(errno.ENOTEMPTY)
            elif isinstance(node, _Dir):
                raise _err(errno.ENOTDIR)
            self._unlink(dst_dir, dst_name)
        del src_dir.entries[src_name]
        node.links -= 1
        self._link(dst_dir, dst_name, node)
        node.attrs.ctime = self.clock()
        src_dir.attrs.mtime = src_dir.attrs.ctime = node.attrs.ctime

    def _inside(self, where: _Dir, node: _Dir) -> bool:
        """Whether `where` is `node` or below it."""
        todo = [node]
        while todo:
            d = todo.pop()
            if d is where:
                return True
            todo += [c for i in d.entries.values() if isinstance(c := self._nodes[i], _Dir)]
        return False

    @_locked
    def readdir(self, path: str | None, fh: int | None = None) -> list[tuple[str, int, int]]:
        """(name, mode, ino) of each entry, "." and ".." first (".." as the root's: a node
        does not know its parent, and nothing reads that number)."""
        node = self._node(path, fh)
        if not isinstance(node, _Dir):
            raise _err(errno.ENOTDIR)
        return [(".", node.attrs.mode, node.ino), ("..", stat.S_IFDIR, ROOT_INO)] + [
            (name, self._nodes[ino].attrs.mode, ino) for name, ino in node.entries.items()]

    # -- handles -------------------------------------------------------------------------------

    def _open_handle(self, node: _Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = node
        node.opens += 1
        return fh

    @_locked
    def create(self, path: str, mode: int, uid: int = 0, gid: int = 0) -> int:
        parent, name = self._parent(path)
        ino = parent.entries.get(name)
        if ino is not None:  # O_CREAT without O_EXCL on an existing name: open it
            return self._open_handle(self._nodes[ino])
        node = self._create(path, _File, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)
        return self._open_handle(node)

    @_locked
    def open(self, path: str, flags: int) -> int:
        node = self._resolve(path)
        if isinstance(node, _File) and flags & os.O_TRUNC:
            self._truncate(node, 0)
        return self._open_handle(node)

    @_locked
    def opendir(self, path: str) -> int:
        node = self._resolve(path)
        if not isinstance(node, _Dir):
            raise _err(errno.ENOTDIR)
        return self._open_handle(node)

    @_locked
    def release(self, fh: int) -> None:
        node = self._handles.pop(fh, None)
        if node is not None:
            node.opens -= 1
            if node.opens == 0 and node.links == 0 and node.ino in self._nodes:
                self._used -= _footprint(node)

    # -- data ----------------------------------------------------------------------------------

    @_locked
    def read(self, fh: int, size: int, offset: int) -> bytes:
        f = self._file(None, fh)
        end = min(offset + size, f.size)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            i, o = divmod(pos, BLOCK)
            n = min(BLOCK - o, end - pos)
            blk = f.blocks.get(i)
            parts.append(blk[o:o + n] if blk is not None else bytes(n))
            pos += n
        return b"".join(parts)

    def _resize(self, f: _File, size: int) -> None:
        grow = -(-size // BLOCK) * BLOCK - _footprint(f)
        if grow > 0 and self._used + grow > self.capacity:
            raise _err(errno.ENOSPC)
        self._used += grow
        f.size = size

    @_locked
    def write(self, fh: int, data: bytes, offset: int) -> int:
        f = self._file(None, fh)
        end = offset + len(data)
        if end > f.size:
            self._resize(f, end)
        view = memoryview(data)
        pos = offset
        while pos < end:
            i, o = divmod(pos, BLOCK)
            n = min(BLOCK - o, end - pos)
            chunk = view[pos - offset:pos - offset + n]
            if n == BLOCK:
                f.blocks[i] = bytes(chunk)
            else:
                old = f.blocks.get(i)
                blk = bytearray(old) if old is not None else bytearray(BLOCK)
                blk[o:o + n] = chunk
                f.blocks[i] = bytes(blk)
            f.dirty.add(i)
            pos += n
        f.unsynced += len(data)
        f.attrs.mtime = f.attrs.ctime = self.clock()
        self.counters["bytes_written"] += len(data)
        self.counters["writes"] += 1
        return len(data)

    def _truncate(self, f: _File, length: int) -> None:
        if length < f.size:
            first_gone = -(-length // BLOCK)
            for i in [i for i in f.blocks if i >= first_gone]:
                del f.blocks[i]
                f.dirty.add(i)
            i, o = divmod(length, BLOCK)
            if o and i in f.blocks:  # bytes past the end stay zero, for a later growth
                f.blocks[i] = f.blocks[i][:o] + bytes(BLOCK - o)
                f.dirty.add(i)
        self._resize(f, length)
        f.attrs.mtime = f.attrs.ctime = self.clock()

    @_locked
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        if length < 0:
            raise _err(errno.EINVAL)
        self._truncate(self._file(path, fh), length)

    @_locked
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        if mode != 0:  # no punching holes or keeping the size: not something we model
            raise _err(errno.EOPNOTSUPP)
        f = self._file(None, fh)
        if offset + length > f.size:
            self._resize(f, offset + length)
            f.attrs.mtime = f.attrs.ctime = self.clock()

    # -- durability ----------------------------------------------------------------------------

    @_locked
    def fsync(self, fh: int) -> None:
        """fsync or fdatasync of an open file or directory."""
        node = self._node(None, fh)
        if isinstance(node, _Dir):
            self.counters["dir_fsyncs"] += 1
            self._sync_dir(node)
        else:
            self.counters["fsyncs"] += 1
            self._sync_node(node)

    def _sync_dir(self, d: _Dir) -> None:
        d.durable_entries = dict(d.entries)
        d.durable_attrs = dataclasses.replace(d.attrs)

    def _sync_node(self, node: _Node) -> None:
        if isinstance(node, _File):
            for i in node.dirty:
                blk = node.blocks.get(i)
                if blk is None:
                    node.durable_blocks.pop(i, None)
                else:
                    node.durable_blocks[i] = blk
            node.dirty.clear()
            node.durable_size = node.size
            node.unsynced = 0
        node.durable_attrs = dataclasses.replace(node.attrs)

    @_locked
    def sync_all(self) -> None:
        """Everything live becomes durable (sync(2))."""
        self.counters["syncs"] += 1
        for node in self._nodes.values():
            if isinstance(node, _Dir):
                self._sync_dir(node)
            else:
                self._sync_node(node)

    def _durable_tree(self) -> set[int]:
        seen = {ROOT_INO}
        todo = [ROOT_INO]
        while todo:
            node = self._nodes[todo.pop()]
            if isinstance(node, _Dir):
                for ino in node.durable_entries.values():
                    if ino not in seen:
                        seen.add(ino)
                        todo.append(ino)
        return seen

    @_locked
    def cut(self) -> CutReport:
        """Power is lost: the live state becomes the durable state."""
        keep = self._durable_tree()
        discarded = names = lost = 0
        for ino, node in self._nodes.items():
            if isinstance(node, _File):
                if ino in keep:
                    discarded += node.unsynced
                elif node.links:  # a file with a name now, none after the cut
                    discarded += node.size
                    lost += 1
            if isinstance(node, _Dir) and ino in keep:
                names += node.undone()
        self._nodes = {ino: self._nodes[ino] for ino in keep}
        for node in self._nodes.values():
            node.revert()
            node.links = 0
        self._nodes[ROOT_INO].links = 1
        for node in self._nodes.values():
            if isinstance(node, _Dir):
                for ino in node.entries.values():
                    self._nodes[ino].links += 1
        self._used = sum(_footprint(n) for n in self._nodes.values())
        self._unlinked = 0
        self.counters["cuts"] += 1
        return CutReport(bytes_discarded=discarded, names_undone=names, files_lost=lost)

    def _collect(self) -> None:
        """Free the nodes no name (live or durable) and no open handle can reach."""
        seen: set[int] = set()
        todo = [ROOT_INO] + [n.ino for n in self._handles.values() if n.ino in self._nodes]
        while todo:
            ino = todo.pop()
            if ino in seen or ino not in self._nodes:
                continue
            seen.add(ino)
            node = self._nodes[ino]
            if isinstance(node, _Dir):
                todo += [*node.entries.values(), *node.durable_entries.values(),
                         *node.hidden.values()]
        for ino in [i for i in self._nodes if i not in seen]:
            del self._nodes[ino]
        self._unlinked = 0
