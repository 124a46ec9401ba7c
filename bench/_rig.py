"""The rig the process benchmarks share: the reference platform as a subprocess, an agent
config as production would have it, and what /proc says about a process (CPU, RSS, disk writes).

Nothing here is timed by itself; the bench scripts time what they measure with it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support (broker, pki)

from agent.security.keys import generate_keypair
from branchsim.platform.receiver import Receiver
from tests.support.pki import Pki

__all__ = [
    "Platform",
    "agent_doc",
    "cpu_seconds",
    "import_rss_mb",
    "io_counters",
    "new_gateway",
    "proc_status_kb",
]


class Platform:
    """`branch-platform serve --no-coap` as a subprocess; ready once its batch subscription is
    granted."""

    def __init__(self, db: Path, port: int, pki: Pki, log: Path) -> None:
        self.db = db
        self.log = log
        cmd = [sys.executable, "-m", "branchsim.platform.cli", "serve", "--db", str(db),
               "--port", str(port), "--no-coap", "--ca", str(pki.ca_cert),
               "--cert", str(pki.platform_cert), "--key", str(pki.platform_key)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> Platform:
        deadline = time.monotonic() + timeout
        while "subscribed" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"platform not ready:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.02)  # polling interval of a condition wait
        return self

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def new_gateway(dir: Path, gw: str, platform_db: Path) -> Path:
    """A gateway key pair in `dir` (signing.key, signing.pub), registered with the platform's
    database; returns the private key's path."""
    generate_keypair(dir)
    rx = Receiver(platform_db)
    try:
        rx.register(gw, (dir / "signing.pub").read_bytes())
    finally:
        rx.close()
    return dir / "signing.key"


def tmpfs_runtime_dir(state: Path) -> Path:
    """A runtime dir for the agent of `state` on a tmpfs (/dev/shm), as /run/branch-agent is
    on a gateway, so that write figures count what a gateway's card sees. The caller removes
    it."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        return shm / f"branch-bench-{hashlib.sha256(str(state).encode()).hexdigest()[:16]}"
    return state.parent / "run"


def agent_doc(gw: str, state: Path, key: Path, broker_port: int, pki: Pki,
              run: Path | None = None, **sections: Any) -> dict[str, Any]:
    """An agent config with production defaults everywhere except what `sections` set
    (whole tables: `outbox={...}` replaces the outbox table). `run`: the runtime dir
    (status.json), beside `state` by default."""
    doc: dict[str, Any] = {
        "gateway": {"id": gw, "state_dir": str(state),
                    "runtime_dir": str(run or state.parent / "run"), "key_file": str(key),
                    "time_sync": "synced"},
        "log": {"level": "info", "format": "json"},
        "uplink": {"order": ["mqtt"],
                   "mqtt": {"host": "127.0.0.1", "port": broker_port,
                            "tls": {"ca": str(pki.ca_cert), "cert": str(pki.client_cert),
                                    "key": str(pki.client_key)}}},
    }
    doc.update(sections)
    return doc


def import_rss_mb(python: str = sys.executable) -> float:
    """Peak RSS of a bare `python -c "import agent"`, read by that process itself (a fork's
    ru_maxrss would count the parent's pages it shared before exec)."""
    code = ("import agent, pathlib; print([l for l in pathlib.Path('/proc/self/status')"
            ".read_text().splitlines() if l.startswith('VmHWM:')][0].split()[1])")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout) / 1024


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (/proc/PID/stat), in seconds."""
    f = _stat_fields(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int | str, field: str) -> int:
    """A kB field of /proc/PID/status: VmRSS (now) or VmHWM (peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def io_counters(pid: int) -> tuple[int, int]:
    """(write_bytes, cancelled_write_bytes) of a process, /proc/PID/io: the bytes it caused to
    be written to storage, and those dirtied then truncated before they were written."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(io["write_bytes"]), int(io["cancelled_write_bytes"])
