"""The telemetry commit window (agent.outbox.writer, `[outbox] telemetry_window_ms`): locally
produced telemetry waits to be committed with company, one fsync'd transaction per window
instead of one per reading (an SD card's wear, issue 16); alarms, alerts and keyed appends (CoAP
readings answered 2.04) never wait for it, and take the waiting telemetry with them. A reading is
accepted (its append resolves) only once its window has committed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent.core.types import ALARM, ALERT, DIAGNOSTIC, TELEMETRY, Event, Reading
from agent.outbox import Outbox
from agent.runtime.pipeline import Pipeline
from agent.runtime.sink import PipelineSink
from tests.support.agentproc import until

WINDOW = 0.6


def ev(i: int, prio: int = TELEMETRY) -> Event:
    return Event(src="s", type="t", v=i, t=time.time(), prio=prio)


async def opened(tmp_path: Path, window: float = WINDOW) -> tuple[Outbox, list[float]]:
    ob = await Outbox.open(tmp_path / "outbox.db", telemetry_window=window)
    commits: list[float] = []
    ob.on_commit(lambda: commits.append(time.monotonic()))
    return ob, commits


async def test_telemetry_waits_for_its_window_and_commits_once(tmp_path: Path) -> None:
    """Telemetry and diagnostics appended over less than a window are accepted together, in
    one transaction, and not before the window of the first has closed.

    Mutation: `window` ignored in `GroupWriter._deadline` (every reading committed after
    `commit_interval`): the appends resolve at once, in several commits; this test fails."""
    ob, commits = await opened(tmp_path)
    try:
        t0 = time.monotonic()
        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(ob.append(ev(i, DIAGNOSTIC if i % 3 else TELEMETRY))))
            await asyncio.sleep(0.02)  # a trickle of readings, 20 ms apart
        await asyncio.sleep(0)
        assert not any(t.done() for t in tasks), "accepted before its window committed"
        ids = await asyncio.gather(*tasks)
        accepted = time.monotonic()
    finally:
        await ob.close()
    assert ids == list(range(1, 11))
    assert accepted - t0 >= WINDOW - 0.01, "committed before the first reading's window closed"
    assert len(commits) == 1, f"{len(commits)} transactions for one window"


async def test_alarms_alerts_and_keyed_appends_do_not_wait(tmp_path: Path) -> None:
    """With a long window, an alarm, an alert or a keyed append (a CoAP reading) is committed
    at once, and the telemetry waiting in the window goes with it."""
    ob, commits = await opened(tmp_path, window=30.0)
    try:
        for urgent in (ev(100, ALARM), ev(101, ALERT), None):
            waiting = asyncio.create_task(ob.append(ev(1)))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            if urgent is None:
                await asyncio.wait_for(ob.append_many([ev(2)], key="coap:atm1:1"), 5)
            else:
                await asyncio.wait_for(ob.append(urgent), 5)
            await asyncio.wait_for(waiting, 5)  # went with it: not 30 s later
    finally:
        await ob.close()
    assert len(commits) == 3


async def test_closing_commits_the_open_window(tmp_path: Path) -> None:
    """A clean stop does not lose the telemetry waiting in the window: close commits it."""
    ob, _ = await opened(tmp_path, window=30.0)
    waiting = asyncio.create_task(ob.append(ev(1)))
    await asyncio.sleep(0.05)
    await ob.close()
    assert await asyncio.wait_for(waiting, 5) == 1
    again = await Outbox.open(tmp_path / "outbox.db")
    try:
        assert sum((await again.stats()).depth.values()) == 1
    finally:
        await again.close()


async def test_a_driver_is_not_held_up_by_the_window(tmp_path: Path) -> None:
    """Through the sink the drivers see, a telemetry reading is handed over and `submit`
    returns at once (a poll loop keeps its pace); it counts as accepted only when its window
    commits. An alarm's `submit` returns after its commit, as before.

    Mutation: the sink awaiting every commit (no hand-over) makes `submit` take the window:
    this test fails."""
    ob, commits = await opened(tmp_path, window=30.0)
    sink = PipelineSink(Pipeline(wall=time.time, synchronized=lambda: True), ob,
                        time.monotonic)
    try:
        t0 = time.monotonic()
        for i in range(5):
            await asyncio.wait_for(sink.submit(Reading("synthetic.t", "temperature", 20.0 + i,
                                                       "Cel")), 5)
        assert time.monotonic() - t0 < 5 and sink.accepted == 0 and commits == []
        await asyncio.wait_for(sink.submit(Reading("gpio.vault", "contact", "open", None,
                                                   priority=ALARM)), 5)
        # the alarm's commit took the waiting telemetry with it: one transaction for all six
        await until(lambda: sink.accepted == 6, 5, "the telemetry accepted with the alarm")
        assert len(commits) == 1
    finally:
        await ob.close()
