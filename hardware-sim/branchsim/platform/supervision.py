"""Path supervision at the reference platform (docs/PROTOCOL.md 7): each gateway's heartbeats on
each of its paths (MQTT, CoAP), checked, answered, and watched against the reporting times.

A bank's alarm transmission is categorised by EN 50136-1; its dual-path categories (DP3, DP4)
need both paths supervised, and vendors summarise the grade-4 reporting times as 3 minutes for
the loss of one path and 5 hours for the loss of the other. Here:

- `gateway.path_lost` (attrs `path`, `silent_s`, `reporting_time_s`): a path a gateway has sent
  heartbeats on has been silent longer than `path_lost_after` (default 180 s);
- `gateway.path_restored` (attrs `path`, `lost_s`): the next heartbeat accepted on a lost path;
- `gateway.offline` (attrs `paths`, `silent_s`, `reporting_time_s`): every path of the gateway
  is lost and the newest heartbeat on any of them is older than `offline_after` (default
  18000 s, at least `path_lost_after`); `gateway.online` (attrs `path`) when one comes back.

`PathSupervisor` is the state machine, pure (plain numbers for the clock). `Supervision` puts it
behind the transports: it verifies a heartbeat (the key registered to its gateway, the path it
arrived on, a seq above the path's last), answers it, and records the events in the store (the
operators' `branch-platform supervision`) and the log. A heartbeat refused is counted in the
store's rejections as `heartbeat-<reason>` and here per (gateway, reason). Thread-safe: the MQTT
side calls it from paho's thread, the CoAP side and the timer from asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import ProtocolError
from agent.protocol.heartbeat import (
    HeartbeatAnswer,
    encode_heartbeat_answer,
    verify_heartbeat,
)

__all__ = ["OFFLINE_AFTER_S", "PATH_LOST_AFTER_S", "PathSupervisor", "Supervision",
           "SupervisionEvent", "SupervisionStore"]

log = structlog.get_logger(__name__)

PATH_LOST_AFTER_S = 180.0  # EN 50136 grade 4 as vendors summarise it: loss of one path, 3 min
OFFLINE_AFTER_S = 5 * 3600.0  # ... and of the other, 5 h


@dataclass(frozen=True, slots=True)
class SupervisionEvent:
    type: str  # gateway.path_lost / gateway.path_restored / gateway.offline / gateway.online
    gw: str
    attrs: dict[str, Any] = field(default_factory=dict)


class PathSupervisor:
    """Per gateway and path: when it was last heard, whether it is lost; per gateway: offline.
    `now` is any monotonic clock in seconds."""

    def __init__(self, path_lost_after: float = PATH_LOST_AFTER_S,
                 offline_after: float = OFFLINE_AFTER_S) -> None:
        if path_lost_after <= 0 or offline_after < path_lost_after:
            raise ValueError("expected 0 < path_lost_after <= offline_after")
        self.path_lost_after = path_lost_after
        self.offline_after = offline_after
        self._last: dict[str, dict[str, float]] = {}
        self._lost: dict[str, dict[str, float]] = {}  # gw -> {lost path: last heard}
        self._offline: set[str] = set()

    def watch(self, gw: str, path: str, now: float) -> None:
        """Supervise a path known from before (the platform restarted) as if heard `now`."""
        self._last.setdefault(gw, {}).setdefault(path, now)

    def heard(self, gw: str, path: str, now: float) -> list[SupervisionEvent]:
        """An accepted heartbeat: the path is alive (and the gateway online) again."""
        out: list[SupervisionEvent] = []
        self._last.setdefault(gw, {})[path] = now
        lost = self._lost.get(gw, {})
        if path in lost:
            out.append(SupervisionEvent("gateway.path_restored", gw,
                                        {"path": path, "lost_s": round(now - lost.pop(path), 3)}))
        if gw in self._offline:
            self._offline.discard(gw)
            out.append(SupervisionEvent("gateway.online", gw, {"path": path}))
        return out

    def check(self, now: float) -> list[SupervisionEvent]:
        """What has become due: paths silent past `path_lost_after`, gateways past
        `offline_after` with every path lost."""
        out: list[SupervisionEvent] = []
        for gw, paths in self._last.items():
            lost = self._lost.setdefault(gw, {})
            for path, at in sorted(paths.items()):
                if path not in lost and now - at > self.path_lost_after:
                    lost[path] = at
                    out.append(SupervisionEvent("gateway.path_lost", gw, {
                        "path": path, "silent_s": round(now - at, 3),
                        "reporting_time_s": self.path_lost_after}))
            newest = max(paths.values())
            if (gw not in self._offline and len(lost) == len(paths)
                    and now - newest > self.offline_after):
                self._offline.add(gw)
                out.append(SupervisionEvent("gateway.offline", gw, {
                    "paths": sorted(paths), "silent_s": round(now - newest, 3),
                    "reporting_time_s": self.offline_after}))
        return out

    def lost(self, gw: str) -> set[str]:
        return set(self._lost.get(gw, {}))

    def offline(self, gw: str) -> bool:
        return gw in self._offline


class SupervisionStore(Protocol):
    """What supervision needs from a platform store (the SQLite `Receiver` has it)."""

    def registration(self, kid: bytes) -> tuple[str, Ed25519PublicKey] | None: ...

    def advance_heartbeat(self, gw: str, path: str, seq: int, at: float
                          ) -> tuple[bool, int]: ...

    def heartbeat_paths(self) -> list[tuple[str, str]]: ...

    def record_platform_event(self, gw: str, type: str, attrs: dict[str, Any],
                              at: float) -> None: ...

    def count_rejection(self, gw: str, reason: str) -> None: ...


class Supervision:
    """Heartbeats in, answers out; events recorded (module doc)."""

    def __init__(self, store: SupervisionStore, *, path_lost_after: float = PATH_LOST_AFTER_S,
                 offline_after: float = OFFLINE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.machine = PathSupervisor(path_lost_after, offline_after)
        self.refused: Counter[tuple[str, str]] = Counter()
        self.accepted: Counter[tuple[str, str]] = Counter()  # by (gateway, path)
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        for gw, path in store.heartbeat_paths():
            self.machine.watch(gw, path, now)

    def handle_heartbeat(self, data: bytes, via: str, topic_gw: str | None = None) -> bytes:
        """Check one heartbeat that arrived on path `via` (for gateway `topic_gw`, from its
        topic or URI); the encoded answer. Never raises for bad input: it is refused."""
        h = hashlib.sha256(data).digest()
        owner: list[str] = []

        def key_for(kid: bytes) -> Ed25519PublicKey | None:
            found = self.store.registration(kid)
            if found is None:
                return None
            owner.append(found[0])
            return found[1]

        seq = 0
        try:
            hb = verify_heartbeat(data, key_for)
            seq = hb.seq
            if owner[0] != hb.gw or (topic_gw is not None and topic_gw != hb.gw):
                raise ProtocolError("wrong-gateway", f"key of {owner[0]}, heartbeat of {hb.gw}")
            if hb.path != via:
                raise ProtocolError("wrong-path", f"a {hb.path} heartbeat arrived on {via}")
            ok, last = self.store.advance_heartbeat(hb.gw, hb.path, hb.seq, time.time())
            if not ok:
                self._refuse(hb.gw, "replay", f"seq {hb.seq} <= last {last}", via)
                return encode_heartbeat_answer(HeartbeatAnswer(h, hb.seq, False, "replay", last))
        except ProtocolError as exc:
            self._refuse(topic_gw or (owner[0] if owner else ""), exc.reason, exc.detail, via)
            return encode_heartbeat_answer(HeartbeatAnswer(h, seq, False, exc.reason))
        with self._lock:
            self.accepted[(hb.gw, hb.path)] += 1
            events = self.machine.heard(hb.gw, hb.path, self._clock())
        self._record(events)
        log.debug("platform.heartbeat", gw=hb.gw, path=hb.path, seq=hb.seq)
        return encode_heartbeat_answer(HeartbeatAnswer(h, hb.seq, True))

    def _refuse(self, gw: str, reason: str, detail: str, via: str) -> None:
        with self._lock:
            self.refused[(gw, reason)] += 1
        self.store.count_rejection(gw, f"heartbeat-{reason}")
        log.warning("platform.heartbeat_refused", gw=gw, path=via, reason=reason, detail=detail)

    def tick(self) -> list[SupervisionEvent]:
        """Raise what has become due now (the timer calls it)."""
        with self._lock:
            events = self.machine.check(self._clock())
        self._record(events)
        return events

    def _record(self, events: list[SupervisionEvent]) -> None:
        for ev in events:
            self.store.record_platform_event(ev.gw, ev.type, ev.attrs, time.time())
            level = log.info if ev.type in ("gateway.path_restored", "gateway.online") \
                else log.warning
            level(ev.type, gw=ev.gw, **ev.attrs)

    def period(self) -> float:
        """How often `run` checks: a tenth of the shortest reporting time, at most 1 s."""
        return min(1.0, self.machine.path_lost_after / 10)

    async def run(self) -> None:
        """Check on a timer until cancelled."""
        while True:
            self.tick()
            await asyncio.sleep(self.period())

