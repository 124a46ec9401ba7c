"""The group-commit writer, on the event loop: appends queue up and are handed to the database
thread in groups, so the cost of one fsync is shared; an alarm's group goes at once.

The telemetry window (`window`, seconds): an append of locally produced telemetry or
diagnostics only (no alarm, no alert, no idempotency key) may wait up to `window` for company,
so that a branch's trickle of readings costs one fsync'd transaction per window rather than one
per reading (an SD card's wear: bench/footprint.py). Such a reading is accepted once its
window commits, and a power cut before that loses at most `window` seconds of it. Alarms,
alerts and keyed appends (CoAP readings, answered 2.04 to a sensor) commit within
`commit_interval` and take the waiting telemetry with them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from agent.core.errors import StoreError
from agent.core.types import ALARM, ALERT, Event
from agent.outbox.db import DbThread, OutboxError

__all__ = ["Append", "GroupWriter", "Result"]

log = structlog.get_logger(__name__)

Result = list[int] | BaseException  # an append's ids, or the error it gets


@dataclass(slots=True)
class Append:
    events: Sequence[Event]
    future: asyncio.Future[list[int]]
    urgent: bool
    key: str | None = None
    immediate: bool = True  # not telemetry that may wait for the window
    at: float = 0.0  # loop time it was queued


class GroupWriter:
    """`commit(group)` runs on `executor` (the database thread) and returns one result per
    append of the group; it raises only when the whole transaction failed."""

    def __init__(self, commit: Callable[[list[Append]], list[Result]], executor: DbThread, *,
                 commit_interval: float, commit_max: int, window: float = 0.0) -> None:
        self.commit_interval = commit_interval
        self.commit_max = commit_max
        self.window = window
        self._commit = commit
        self._executor = executor
        self._queue: list[Append] = []
        self._queued = 0  # events in _queue
        self._urgent = 0  # appends in _queue that hold an alarm
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self._listeners: list[Callable[[], None]] = []

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-writer")

    async def close(self) -> None:
        """Commit whatever is queued, then return."""
        self.closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    async def submit(self, events: Sequence[Event], key: str | None) -> list[int]:
        if self.closed:
            raise OutboxError("outbox is closed")
        if not events:
            return []
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[int]] = loop.create_future()
        urgent = any(e.prio == ALARM for e in events)
        immediate = key is not None or any(e.prio <= ALERT for e in events)
        self._queue.append(Append(events, fut, urgent, key, immediate, loop.time()))
        self._queued += len(events)
        self._urgent += urgent
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        """Group commit, pipelined: while one commit runs on the database thread, the next group
        gathers on the loop and is handed over as soon as it is full or the running one ends;
        at most two commits are queued for the thread. So under load the thread never waits
        for the loop, and producers whose commit ended run while the next one is written
        (the sqlite3 module releases the GIL inside SQLite). When the writer is idle, a new
        group waits up to `commit_interval` for company, so a trickle shares one fsync."""
        loop = asyncio.get_running_loop()
        running: list[asyncio.Task[None]] = []
        while True:
            running = [t for t in running if not t.done()]
            if not self._queue:
                if self.closed:
                    break
                self._wake.clear()
                await self._wait_for_wake(running, None)
                continue
            if running:
                # A commit is running: gather until it ends, unless the group is full or an
                # alarm waits (then it queues right behind the running commit).
                while (running and not running[-1].done() and not self.closed
                       and self._queued < self.commit_max and not self._urgent):
                    self._wake.clear()
                    await self._wait_for_wake(running, None)
                if len(running) >= 2 and not running[0].done():
                    await asyncio.wait([running[0]])
                if not self._due(loop.time()):
                    continue  # only telemetry waits, its window still open: idle below
            else:
                # Idle: give producers `commit_interval` to join (telemetry alone: until its
                # window closes), unless an alarm waits, the group is full, or we are closing.
                idle_since = loop.time()
                while not self.closed and self._queued < self.commit_max and not self._urgent:
                    remaining = self._deadline(idle_since) - loop.time()
                    if remaining <= 0:
                        break
                    self._wake.clear()
                    await self._wait_for_wake([], remaining)
            urgent = self._urgent > 0
            taken = self._take()
            if taken:
                # An alarm's commit runs before the claims and acks waiting for the database.
                job = asyncio.wrap_future(
                    (self._executor.submit_first if urgent else self._executor.submit)(
                        self._commit, taken))
                running.append(asyncio.create_task(self._finish(job, taken),
                                                   name="outbox-commit"))
        if running:
            await asyncio.wait(running)

    async def _wait_for_wake(self, running: list[asyncio.Task[None]],
                             seconds: float | None) -> None:
        """Until an append arrives, the newest running commit ends, or `seconds` pass."""
        # asyncio.timeout, not wait_for: on 3.11 a cancel racing wait_for can be lost.
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await asyncio.wait([waiter, *running[-1:]],
                                       return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    def _deadline(self, idle_since: float) -> float:
        """When the queued group is to be committed: `commit_interval` after the first
        immediate append (or after the writer went idle), or when the oldest telemetry's
        window closes."""
        first = next((a.at for a in self._queue if a.immediate), None)
        if first is not None or self.window <= 0:
            return max(first or idle_since, idle_since) + self.commit_interval
        return max(self._queue[0].at + self.window, idle_since + self.commit_interval)

    def _due(self, now: float) -> bool:
        """Whether the queue may be committed now that the running commit ended."""
        return (self.closed or self._urgent > 0 or self._queued >= self.commit_max
                or self.window <= 0 or any(a.immediate for a in self._queue)
                or now >= self._queue[0].at + self.window)

    def _take(self) -> list[Append]:
        """The next group: whole appends up to `commit_max` events (at least one append), or
        the whole queue when an alarm waits in it (the alarm commits at once, with company)."""
        if self._urgent or self.closed or self._queued <= self.commit_max:
            taken, self._queue = self._queue, []
        else:
            n = count = 0
            while n < len(self._queue) and (n == 0 or count + len(self._queue[n].events)
                                            <= self.commit_max):
                count += len(self._queue[n].events)
                n += 1
            taken, self._queue = self._queue[:n], self._queue[n:]
        self._queued -= sum(len(a.events) for a in taken)
        self._urgent -= sum(a.urgent for a in taken)
        return taken

    async def _finish(self, job: asyncio.Future[list[Result]], taken: list[Append]) -> None:
        """Resolve the producers of one committed group (or fail them all)."""
        try:
            results = await job
        except Exception as exc:  # the transaction failed: nobody's events are accepted
            log.error("outbox.commit_failed", error=str(exc), events=len(taken))
            err = exc if isinstance(exc, StoreError) else OutboxError(f"commit failed: {exc}")
            for a in taken:
                if not a.future.done():
                    a.future.set_exception(err)
            return
        for a, res in zip(taken, results, strict=True):
            if a.future.done():
                continue
            if isinstance(res, BaseException):
                a.future.set_exception(res)
            else:
                a.future.set_result(res)
        for cb in self._listeners:
            cb()
