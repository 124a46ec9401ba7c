"""`branch-agent demo` (what `make demo` runs): a whole branch on one machine.

The simulator plays `night-intrusion` on GPIO contacts with a telemetry background, the real agent
runtime reads it through the same seams as on a Pi, and the reference platform verifies every
signed batch. Over MQTT with mutual TLS when mosquitto is installed (a throwaway PKI is made for
the run), over CoAP otherwise. Halfway the uplink is cut for a while, so the outbox buffers and
then drains. The summary counts events produced, delivered, verified and lost (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from agent.config import AgentConfig, parse_config
from agent.core.types import Priority
from agent.outbox import OutboxView
from agent.runtime.root import Runtime, install_signal_handlers
from agent.security.keys import generate_keypair
from branchsim.agentrun import merge_sim_sources, started_sim

__all__ = ["DemoResult", "main", "run_demo"]

log = structlog.get_logger(__name__)
SCENARIO = "night-intrusion"
SCENARIO_SECONDS = 60.0


@dataclass
class DemoResult:
    transport: str
    produced: int = 0
    delivered: int = 0
    verified_batches: int = 0
    dropped: int = 0
    duplicates: int = 0
    rejected: int = 0
    replays: int = 0
    lost: int = 0
    lost_ids: list[int] = field(default_factory=list)
    workdir: str = ""


class _Transport(Protocol):
    """The WAN end: a broker + platform receiver (MQTT) or the platform's CoAP endpoint."""

    name: str

    async def start(self) -> None: ...
    async def cut(self) -> None: ...
    async def restore(self) -> None: ...
    async def close(self) -> None: ...
    def uplink_config(self) -> dict[str, Any]: ...


class _MqttTransport:
    name = "mqtt"

    def __init__(self, workdir: Path, receiver: Any) -> None:
        from branchsim.broker import Mosquitto
        from branchsim.pki import make_pki

        self.pki = make_pki(workdir / "pki")
        self.broker = Mosquitto(workdir / "broker", tls=self.pki)
        self.receiver = receiver
        self.server: Any = None

    async def start(self) -> None:
        from branchsim.platform.mqtt_server import MqttPlatformServer, PlatformTls

        await asyncio.to_thread(self.broker.start)
        self.server = MqttPlatformServer(
            self.receiver, "127.0.0.1", self.broker.port,
            tls=PlatformTls(ca=self.pki.ca_cert, cert=self.pki.platform_cert,
                            key=self.pki.platform_key),
            client_id="branch-platform-demo",
        )
        self.server.start()
        await asyncio.to_thread(self.server.ready.wait, 15)

    async def cut(self) -> None:
        await asyncio.to_thread(self.broker.stop)

    async def restore(self) -> None:
        await asyncio.to_thread(self.broker.start)

    async def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        await asyncio.to_thread(self.broker.stop)

    def uplink_config(self) -> dict[str, Any]:
        return {
            "order": ["mqtt"],
            "mqtt": {
                "host": "127.0.0.1", "port": self.broker.port, "keepalive": 5,
                "backoff_base": 0.2, "backoff_max": 2.0,
                "tls": {"ca": str(self.pki.ca_cert), "cert": str(self.pki.client_cert),
                        "key": str(self.pki.client_key)},
            },
        }


class _CoapTransport:
    name = "coap"

    def __init__(self, receiver: Any) -> None:
        from branchsim.broker import get_free_port

        self.receiver = receiver
        self.port = get_free_port()
        self.ctx: Any = None

    async def start(self) -> None:
        from branchsim.platform.coap_server import serve_coap

        self.ctx = await serve_coap(self.receiver, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self.ctx is not None:
            await self.ctx.shutdown()
            self.ctx = None

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()

    def uplink_config(self) -> dict[str, Any]:
        return {"order": ["coap"],
                "coap": {"base": f"coap://127.0.0.1:{self.port}", "insecure": True,
                         "timeout": 3.0, "probe_interval": 1.0}}


def _agent_config(workdir: Path, uplink: dict[str, Any], telemetry: int) -> AgentConfig:
    return parse_config({
        "gateway": {"id": "demo-branch", "state_dir": str(workdir / "state"),
                    "runtime_dir": str(workdir / "run"),
                    "key_file": str(workdir / "keys" / "signing.key"), "time_sync": "auto"},
        "log": {"level": "warning"},
        # telemetry commits once a second here (10 s by default on a gateway): the demo is short
        "outbox": {"telemetry_window_ms": 1000.0},
        "forwarder": {"ack_timeout_s": 3.0, "status_interval_s": 2.0, "batch_max_events": 200},
        "uplink": {**uplink, "failover_after_s": 2.0},
        "sources": {"synthetic": [
            {"name": "server_room", "type": "temperature", "unit": "Cel", "rate_hz": 20.0,
             "count": telemetry},
            {"name": "vault_humidity", "type": "humidity", "unit": "%RH", "rate_hz": 5.0,
             "count": telemetry // 4},
        ]},
        "rules": [{"source": "synthetic.*", "deadband": 0.0}],
    })


def _outbox_ids(state: Path) -> tuple[int, set[int]]:
    """(highest id ever assigned, ids still held) read from the outbox file, read-only."""
    with OutboxView.open(state / "outbox.db") as view:
        return view.snapshot().next_id - 1, view.held_ids()


def _view(rt: Runtime, receiver: Any, gw: str, phase: str, recent: deque[str],
          transport: str) -> Group:
    st = rt.outbox_stats
    fw = rt.forwarder.stats if rt.forwarder else None
    sensors = Table(title="Sensors", expand=True)
    for col in ("source", "state", "readings", "errors"):
        sensors.add_column(col)
    for s in rt.sources:
        h = s.health
        errs = ", ".join(f"{k}={v}" for k, v in h.errors.items()) or "-"
        sensors.add_row(h.name, str(h.state), str(h.readings), errs)
    flow = Table(title="Flow", expand=True)
    flow.add_column("figure")
    flow.add_column("value", justify="right")
    depth = sum(st.depth.values()) if st else 0
    flow.add_row("events accepted (durable)", str(rt.sink.accepted if rt.sink else 0))
    flow.add_row("outbox depth", str(depth))
    flow.add_row(f"uplink ({transport})",
                 "up" if any(u.connected for u in rt.uplinks) else "[red]down[/red]")
    flow.add_row("batches acked", str(fw.batches_acked if fw else 0))
    flow.add_row("batches verified by platform", str(receiver.batch_count(gw)))
    flow.add_row("events at platform", str(len(receiver.events(gw))))
    return Group(
        Panel(f"[b]Branch gateway demo[/b] — {phase}", expand=True),
        sensors, flow,
        Panel("\n".join(recent) or "(waiting)", title="Latest verified alarms and alerts"),
    )


async def run_demo(duration: float, headless: bool, transport: str, workdir: Path,
                   console: Console | None = None, speed: float | None = None) -> DemoResult:
    from branchsim.broker import find_mosquitto
    from branchsim.platform.receiver import Receiver

    # soft_wrap: piped or under CI (80 columns), a progress line stays one line
    console = console or Console(soft_wrap=True)
    _log_to_file(workdir / "demo.log")
    if transport == "auto":
        transport = "mqtt" if find_mosquitto() else "coap"
    info = generate_keypair(workdir / "keys", force=True)
    receiver = Receiver(workdir / "platform.db")
    gw = "demo-branch"
    receiver.register(gw, info.public_pem)
    wan: _Transport = (_MqttTransport(workdir, receiver) if transport == "mqtt"
                       else _CoapTransport(receiver))
    await wan.start()
    speed = speed or SCENARIO_SECONDS / max(1.0, duration * 0.6)
    telemetry = int(duration * 0.7 * 20)
    cfg = _agent_config(workdir, wan.uplink_config(), telemetry)
    result = DemoResult(transport=transport, workdir=str(workdir))
    stop = asyncio.Event()
    install_signal_handlers(stop)
    console.print(f"[b]demo[/b]: transport {transport}, duration {duration:.0f} s, scenario "
                  f"{SCENARIO} at {speed:.1f}x, work dir {workdir}")
    recent: deque[str] = deque(maxlen=8)
    seen_ids: set[int] = set()
    try:
        with started_sim(SCENARIO, workdir / "sim", speed) as sim:
            rt = Runtime(merge_sim_sources(cfg, sim.agent_sources_config()),
                         pin_factory=sim.pin_factory)
            run_task = asyncio.create_task(rt.run(stop), name="runtime")
            await asyncio.wait_for(rt.ready.wait(), 30)
            sim.resume()
            t0 = time.monotonic()
            cut_at, restore_at = duration * 0.4, duration * 0.6
            phase = "running"
            # No live view without a terminal (CI logs, a pipe): periodic lines instead.
            live = (Live(console=console, refresh_per_second=4, transient=False)
                    if not headless and console.is_terminal else None)
            with live if live is not None else contextlib.nullcontext():
                last_print = 0.0
                while not stop.is_set():
                    now = time.monotonic() - t0
                    if phase == "running" and now >= cut_at:
                        await wan.cut()
                        phase = "uplink CUT: events buffer in the outbox"
                    elif phase.startswith("uplink CUT") and now >= restore_at:
                        await wan.restore()
                        phase = "uplink restored: backlog drains"
                    elif now >= duration:
                        break
                    for e in receiver.events(gw):
                        if e["id"] in seen_ids:
                            continue
                        seen_ids.add(e["id"])
                        if e["prio"] <= 1:
                            recent.append(f"{Priority(e['prio']).label:>9}  {e['src']:<22} "
                                          f"{e['type']:<16} {e['v']}")
                    if live is not None:
                        live.update(_view(rt, receiver, gw, phase, recent, transport))
                    elif now - last_print >= 2.0:
                        last_print = now
                        st = rt.outbox_stats
                        console.print(
                            f"t={now:5.1f}s {phase}: accepted "
                            f"{rt.sink.accepted if rt.sink else 0}, outbox "
                            f"{sum(st.depth.values()) if st else 0}, verified batches "
                            f"{receiver.batch_count(gw)}, events at platform {len(seen_ids)}")
                    await asyncio.sleep(0.25)
                # Let the backlog drain before the count (bounded).
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not stop.is_set():
                    _, held = await asyncio.to_thread(_outbox_ids, cfg.gateway.state_dir)
                    if not held:
                        break
                    await asyncio.sleep(0.25)
            stop.set()
            await run_task
    finally:
        with contextlib.suppress(Exception):
            await wan.close()
    produced, held = _outbox_ids(cfg.gateway.state_dir)
    events = receiver.events(gw)
    delivered = {int(e["id"]) for e in events}
    dropped: set[int] = set()
    for e in events:
        if e["type"] == "gateway.dropped" and isinstance(e["v"], dict):
            for a, b in e["v"].get("ids", []):
                dropped.update(range(int(a), int(b) + 1))
    lost = sorted(set(range(1, produced + 1)) - delivered - dropped - held)
    result.produced = produced
    result.delivered = len(delivered)
    result.verified_batches = receiver.batch_count(gw)
    result.dropped = len(dropped)
    result.duplicates = len(events) - len(delivered)
    counters = receiver.counters()
    # A replay is a batch the platform already holds, re-sent after the cut (MQTT QoS 1
    # redelivers what was in flight): harmless, acked, nothing stored twice. Anything else is
    # a rejection.
    result.replays = sum(n for (_, why), n in counters.items() if why == "replay")
    result.rejected = sum(n for (_, why), n in counters.items() if why != "replay")
    result.lost = len(lost) + len(held)
    result.lost_ids = lost[:20]
    receiver.close()
    _print_summary(console, result)
    return result


def _log_to_file(path: Path) -> None:
    """The live view owns the terminal: every component's log goes to a JSON-lines file."""

    from agent.core.log import configure_logging

    stream = path.open("a", buffering=1)
    configure_logging("info", "json", stream=stream)  # the libraries' records too


def _print_summary(console: Console, r: DemoResult) -> None:
    t = Table(title="Demo summary")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in (("transport", r.transport), ("events produced (accepted)", r.produced),
                 ("delivered to the platform", r.delivered),
                 ("batches verified (signature + chain)", r.verified_batches),
                 ("dropped with a drop record", r.dropped), ("duplicates stored", r.duplicates),
                 ("re-sent batches recognised as replays", r.replays),
                 ("batches rejected", r.rejected), ("lost", r.lost)):
        t.add_row(k, str(v))
    console.print(t)
    console.print(f"work dir kept: {r.workdir} (demo.log: every component's log)")
    console.print(f"LOST: {r.lost}" + (f" (ids {r.lost_ids})" if r.lost else ""))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options, for `branch-sim demo` and `branch-agent demo` alike."""
    p.add_argument("--duration", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--headless", action="store_true", help="no live view; print the summary")
    p.add_argument("--transport", choices=["auto", "mqtt", "coap"], default="auto")
    p.add_argument("--workdir", metavar="DIR")
    p.add_argument("--speed", type=float, default=None, metavar="X",
                   help="scenario time compression (default: fit the scenario in the run)")
    p.set_defaults(func=main)


HELP = "simulator + agent + platform in one terminal"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`branch-agent demo`, through the entry point this distribution declares in the group
    `branch_agent.commands` (the product finds it without importing the simulator)."""
    add_arguments(sub.add_parser("demo", help=HELP))


def main(args: argparse.Namespace) -> int:
    """Entry point for `branch-sim demo` and `branch-agent demo`; exit 0 only when nothing was
    lost."""
    workdir = Path(args.workdir) if getattr(args, "workdir", None) else Path(
        tempfile.mkdtemp(prefix="branch-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    speed = getattr(args, "speed", None)
    result = asyncio.run(run_demo(float(args.duration), bool(args.headless),
                                  str(getattr(args, "transport", "auto")), workdir,
                                  speed=float(speed) if speed else None))
    return 0 if result.lost == 0 and result.rejected == 0 else 1
