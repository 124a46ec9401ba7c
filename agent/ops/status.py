"""`branch-agent status`: what the gateway is doing, from the running agent's status.json (the
runtime rewrites it every 2 s) and, when the agent is not running, from the outbox database
opened read-only (never written: the agent is its only writer).

Shown: outbox depth per priority, age of the oldest unsent event, last acked batch and when,
active uplink, each source's state and last reading, drop counters.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.config import AgentConfig
from agent.outbox import OutboxError, OutboxView

__all__ = ["PRIORITY_NAMES", "STALE_AFTER_S", "collect", "read_db", "render", "watch"]

STALE_AFTER_S = 10.0
PRIORITY_NAMES = {0: "alarm", 1: "alert", 2: "telemetry", 3: "diagnostic"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by the agent's user
    return True


def read_db(path: Path) -> dict[str, Any]:
    """Depth per priority, oldest unsent, last ack and drops, straight from the outbox file,
    read-only (agent.outbox.view: no write, no journal created)."""
    if not path.exists():
        return {"error": f"{path} does not exist (the agent has never run here)"}
    try:
        with OutboxView.open(path, timeout=2.0) as view:
            snap = view.snapshot()
    except OutboxError as exc:
        return {"error": str(exc)}
    return {
        "depth": {PRIORITY_NAMES.get(p, str(p)): n for p, n in snap.depth.items()},
        "in_flight_batches": snap.in_flight_batches,
        "oldest_unsent": snap.oldest_unsent,
        "last_acked_seq": snap.last_acked_seq,
        "last_acked_at": snap.last_acked_at,
        "dropped": snap.dropped,
    }


def collect(cfg: AgentConfig, now: float | None = None) -> dict[str, Any]:
    """One JSON document (what `status --json` prints)."""
    now = time.time() if now is None else now
    path = cfg.gateway.state_dir / "status.json"
    try:
        agent: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        agent = {}
    except (OSError, ValueError):
        agent = {}
    running, reason = True, None
    if not agent:
        running, reason = False, f"no status file {path}"
    elif not _pid_alive(int(agent.get("pid", 0)) or -1):
        running, reason = False, f"process {agent.get('pid')} is gone"
    elif now - float(agent.get("updated", 0)) > STALE_AFTER_S:
        running, reason = False, (f"status file not updated for "
                                  f"{now - float(agent.get('updated', 0)):.0f} s (hung?)")
    doc: dict[str, Any] = {"gateway": cfg.gateway.id, "running": running, "reason": reason,
                           "now": now}
    if running:
        ob = agent.get("outbox", {})
        fw = agent.get("forwarder", {})
        doc["figures_from"] = "agent"
        doc["outbox"] = {
            "depth": {PRIORITY_NAMES.get(int(k), k): v
                      for k, v in ob.get("depth", {}).items()},
            "in_flight_batches": ob.get("in_flight_batches"),
            "oldest_unsent": ob.get("oldest_unsent"),
            "last_acked_seq": ob.get("last_acked_seq", fw.get("last_acked_seq")),
            "last_acked_at": ob.get("last_acked_at", fw.get("last_ack_at")),
            "dropped": ob.get("dropped", {}),
            "refused": ob.get("refused", 0),
            "bytes": ob.get("bytes"),
            "quota_bytes": ob.get("quota_bytes"),
        }
        doc.update(pid=agent.get("pid"), version=agent.get("version"),
                   started=agent.get("started"), updated=agent.get("updated"),
                   clock_synchronized=agent.get("clock_synchronized"),
                   active_uplink=fw.get("active_uplink"), uplinks=agent.get("uplinks", []),
                   sources=agent.get("sources", []), forwarder=fw,
                   pipeline=agent.get("pipeline", {}), accepted=agent.get("accepted"))
    else:
        doc["figures_from"] = "database"
        doc["outbox"] = read_db(cfg.outbox_path)
        doc["last_seen"] = agent.get("updated")
    oldest = doc["outbox"].get("oldest_unsent")
    doc["outbox"]["oldest_unsent_age_s"] = (now - oldest) if oldest else None
    return doc


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    s = max(0.0, now - float(t))
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def render(doc: dict[str, Any]) -> RenderableType:
    now = float(doc["now"])
    parts: list[RenderableType] = []
    if doc["running"]:
        parts.append(Text.assemble(("● running", "bold green"),
                                   f"  gateway {doc['gateway']}  pid {doc.get('pid')}  "
                                   f"up {_ago(doc.get('started'), now).removesuffix(' ago')}"))
    else:
        parts.append(Text.assemble(("● NOT RUNNING", "bold red"),
                                   f"  gateway {doc['gateway']}: {doc['reason']}. "
                                   "Figures below are read from the outbox database."))
    ob = doc["outbox"]
    if "error" in ob:
        parts.append(Text(ob["error"], style="yellow"))
        return Group(*parts)

    t = Table(title="outbox", box=box.SIMPLE, title_justify="left")
    for col in ("alarm", "alert", "telemetry", "diagnostic", "oldest unsent",
                "last acked batch", "dropped"):
        t.add_column(col, justify="right")
    depth = ob.get("depth", {})
    dropped = ob.get("dropped") or {}
    t.add_row(*(str(depth.get(p, 0)) for p in PRIORITY_NAMES.values()),
              f"{ob['oldest_unsent_age_s']:.0f} s" if ob.get("oldest_unsent_age_s") else "-",
              f"#{ob.get('last_acked_seq') or 0} ({_ago(ob.get('last_acked_at'), now)})",
              ", ".join(f"{k}: {v}" for k, v in dropped.items()) or "0")
    parts.append(t)
    if not doc["running"]:
        return Group(*parts)

    u = Table(title="uplinks", box=box.SIMPLE, title_justify="left")
    u.add_column("uplink")
    u.add_column("connected")
    u.add_column("active")
    for up in doc.get("uplinks", []):
        u.add_row(up.get("name", "?"), "yes" if up.get("connected") else "[red]no[/red]",
                  "◀" if up.get("name") == doc.get("active_uplink") else "")
    parts.append(u)

    s = Table(title="sources", box=box.SIMPLE, title_justify="left")
    for col in ("source", "state", "last reading", "readings", "errors"):
        s.add_column(col)
    for src in doc.get("sources", []):
        state = str(src.get("state", "?"))
        style = {"online": "green", "offline": "red"}.get(state, "yellow")
        errors = src.get("errors") or {}
        s.add_row(str(src.get("name")), f"[{style}]{state}[/{style}]",
                  _ago(src.get("last_reading"), now), str(src.get("readings", 0)),
                  ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0")
    parts.append(s)
    return Group(*parts)


def watch(cfg: AgentConfig, console: Console, interval: float = 2.0) -> None:
    """Redraw until interrupted; on a non-terminal (a log, a pipe) print one frame per refresh."""
    if not console.is_terminal:
        while True:
            console.print(render(collect(cfg)))
            console.file.flush()
            time.sleep(interval)  # the refresh period of a display, not a wait for a condition
    with Live(render(collect(cfg)), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)  # the refresh period of a display
            live.update(render(collect(cfg)), refresh=True)
