"""The power-cut file system (branchsim.powerfs): what survives a cut is exactly what was synced,
the processes using it are killed, and SQLite shows the difference between synchronous=FULL and
OFF that a process kill cannot show. Real FUSE mounts (root and /dev/fuse), real processes."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from branchsim.powerfs import PowerFsError, PowerSupply, Volume, fuse_unavailable
from branchsim.powerfs.mounts import is_mounted

UNAVAILABLE = fuse_unavailable()
needs_fuse = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"power-cut fs: {UNAVAILABLE}")


def write(path: Path, data: bytes, *, sync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start(children: list[subprocess.Popen[str]], code: str, *args: str,
          cwd: Path | None = None) -> subprocess.Popen[str]:
    """A Python child running `code`; returns once it printed its first line ("ready")."""
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                         cwd=cwd)
    children.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


# -- what survives ------------------------------------------------------------------------------


def test_unsynced_write_is_gone_synced_write_stays(power: PowerSupply) -> None:
    """Data written after a file's last fsync is gone after a cut; what was fsynced stays; a
    file whose name was durable but whose data never was comes back empty."""
    m = power.mountpoint
    write(m / "synced", b"")
    write(m / "never", b"")
    fsync_dir(m)
    write(m / "synced", b"one", sync=True)
    with open(m / "synced", "ab") as f:
        f.write(b" two")  # not synced
    write(m / "never", b"lost")
    assert (m / "synced").read_bytes() == b"one two"
    report = power.cut()
    assert (m / "synced").read_bytes() == b"one"
    assert (m / "never").read_bytes() == b""
    assert report["bytes_discarded"] == len(b" two") + len(b"lost")


def test_created_file_without_directory_fsync_is_gone(power: PowerSupply) -> None:
    """A file created, written and fsynced disappears at a cut if its directory was never
    fsynced (strict: ext4 would usually keep it); with the directory fsynced it stays."""
    m = power.mountpoint
    write(m / "orphan", b"data", sync=True)
    write(m / "kept", b"data", sync=True)
    fsync_dir(m)
    write(m / "late", b"data", sync=True)  # created after the directory's fsync
    report = power.cut()
    assert sorted(os.listdir(m)) == ["kept", "orphan"]
    assert report["files_lost"] == 1 and report["names_undone"] == 1
    (m / "sub").mkdir()
    write(m / "sub" / "inner", b"x", sync=True)
    fsync_dir(m)  # names "sub", not what is in it
    power.cut()
    assert (m / "sub").is_dir() and os.listdir(m / "sub") == []


def test_rename_without_directory_fsync_is_undone(power: PowerSupply) -> None:
    """The atomic-replace pattern without the directory fsync: after a cut the old content is
    back under the name and the temporary file too; with the fsync the new content stays."""
    m = power.mountpoint
    write(m / "state.json", b"old", sync=True)
    write(m / "state.json.tmp", b"new", sync=True)
    fsync_dir(m)
    os.replace(m / "state.json.tmp", m / "state.json")
    assert (m / "state.json").read_bytes() == b"new"
    power.cut()
    assert (m / "state.json").read_bytes() == b"old"
    assert (m / "state.json.tmp").read_bytes() == b"new"
    os.replace(m / "state.json.tmp", m / "state.json")
    fsync_dir(m)
    power.cut()
    assert os.listdir(m) == ["state.json"]
    assert (m / "state.json").read_bytes() == b"new"


def test_rename_over_an_open_file(power: PowerSupply) -> None:
    """Renaming over an existing file keeps the replaced one readable through a descriptor
    opened before; RENAME_NOREPLACE-style creation (os.link) refuses an existing name."""
    m = power.mountpoint
    write(m / "a", b"AAAA")
    write(m / "b", b"BB")
    with open(m / "b", "rb") as old:
        os.rename(m / "a", m / "b")
        assert old.read() == b"BB"
        assert os.fstat(old.fileno()).st_nlink == 0
    assert (m / "b").read_bytes() == b"AAAA" and not (m / "a").exists()
    with pytest.raises(FileExistsError):
        os.link(m / "b", m / "b")


def test_unlink_of_an_open_file(power: PowerSupply) -> None:
    """An unlinked file stays usable through its descriptor (read, write, fsync, fstat with no
    link); its name, durable before, is back after a cut, with what was synced through that
    descriptor; an unlink made durable by the directory fsync stays done."""
    m = power.mountpoint
    write(m / "f", b"first", sync=True)
    fsync_dir(m)
    fd = os.open(m / "f", os.O_RDWR)
    try:
        os.unlink(m / "f")
        assert os.listdir(m) == []
        assert os.pread(fd, 100, 0) == b"first"
        os.pwrite(fd, b"FIRST!", 0)
        os.fsync(fd)
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_size == 3
    finally:
        os.close(fd)
    power.cut()
    assert (m / "f").read_bytes() == b"FIRST!"
    os.unlink(m / "f")
    fsync_dir(m)
    power.cut()
    assert os.listdir(m) == []


def test_byte_ranges_and_truncate_match_a_model(power: PowerSupply) -> None:
    """Random pwrites across block boundaries, truncates down and up (zeros), O_APPEND and
    O_TRUNC: every read equals a bytearray model, and after a cut the file equals the model
    as it was at the last fsync."""
    rng = random.Random(16)
    m = power.mountpoint
    write(m / "f", b"")
    fsync_dir(m)
    model, durable = bytearray(), b""
    fd = os.open(m / "f", os.O_RDWR)
    try:
        for step in range(300):
            op = rng.random()
            if op < 0.6:
                off, data = rng.randrange(0, 20000), rng.randbytes(rng.randrange(1, 9000))
                os.pwrite(fd, data, off)
                if off > len(model):
                    model += bytes(off - len(model))
                model[off:off + len(data)] = data
            elif op < 0.8:
                size = rng.randrange(0, 24000)
                os.ftruncate(fd, size)
                model = model[:size] + bytes(max(0, size - len(model)))
            else:
                os.fsync(fd) if step % 2 else os.fdatasync(fd)
                durable = bytes(model)
            assert os.fstat(fd).st_size == len(model)
            assert os.pread(fd, len(model) + 10, 0) == bytes(model), step
    finally:
        os.close(fd)
    with open(m / "f", "ab") as f:
        f.write(b"tail")
    assert (m / "f").read_bytes() == bytes(model) + b"tail"
    power.cut()
    assert (m / "f").read_bytes() == durable
    with open(m / "f", "r+b") as f:  # O_TRUNC through open(2)
        os.truncate(f.fileno(), len(durable))
    write(m / "f", b"short")
    assert (m / "f").read_bytes() == b"short"


def test_the_sync_command_makes_everything_durable(power: PowerSupply) -> None:
    """`sync` (sync(2) of a real disk) makes every name and every byte written so far
    durable; what is written after it is not."""
    m = power.mountpoint
    (m / "d").mkdir()
    write(m / "d" / "f", b"synced")
    power.sync()
    write(m / "d" / "f", b"later")
    write(m / "g", b"later")
    power.cut()
    assert os.listdir(m) == ["d"] and (m / "d" / "f").read_bytes() == b"synced"


def test_writes_reach_the_file_system_before_any_sync(power: PowerSupply) -> None:
    """No writeback cache: a write(2) is counted by the daemon before the file is closed or
    synced (else an unsynced write could survive in the kernel, or be lost before a sync)."""
    m = power.mountpoint
    with open(m / "f", "wb", buffering=0) as f:
        before = power.stats()["bytes_written"]
        f.write(b"x" * 5000)
        assert power.stats()["bytes_written"] == before + 5000
        assert power.stats()["fsyncs"] == 0
        os.fsync(f.fileno())
        assert power.stats()["fsyncs"] == 1


def test_shared_mmap_writes_reach_the_file(power: PowerSupply) -> None:
    """A shared writable map works (no direct_io): its pages reach the file when unmapped, as
    unsynced writes that a cut drops; msync(MS_SYNC) is an fsync and they stay."""
    m = power.mountpoint
    write(m / "map", bytes(8192), sync=True)
    fsync_dir(m)
    for synced in (False, True):
        with open(m / "map", "r+b") as f, mmap.mmap(f.fileno(), 8192) as mm:
            mm[4090:4100] = b"0123456789"
            if synced:
                mm.flush()
        assert (m / "map").read_bytes()[4090:4100] == b"0123456789"
        power.cut()
        assert (m / "map").read_bytes()[4090:4100] == (b"0123456789" if synced else bytes(10))


@needs_fuse
def test_statfs_and_a_full_card(tmp_path: Path) -> None:
    """statfs reports the capacity and what is used; a write past the capacity fails with
    ENOSPC and leaves the file system usable."""
    with PowerSupply(tmp_path / "mnt", capacity=1 << 20) as power:
        m = power.mountpoint
        st = os.statvfs(m)
        assert (st.f_bsize, st.f_blocks, st.f_namemax) == (4096, 256, 255)
        write(m / "a", bytes(100_000))
        assert os.statvfs(m).f_bfree == 256 - 25
        with pytest.raises(OSError) as full:
            write(m / "b", bytes(1 << 20))
        assert full.value.errno == errno.ENOSPC
        os.unlink(m / "b")
        write(m / "c", b"still works")
        assert (m / "c").read_bytes() == b"still works"


# -- who is killed ------------------------------------------------------------------------------

HOLD_FILE = ("import sys, time; f = open(sys.argv[1], 'ab'); print('ready', flush=True); "
             "time.sleep(600)")
# mmap(2) through ctypes: Python's mmap module keeps a duplicate of the descriptor.
HOLD_MAP = ("import ctypes, mmap, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p; "
            "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, "
            "ctypes.c_int, ctypes.c_long]; "
            "assert libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, "
            "0) not in (None, ctypes.c_void_p(-1).value); os.close(fd); "
            "print('ready', flush=True); time.sleep(600)")
# Appends without a sync, as fast as it can.
APPEND = ("import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND); "
          "print('ready', flush=True)\nwhile True: os.write(fd, b'x' * 100)")
IDLE = "import time; print('ready', flush=True); time.sleep(600)"


def test_cut_kills_every_process_using_the_mount(power: PowerSupply,
                                                 children: list[subprocess.Popen[str]]) -> None:
    """A process holding a file open, one whose working directory is in the mount, and one
    with a file mapped (its descriptor closed) are SIGKILLed; a process elsewhere is not."""
    m = power.mountpoint
    write(m / "mapped", bytes(4096))
    holder = start(children, HOLD_FILE, str(m / "held"))
    inside = start(children, IDLE, cwd=m)
    mapper = start(children, HOLD_MAP, str(m / "mapped"))
    bystander = start(children, IDLE)
    fds = Path(f"/proc/{mapper.pid}/fd")
    assert not [fd for fd in fds.iterdir() if os.readlink(fd).startswith(str(m))]  # map only
    report = power.cut()
    assert report["killed"] == sorted([holder.pid, inside.pid, mapper.pid])
    for p in (holder, inside, mapper):  # dead when the cut returns: zombies until reaped
        assert Path(f"/proc/{p.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        assert p.wait(timeout=10) == -signal.SIGKILL
    assert bystander.poll() is None


def test_nothing_a_killed_process_wrote_lands_after_the_cut(
        power: PowerSupply, children: list[subprocess.Popen[str]]) -> None:
    """Processes appending without a sync are killed mid-write, and the cut drops their data
    only once they are dead: no write of theirs reaches the files after it."""
    m = power.mountpoint
    for i in range(4):
        write(m / f"log{i}", b"durable", sync=True)
    fsync_dir(m)
    for _ in range(3):
        writers = [start(children, APPEND, str(m / f"log{i}")) for i in range(4)]
        power.cut()
        for w in writers:
            assert w.wait(timeout=10) == -signal.SIGKILL
        assert [(m / f"log{i}").read_bytes() for i in range(4)] == [b"durable"] * 4


def test_cut_of_named_processes_only(power: PowerSupply,
                                     children: list[subprocess.Popen[str]]) -> None:
    """`cut pids ...` kills the processes named, not the other users of the mount; a process
    group is killed whole."""
    m = power.mountpoint
    named = start(children, HOLD_FILE, str(m / "one"))
    other = start(children, HOLD_FILE, str(m / "two"))
    assert power.cut(pids=[named.pid])["killed"] == [named.pid]
    assert named.wait(timeout=10) == -signal.SIGKILL and other.poll() is None
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable,"
         " '-c', 'import time; time.sleep(600)']); print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    children.append(leader)
    assert leader.stdout is not None and leader.stdout.readline().strip() == "ready"
    killed = power.cut(pgid=leader.pid)["killed"]
    assert leader.pid in killed and len(killed) == 2
    assert leader.wait(timeout=10) == -signal.SIGKILL and other.poll() is None


def test_cut_refused_to_a_caller_using_the_mount(power: PowerSupply) -> None:
    """The process asking for the cut would be killed before reading the answer: refused, and
    nothing is dropped."""
    m = power.mountpoint
    with open(m / "f", "wb") as f:
        f.write(b"x")
        f.flush()
        with pytest.raises(PowerFsError, match="uses the mount"):
            power.cut()
    assert (m / "f").read_bytes() == b"x"
    assert power.stats()["cuts"] == 0


# -- SQLite ---------------------------------------------------------------------------------------

# Commits one row per transaction and prints its number once the commit returned.
WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=" + sys.argv[2])
n = db.execute("SELECT coalesce(max(n), 0) FROM t").fetchone()[0]
print("ready", flush=True)
while True:
    n += 1
    db.execute("INSERT INTO t VALUES (?, randomblob(200))", (n,))
    print(n, flush=True)
"""


def make_db(power: PowerSupply) -> Path:
    db = power.mountpoint / "t.db"
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, pad BLOB)")
    c.close()
    power.sync()
    return db


def commit_then_cut(power: PowerSupply, children: list[subprocess.Popen[str]], db: Path,
                    sync: str, rows: int) -> int:
    """Run the writer until `rows` more commits were acknowledged, then cut: the last number
    acknowledged."""
    w = start(children, WRITER, str(db), sync)
    assert w.stdout is not None
    acked = 0
    for _ in range(rows):
        acked = int(w.stdout.readline())
    maps = Path(f"/proc/{w.pid}/maps").read_text()
    assert f"{db}-shm" in maps  # the wal-index is a shared map on this file system
    power.cut()
    assert w.wait(timeout=10) == -signal.SIGKILL
    return acked


def rows(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        count, top = c.execute("SELECT count(*), coalesce(max(n), 0) FROM t").fetchone()
    c.close()
    return int(count), int(top)


def test_sqlite_wal_full_keeps_every_committed_transaction(
        power: PowerSupply, children: list[subprocess.Popen[str]]) -> None:
    """WAL with synchronous=FULL: after each of three cuts at random moments the database
    opens, passes integrity_check and holds every transaction committed before the cut (rows
    1..n, no gap); the writer restarts on it."""
    rng = random.Random(1605)
    db = make_db(power)
    for _ in range(3):
        acked = commit_then_cut(power, children, db, "FULL", rng.randrange(20, 300))
        count, top = rows(db)
        assert top >= acked and count == top


def test_sqlite_wal_off_loses_committed_transactions(
        power: PowerSupply, children: list[subprocess.Popen[str]]) -> None:
    """WAL with synchronous=OFF: transactions whose commit returned are lost by a cut (nothing
    was ever fsynced), which is what this file system is for."""
    db = make_db(power)
    acked = commit_then_cut(power, children, db, "OFF", 100)
    assert acked >= 100
    assert rows(db) == (0, 0)


def test_a_process_kill_keeps_what_a_cut_loses(power: PowerSupply,
                                               children: list[subprocess.Popen[str]]) -> None:
    """The same synchronous=OFF writer, SIGKILLed without a cut, loses nothing: a kill alone
    cannot tell OFF from FULL."""
    db = make_db(power)
    w = start(children, WRITER, str(db), "OFF")
    assert w.stdout is not None
    acked = 0
    for _ in range(100):
        acked = int(w.stdout.readline())
    w.kill()
    w.wait(timeout=10)
    count, top = rows(db)
    assert top >= acked and count == top


# -- the supply itself ------------------------------------------------------------------------


@needs_fuse
def test_the_context_manager_stops_what_it_started(tmp_path: Path) -> None:
    """On exit the mount is gone, the daemon has exited and its control socket is removed,
    even after cuts."""
    with PowerSupply(tmp_path / "mnt") as power:
        assert is_mounted(str(power.mountpoint))
        write(power.mountpoint / "f", b"x")
        power.cut()
        control = Path(power.control.path)
        pid = power.pid
        assert control.exists() and pid is not None
    assert not is_mounted(str(tmp_path / "mnt"))
    assert not control.exists()
    assert not Path(f"/proc/{pid}").exists()


@needs_fuse
def test_the_daemon_stops_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM ends the daemon's loop and removes the mount (libfuse's signal handling reaches
    the loop's thread: the control threads block those signals)."""
    with PowerSupply(tmp_path / "mnt") as power:
        assert power.pid is not None
        os.kill(power.pid, signal.SIGTERM)
        assert power.wait(timeout=10) == 0
        assert not is_mounted(str(power.mountpoint))


def test_the_collector_keeps_what_a_cut_can_bring_back() -> None:
    """(No FUSE.) Thousands of files created and unlinked do not pile up in memory, but a file
    whose name was durable when it was unlinked comes back at a cut with its synced data."""
    v = Volume()
    fh = v.create("/keep", 0o644)
    v.write(fh, b"kept", 0)
    v.fsync(fh)
    v.release(fh)
    root = v.opendir("/")
    v.fsync(root)
    v.unlink("/keep")
    for i in range(3000):
        v.release(v.create(f"/tmp{i}", 0o644))
        v.unlink(f"/tmp{i}")
    assert v.statfs()["f_files"] - v.statfs()["f_ffree"] < 300
    v.cut()
    fh = v.open("/keep", os.O_RDONLY)
    assert v.read(fh, 100, 0) == b"kept"
    v.release(root)
