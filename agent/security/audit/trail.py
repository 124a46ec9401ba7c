"""The runtime's audit trail: each fact becomes a local record (in a worker thread) and an
`audit.*` event (priority ALERT) in the outbox. A broken log never holds up the event: the gap
is announced once (`audit.degraded`) and its end recorded (`audit.recovered`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from agent.core.clock import Clock
from agent.core.types import ALERT, TQ_SYNCED, TQ_UNSYNCED, Event
from agent.security.audit.logfile import AuditLog, AuditWriteError
from agent.security.audit.record import AuditRecord, current_actor

__all__ = ["AuditTrail"]

log = structlog.get_logger(__name__)


class AuditTrail:
    """`await trail.record("audit.x", {...})`: the local record (in a worker thread) and the
    `audit.x` event (priority ALERT) through `emit` (the runtime's outbox append)."""

    SOURCE = "agent.audit"

    def __init__(self, local: AuditLog | None, emit: Callable[[Event], Awaitable[Any]],
                 clock: Clock) -> None:
        self.local = local
        self.emit = emit
        self.clock = clock
        self.degraded = False
        self.failures = 0

    async def record(self, type: str, attrs: Mapping[str, Any] | None = None,
                     actor: str | None = None) -> AuditRecord | None:
        """Never raises for a broken audit log; the outbox event goes out either way."""
        actor = actor or current_actor()
        rec: AuditRecord | None = None
        error: str | None = None
        if self.local is not None:
            try:
                if self.degraded:  # the gap in the local log is itself recorded
                    back = await asyncio.to_thread(self.local.append, "audit.recovered",
                                                   {"failures": self.failures}, "agent")
                    self.degraded = False
                    log.warning("audit.recovered", failures=self.failures)
                    await self._emit("audit.recovered", {"failures": self.failures,
                                                         "n": back.n, "h": back.h}, "agent")
                rec = await asyncio.to_thread(self.local.append, type, attrs, actor)
            except AuditWriteError as exc:
                error = str(exc)
        if error is not None:
            self.failures += 1
            if not self.degraded:
                self.degraded = True
                log.error("audit.degraded", error=error)
                await self._emit("audit.degraded", {"error": error}, actor="agent")
        extra = {"n": rec.n, "h": rec.h} if rec is not None else {"n": None}
        await self._emit(type, {**(attrs or {}), **extra}, actor)
        return rec

    async def _emit(self, type: str, attrs: Mapping[str, Any], actor: str) -> None:
        event = Event(src=self.SOURCE, type=type, v=actor, t=self.clock.time(),
                      tq=TQ_SYNCED if self.clock.synchronized() else TQ_UNSYNCED, prio=ALERT,
                      attrs=dict(attrs))
        try:
            await self.emit(event)
        except Exception:  # the outbox reports its own failures; the caller must go on
            log.exception("audit.emit_failed", type=type)
