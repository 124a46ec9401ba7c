"""A private PostgreSQL on a free loopback port: the fleet-scale platform's store for the tests
and the benchmarks (tests/support/postgres.py adds pytest fixtures). Made with initdb in a
directory of its own, trust authentication on 127.0.0.1 only, its unix socket inside that
directory; fsync and synchronous_commit on, since a committed batch surviving a crash is what
the tests check. `kill` is a crash (SIGKILL), `start` after it is crash recovery.

PostgreSQL refuses to run as root: as root, initdb and the server run as the `postgres` OS user
(Debian's packages make it), which then owns the directory; it must be able to reach it, so not
under a 0700 directory of root's (pytest's tmp_path is one: use tempfile.mkdtemp()).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from branchsim.broker import get_free_port

__all__ = ["PostgresServer", "find_postgres"]

PG_ROOT = Path("/usr/lib/postgresql")  # Debian: one bin/ per major version
OS_USER = "postgres"  # who runs the server when we are root

# Modest settings for a 2-core, 24 GB box running the server beside the receivers and the bus;
# durability stays the default (fsync, synchronous_commit, full_page_writes all on).
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "256MB",
    "effective_cache_size": "4GB",
    "work_mem": "16MB",
    "maintenance_work_mem": "128MB",
    "max_wal_size": "2GB",
    "min_wal_size": "256MB",
    "checkpoint_timeout": "15min",
    "max_connections": "200",  # a benchmark's receivers, each with one connection
    "max_worker_processes": "4",
    "max_parallel_workers_per_gather": "0",  # small lookups only: no parallel plans on 2 cores
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
    "logging_collector": "off",  # the log is the server's stderr, our file
}


def find_postgres() -> Path | None:
    """The directory holding initdb and postgres: Debian's newest /usr/lib/postgresql/N/bin, or
    wherever initdb is on PATH."""
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if p.parent.name.isdigit()),
                      key=lambda p: int(p.parent.name))
    for bindir in reversed(versions):
        if os.access(bindir / "initdb", os.X_OK) and os.access(bindir / "postgres", os.X_OK):
            return bindir
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class PostgresServer:
    """One PostgreSQL server (a postmaster and its backends) in `dir`: `data/` (the cluster),
    `postgres.log`, the unix socket. The cluster is made at the first `start`, and kept: a
    `start` after `stop` or `kill` serves the same databases."""

    def __init__(self, dir: Path, port: int | None = None) -> None:
        self.dir = Path(dir)
        self.port = port or get_free_port()
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        bindir = find_postgres()
        if bindir is None:
            raise RuntimeError("PostgreSQL not found (no initdb in /usr/lib/postgresql/*/bin or "
                               "on PATH): apt install postgresql")
        self.bindir = bindir
        self._as_root = os.getuid() == 0
        self.user = OS_USER if self._as_root else getpass.getuser()  # the superuser's name

    # --- addresses ------------------------------------------------------------------------

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def dsn(self) -> str:
        """The maintenance database `postgres` (create_database gives a database of one's own)."""
        return self.dsn_for("postgres")

    # --- processes ------------------------------------------------------------------------

    def _run_as(self) -> dict[str, Any]:
        """Popen arguments that drop to the postgres OS user when we are root (setuid in the
        child before exec: the process is the server itself, not a wrapper such as runuser,
        which forks, so that `kill` reaches the postmaster)."""
        if not self._as_root:
            return {}
        return {"user": OS_USER, "group": pwd.getpwnam(OS_USER).pw_gid, "extra_groups": []}

    def _check_reachable(self) -> None:
        """As root: fail with advice if the postgres user cannot reach `dir` (initdb would fail
        with a bare 'permission denied')."""
        entry = pwd.getpwnam(OS_USER)
        for parent in self.dir.resolve().parents:
            st = parent.stat()
            if st.st_uid == entry.pw_uid:
                continue
            bit = stat.S_IXGRP if st.st_gid == entry.pw_gid else stat.S_IXOTH
            if not st.st_mode & bit:
                raise RuntimeError(
                    f"the {OS_USER} user cannot enter {parent} (mode "
                    f"{stat.filemode(st.st_mode)}), so cannot reach {self.dir}: give the server a "
                    "directory of its own that it can reach, e.g. tempfile.mkdtemp() itself "
                    "(it is handed to the postgres user)")

    def _initdb(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            self._check_reachable()
            entry = pwd.getpwnam(OS_USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.dir.chmod(0o700)
        initlog = self.dir / "initdb.log"
        with initlog.open("wb") as out:
            # --no-sync: initdb's own files; what we test is the server's commits, and a
            # process crash (`kill`) does not lose the page cache
            rc = subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                 "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
                 "--no-instructions"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=120,
                **self._run_as(),
            ).returncode
        if rc != 0:
            raise RuntimeError(f"initdb exited with {rc}:\n{_tail(initlog)}")
        (self.data / "pg_hba.conf").write_text(
            "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
            "local   all       all                 trust\n"  # the socket: in our 0700 dir
            "host    all       all   127.0.0.1/32  trust\n")
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.dir}'"}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# branchsim.pgserver\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """Make the cluster if there is none, start the server (crash recovery after a `kill`)
        and wait until it accepts connections."""
        assert not self.running, "already running"
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        with self.log.open("ab") as log:
            # A session of its own: a Ctrl-C meant for the test run does not reach it
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **self._run_as(),
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until a connection to the server succeeds (it refuses them while it starts and
        while it recovers from a crash)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n"
                                   f"{_tail(self.log)}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres on 127.0.0.1:{self.port} not ready after "
                                       f"{timeout:.0f} s ({exc}):\n{_tail(self.log)}") from None
            time.sleep(0.02)  # polling interval of a condition wait, not a fixed delay

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions ended, a checkpoint written), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it started: a crash; what was committed
        survives, through the WAL, at the next `start`. Its children too, and at once: each is
        a process group of its own, and those the postmaster's death leaves running (until they
        notice it) hold its shared memory, so a new postmaster would refuse to start."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGSTOP)  # no new child between the listing and the kill
        children = _children(proc.pid)
        for pid in (proc.pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children):  # init reaps them, or keeps them as zombies
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres processes {children} outlived SIGKILL")
            time.sleep(0.01)  # polling interval of a condition wait

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- databases ------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """A new, empty database; its DSN."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the sessions still connected to it."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            fields = stat_file.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                out.append(int(stat_file.parent.name))
    return out


def _alive(pid: int) -> bool:
    """Running, not a zombie (which holds no memory any more) nor gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""
