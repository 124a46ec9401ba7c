"""`branch-agent status`: what the gateway is doing, from the running agent's status.json (the
runtime rewrites it every 2 s) and, when the agent is not running, from the outbox database
opened read-only (never written: the agent is its only writer).

Shown: outbox depth per priority, age of the oldest unsent event, last acked batch and when,
active uplink, each source's state and last reading, drop counters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from agent.config import AgentConfig
from agent.core.paths import RuntimeLayout
from agent.core.types import Priority
from agent.ops.render import colour, table
from agent.outbox import OutboxError, OutboxView

__all__ = ["PRIORITY_NAMES", "STALE_AFTER_S", "collect", "pid_alive", "read_db", "render",
           "watch"]

STALE_AFTER_S = 10.0
PRIORITY_NAMES = {int(p): p.label for p in Priority}


def pid_alive(pid: int) -> bool:
    """Is there a process `pid` (also one of another user, as the agent's is to an operator)?"""
    if pid <= 0:
        return False
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
    path = RuntimeLayout(cfg.gateway.runtime_dir).status
    agent: dict[str, Any] = {}
    unreadable = None
    try:
        loaded = json.loads(path.read_text())
        agent = loaded if isinstance(loaded, dict) else {}
        if not agent:
            unreadable = "not a status document"
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # the agent writes it atomically: damage, not a race
        unreadable = str(exc) if isinstance(exc, OSError) else "not valid JSON"
    running, reason = True, None
    if unreadable is not None:
        running, reason = False, f"status file {path} is unreadable ({unreadable})"
    elif not agent:
        running, reason = False, f"no status file {path}"
    elif not pid_alive(int(agent.get("pid", 0) or 0)):
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


def render(doc: dict[str, Any]) -> str:
    """The human view of `collect`'s document, as plain text (colour on a terminal)."""
    now = float(doc["now"])
    parts: list[str] = []
    if doc["running"]:
        parts.append(f"{colour('● running', 'green')}  gateway {doc['gateway']}  "
                     f"pid {doc.get('pid')}  "
                     f"up {_ago(doc.get('started'), now).removesuffix(' ago')}")
    else:
        parts.append(f"{colour('● NOT RUNNING', 'red')}  gateway {doc['gateway']}: "
                     f"{doc['reason']}. Figures below are read from the outbox database.")
    ob = doc["outbox"]
    if "error" in ob:
        parts.append(colour(ob["error"], "yellow"))
        return "\n\n".join(parts)
    depth = ob.get("depth", {})
    dropped = ob.get("dropped") or {}
    parts.append(table([(
        *(str(depth.get(p, 0)) for p in PRIORITY_NAMES.values()),
        f"{ob['oldest_unsent_age_s']:.0f} s" if ob.get("oldest_unsent_age_s") else "-",
        f"#{ob.get('last_acked_seq') or 0} ({_ago(ob.get('last_acked_at'), now)})",
        ", ".join(f"{k}: {v}" for k, v in dropped.items()) or "0",
    )], (*PRIORITY_NAMES.values(), "oldest unsent", "last acked batch", "dropped"),
        title="outbox"))
    if not doc["running"]:
        return "\n\n".join(parts)
    parts.append(table(
        [(up.get("name", "?"), "yes" if up.get("connected") else colour("no", "red"),
          "◀" if up.get("name") == doc.get("active_uplink") else "")
         for up in doc.get("uplinks", [])],
        ("uplink", "connected", "active"), title="uplinks"))
    states = {"online": "green", "offline": "red"}
    parts.append(table(
        [(str(src.get("name")),
          colour(str(src.get("state", "?")), states.get(str(src.get("state")), "yellow")),
          _ago(src.get("last_reading"), now), str(src.get("readings", 0)),
          ", ".join(f"{k}: {v}" for k, v in (src.get("errors") or {}).items()) or "0",
          ", ".join(f"{k}: {v}" for k, v in (src.get("stats") or {}).items()))
         for src in doc.get("sources", [])],
        ("source", "state", "last reading", "readings", "errors", "counters"),
        title="sources", wrap=(None, None, None, None, 40, 40)))
    return "\n\n".join(parts)


def watch(cfg: AgentConfig, interval: float = 2.0, stream: TextIO | None = None) -> None:
    """Redraw until interrupted: on a terminal the screen is cleared for each frame; on
    anything else (a log, a pipe) one frame is printed per refresh."""
    stream = stream or sys.stdout
    clear = "\x1b[H\x1b[2J" if stream.isatty() else ""
    while True:
        stream.write(f"{clear}{render(collect(cfg))}\n\n")
        stream.flush()
        time.sleep(interval)  # the refresh period of a display, not a wait for a condition
