"""The platform at fleet scale, on one machine: a NATS cluster (JetStream, MQTT listeners),
PostgreSQL, and `branch-platform serve --bus` receivers as subprocesses, all with mutual TLS
where the part has TLS. What tests/test_fleet.py runs its faults against and bench/fleet.py
measures (docs/SCALE.md). Each part can be killed (SIGKILL) and started again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from branchsim.natscluster import NatsCluster
from branchsim.pgserver import PostgresServer
from branchsim.pki import Pki, make_pki
from branchsim.platform.pgstore import PgReceiver

__all__ = ["FleetPlatform", "ReceiverProcess"]


class ReceiverProcess:
    """One `branch-platform serve --bus ... --store ...` process; its log in `log`."""

    def __init__(self, cmd: Sequence[str], log: Path) -> None:
        self.cmd = list(cmd)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        assert not self.running, "already running"
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:  # ready once it consumes the stream
            with self.log.open("rb") as f:
                f.seek(offset)
                if b"platform.bus.consuming" in f.read():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"receiver not ready: {self.cmd}\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)  # polling interval of a condition wait

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, mid-transaction or between a commit and its acks."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class FleetPlatform:
    """`nodes` NATS nodes, one PostgreSQL, `receivers` receiver processes (`workers` bulk
    workers each). `dir` holds the logs and the NATS stores; PostgreSQL gets a directory of its
    own (it runs as the postgres user when we are root, and must reach it)."""

    def __init__(self, dir: Path, *, nodes: int = 3, receivers: int = 2, workers: int = 4,
                 replicas: int | None = None, tls: bool = True, prefix: str = "bank/v1") -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.pki: Pki | None = make_pki(dir / "pki") if tls else None
        self.nats = NatsCluster(dir / "nats", nodes=nodes, tls=self.pki)
        self._pg_dir = Path(tempfile.mkdtemp(prefix="branch-pg-"))
        os.chmod(self._pg_dir, 0o755)
        self.pg = PostgresServer(self._pg_dir)
        self.prefix = prefix
        self.replicas = replicas or min(3, nodes)
        self.dsn = ""
        self.receivers: list[ReceiverProcess] = []
        self._n_receivers, self._workers = receivers, workers

    def _receiver_cmd(self) -> list[str]:
        cmd = [sys.executable, "-m", "branchsim.platform.cli", "serve", "--no-coap",
               "--bus", ",".join(self.nats.urls), "--store", self.dsn,
               "--workers", str(self._workers), "--replicas", str(self.replicas),
               "--prefix", self.prefix]
        for host, port in self.nats.mqtt:
            cmd += ["--broker", f"{host}:{port}"]
        if self.pki is not None:
            cmd += ["--ca", str(self.pki.ca_cert), "--cert", str(self.pki.platform_cert),
                    "--key", str(self.pki.platform_key)]
        else:
            cmd.append("--insecure")
        return cmd

    def start(self) -> FleetPlatform:
        try:
            self.nats.start()
            self.pg.start()
            self.dsn = self.pg.create_database("platform")
            PgReceiver(self.dsn).close()  # the schema, before the receivers race to make it
            for i in range(self._n_receivers):
                rx = ReceiverProcess(self._receiver_cmd(), self.dir / f"receiver-{i}.log")
                self.receivers.append(rx)
                rx.start()
        except BaseException:
            self.stop()
            raise
        return self

    def register(self, registry: Sequence[tuple[str, bytes]]) -> None:
        """Register the gateways' keys (gw, SPKI PEM) in the store."""
        store = PgReceiver(self.dsn)
        try:
            for gw, pem in registry:
                store.register(gw, pem)
        finally:
            store.close()

    def store(self) -> PgReceiver:
        """A connection to the store for queries; the caller closes it."""
        return PgReceiver(self.dsn)

    def stop(self) -> None:
        for rx in self.receivers:
            rx.stop()
        self.nats.stop()
        self.pg.stop()
        shutil.rmtree(self._pg_dir, ignore_errors=True)

    def __enter__(self) -> FleetPlatform:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
