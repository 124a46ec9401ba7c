"""Run the real agent as a subprocess (`branch-agent run`) against real brokers, for end-to-end,
crash and fault tests. Writes the keys and a config into a temp dir; stops what it starts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.security.keys import generate_keypair
from tests.support.pki import Pki

AGENT = [sys.executable, "-m", "agent.ops.cli"]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(doc: Mapping[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configs (tables, arrays of tables, inline values)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in doc.items():
        is_table_list = isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v)
        if isinstance(v, Mapping) or is_table_list:
            tables.append((k, v))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += f"\n[{name}]\n" + to_toml(v, name + ".")
        else:
            for item in v:
                out += f"\n[[{name}]]\n" + to_toml(item, name + ".")
    return out


def mqtt_uplink(port: int, pki: Pki | None, **extra: Any) -> dict[str, Any]:
    up: dict[str, Any] = {"host": "127.0.0.1", "port": port, "backoff_base": 0.05,
                          "backoff_max": 0.5, "keepalive": 5, **extra}
    if pki is None:
        up["insecure"] = True
    else:
        up["tls"] = {"ca": str(pki.ca_cert), "cert": str(pki.client_cert),
                     "key": str(pki.client_key)}
    return up


class AgentProcess:
    """One gateway: its key, config and state dir; started and stopped as a real process."""

    def __init__(self, dir: Path, gw: str = "gw-test", **overrides: Any) -> None:
        self.dir = dir
        self.gw = gw
        self.state = dir / "state"
        self.run = dir / "run"  # the runtime dir: status.json
        self.keys = dir / "keys"
        dir.mkdir(parents=True, exist_ok=True)
        if not (self.keys / "signing.key").exists():
            self.key_info = generate_keypair(self.keys)
        self.pubkey = self.keys / "signing.pub"
        self.config_path = dir / "agent.toml"
        self.doc: dict[str, Any] = {
            "gateway": {"id": gw, "state_dir": str(self.state), "runtime_dir": str(self.run),
                        "key_file": str(self.keys / "signing.key"), "time_sync": "synced"},
            "log": {"level": "info", "format": "json"},
            # every reading committed at once: the tests wait on deliveries, not on the
            # telemetry window (tests/test_outbox.py and tests/test_window.py check it)
            "outbox": {"commit_interval_ms": 2.0, "telemetry_window_ms": 0.0},
            "forwarder": {"ack_timeout_s": 3.0, "status_interval_s": 1.0},
            "uplink": {"order": ["mqtt"], "failover_after_s": 1.0},
        }
        for k, v in overrides.items():
            if isinstance(v, Mapping) and isinstance(self.doc.get(k), dict):
                self.doc[k].update(v)
            else:
                self.doc[k] = v
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = dir / "agent.log"
        self.starts = 0

    def write_config(self) -> Path:
        self.config_path.write_text(to_toml(self.doc))
        return self.config_path

    def start(self, *extra_args: str, env: Mapping[str, str] | None = None,
              command: Sequence[str] = (*AGENT, "run")) -> AgentProcess:
        """`command --config CONFIG *extra_args` (`branch-agent run` by default)."""
        self.write_config()
        self.starts += 1
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*command, "--config", str(self.config_path), *extra_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            # PYTHONFAULTHANDLER: a stop that hangs is aborted with every thread's stack in the log
            env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
        )
        log.close()
        return self

    def wait_log(self, needle: str, timeout: float = 20.0, after: int = 0) -> None:
        wait_until(lambda: needle in self.log_text()[after:], timeout,
                   f"agent log never showed {needle!r}", self)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; returns the exit code (0 expected)."""
        p = self.proc
        if p is None or p.poll() is not None:
            return p.returncode if p else 0
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)  # the fault handler writes each thread's stack
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            tail = self.log_text()[-6000:]
            raise AssertionError("agent did not stop within the timeout after SIGTERM; "
                                 f"the end of its log, with its threads' stacks:\n{tail}") from None

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def audit_records(self, type: str) -> list[dict[str, Any]]:
        """The records of `type` in the agent's local audit log (none before it exists)."""
        log = self.state / "audit" / "audit.log"
        if not log.exists():
            return []
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [r for r in records if r["type"] == type]

    def outbox_count(self) -> int:
        db = self.state / "outbox.db"
        if not db.exists():
            return -1
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                return int(c.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        except sqlite3.OperationalError:
            return -1  # created but its tables not yet committed

    def status(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.run / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return doc


def wait_until(cond: Callable[[], bool], timeout: float, what: str,
               agent: AgentProcess | None = None) -> None:
    """Poll a condition (every 20 ms) until it holds or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if agent is not None and agent.proc is not None and agent.proc.poll() is not None \
                and agent.proc.returncode not in (0, -9):
            raise AssertionError(f"agent exited with {agent.proc.returncode}: {what}\n"
                                 + agent.log_text()[-3000:])
        time.sleep(0.02)  # polling interval of a condition wait, not a fixed delay
    tail = agent.log_text()[-3000:] if agent else ""
    raise AssertionError(f"timed out after {timeout}s: {what}\n{tail}")


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "the condition",
                agent: AgentProcess | None = None) -> None:
    """`wait_until` inside the event loop: poll `cond` (every 10 ms, yielding to the loop) until
    it holds; AssertionError naming `what` (and the agent's log tail) when `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tail = agent.log_text()[-3000:] if agent else ""
            raise AssertionError(f"timed out after {timeout}s: {what}\n{tail}")
        await asyncio.sleep(0.01)  # polling interval of a condition wait, not a fixed delay
