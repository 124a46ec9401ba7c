"""A real NATS cluster on loopback: `nodes` nats-server processes (Debian's nats-server) routed
into one cluster, each with JetStream and an MQTT listener, with mutual TLS on every listener
when a `Pki` is given. The fleet-scale platform's bus (docs/SCALE.md): gateways publish their
batches over MQTT to any node, a replicated stream keeps them, the platform's receivers consume
the stream and answer the gateways over MQTT. Used by the tests and by bench/fleet.py; each node
can be killed (SIGKILL) and started again on its ports and its store.

NATS 2.9 speaks MQTT 3.1.1 only (a gateway's `[uplink.mqtt] protocol = "v311"`), and maps an
MQTT topic's `/` to the subject's `.`: a gateway id with a `.` in it cannot use this bus.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from branchsim.broker import get_free_port, wait_port
from branchsim.pki import Pki

__all__ = ["NATS_SERVER", "NatsCluster", "NatsNode", "find_nats_server"]

NATS_SERVER = "/usr/bin/nats-server"


def find_nats_server() -> str | None:
    if os.access(NATS_SERVER, os.X_OK):
        return NATS_SERVER
    return shutil.which("nats-server")


@dataclass
class NatsNode:
    name: str
    dir: Path
    client_port: int
    cluster_port: int
    mqtt_port: int
    monitor_port: int
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def log(self) -> Path:
        return self.dir / "nats.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """`nodes` routed nats-server processes. `tls`: every listener (clients, routes, MQTT)
    requires a certificate of the Pki's CA."""

    def __init__(self, dir: Path, *, nodes: int = 3, tls: Pki | None = None,
                 name: str = "branch-fleet", max_file_store: str = "4G",
                 extra: str = "") -> None:
        """`extra`: configuration appended to every node's (e.g. an `authorization` block)."""
        self.dir = dir
        self.tls = tls
        dir.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            NatsNode(f"n{i}", dir / f"n{i}", get_free_port(), get_free_port(), get_free_port(),
                     get_free_port())
            for i in range(nodes)
        ]
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"' for n in self.nodes)
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            tls_block = ""
            if tls is not None:
                tls_block = (f"tls {{ cert_file: {json.dumps(str(tls.node_cert))}, "
                             f"key_file: {json.dumps(str(tls.node_key))}, "
                             f"ca_file: {json.dumps(str(tls.ca_cert))}, verify: true, "
                             "timeout: 5 }")
            # The routes' TLS: each node is client and server of the others, hence the node
            # certificate (its extended key usage allows both, see branchsim.pki)
            node.conf.write_text("\n".join([
                f"server_name: {node.name}",
                f"listen: 127.0.0.1:{node.client_port}",
                f"http: 127.0.0.1:{node.monitor_port}",
                tls_block,
                "jetstream {",
                f"  store_dir: {json.dumps(str(node.dir / 'js'))}",
                f"  max_file_store: {max_file_store}",
                "  max_memory_store: 256M",
                "}",
                *([] if nodes == 1 else [  # one node: no cluster, JetStream standalone
                    "cluster {",
                    f"  name: {name}",
                    f"  listen: 127.0.0.1:{node.cluster_port}",
                    f"  routes: [{routes}]",
                    f"  {tls_block}",
                    "}"]),
                "mqtt {",
                f"  listen: 127.0.0.1:{node.mqtt_port}",
                f"  {tls_block}",
                # the gateways' sessions and their unacked acks survive the loss of a node
                f"  stream_replicas: {min(3, nodes)}",
                "  ack_wait: \"30s\"",
                "}",
                f"pid_file: {json.dumps(str(node.dir / 'nats.pid'))}",
                extra,
                "",
            ]))

    # --- addresses ------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        scheme = "tls" if self.tls is not None else "nats"
        return [f"{scheme}://127.0.0.1:{n.client_port}" for n in self.nodes]

    @property
    def mqtt(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.mqtt_port) for n in self.nodes]

    # --- processes ------------------------------------------------------------------------

    def start(self) -> NatsCluster:
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self._wait(node)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: NatsNode) -> None:
        assert not node.running, f"{node.name} already running"
        with node.log.open("ab") as log:
            node.proc = subprocess.Popen(
                [find_nats_server() or NATS_SERVER, "-c", str(node.conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    def _wait(self, node: NatsNode, timeout: float = 30.0) -> None:
        """Until the node listens and knows the JetStream meta leader (a stream can then be
        made and a gateway's MQTT session kept)."""
        deadline = time.monotonic() + timeout
        for port in (node.client_port, node.mqtt_port, node.monitor_port):
            wait_port(port, timeout, proc=node.proc, log=node.log,
                      name=f"nats-server {node.name}")
        while not self.meta_leader(node):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {node.name}: no JetStream meta leader after "
                                   f"{timeout:.0f} s; log {node.log}")
            time.sleep(0.05)  # polling interval of a condition wait

    @staticmethod
    def meta_leader(node: NatsNode) -> str | None:
        """The JetStream meta leader as `node` sees it (its monitoring endpoint), or None."""
        url = f"http://127.0.0.1:{node.monitor_port}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                info = json.load(resp)
        except (OSError, ValueError):
            return None
        if "meta_cluster" not in info:  # standalone: its own leader once JetStream runs
            return node.name if "config" in info and not info.get("disabled") else None
        leader = info["meta_cluster"].get("leader")
        return str(leader) if leader else None

    def start_node(self, i: int) -> None:
        """Start node `i` again (after `kill_node`), on its ports and its JetStream store."""
        node = self.nodes[i]
        self._spawn(node)
        self._wait(node)

    def kill_node(self, i: int) -> None:
        """SIGKILL node `i`: a crash (its unsynced JetStream writes are its peers' to keep)."""
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
