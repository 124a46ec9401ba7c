"""A real mosquitto on a free loopback port, with optional mutual TLS and persistence: the
simulated WAN end of the demo and of the tests (tests/support/broker.py adds pytest fixtures)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from branchsim.pki import Pki
from branchsim.procs import terminate

__all__ = [
    "MOSQUITTO",
    "Mosquitto",
    "find_mosquitto",
    "get_free_port",
    "wait_port",
]

MOSQUITTO = "/usr/sbin/mosquitto"


def find_mosquitto() -> str | None:
    """The mosquitto binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    import shutil

    if os.access(MOSQUITTO, os.X_OK):
        return MOSQUITTO
    return shutil.which("mosquitto")


def get_free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None,
              log: Path | None = None, name: str = "mosquitto") -> None:
    """Poll until 127.0.0.1:port accepts a TCP connection (or fail with the log of `proc`,
    the server called `name`)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace") if log and log.exists() else ""
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port}") from None
            time.sleep(0.02)  # polling interval of a condition wait, not a fixed delay


class Mosquitto:
    """A mosquitto process. `tls` given: a TLS listener that requires a client certificate."""

    def __init__(self, dir: Path, tls: Pki | None = None, port: int | None = None,
                 autosave_s: int | None = 1) -> None:
        """`autosave_s`: how often mosquitto writes its persistence file (and fsyncs it,
        stalling every delivery meanwhile); 1 s so that a broker crash (`kill`) loses little,
        None for mosquitto's default (every 30 minutes, and at a clean stop)."""
        self.dir = dir
        self.tls = tls
        self.port = port or get_free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        dir.mkdir(parents=True, exist_ok=True)
        self.conf = dir / "mosquitto.conf"
        self.log = dir / "mosquitto.log"
        (dir / "data").mkdir(exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {dir / 'data'}/",
            *([f"autosave_interval {autosave_s}"] if autosave_s is not None else []),
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_queued_messages 10000",
            # Without it mosquitto's small packets (PUBACKs, acks, an alarm's batch) wait for
            # Nagle's algorithm behind unacknowledged data: ~30 ms per round trip, which halved
            # the throughput of 4 batches in flight (bench/README.md, pipeline efficiency).
            # docs/OPERATIONS.md asks the same of the bank's broker.
            "set_tcp_nodelay true",
        ]
        if os.getuid() == 0:
            lines.append("user root")  # else it drops to user "mosquitto" and cannot read dir
        if tls is not None:
            lines += [
                f"cafile {tls.ca_cert}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
                "require_certificate true",
                "tls_version tlsv1.2",
            ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(self.port, proc=self.proc, log=self.log)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), then SIGKILL if it hangs."""
        terminate(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash; only what autosave wrote survives."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(5.0)

    def restart(self) -> None:
        """Stop and start again on the same port, keeping the persistence file (sessions)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


