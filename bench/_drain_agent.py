"""The agent process of bench/drain.py: a real `Runtime` from a config file, its GPIO on the
simulator's pin factory (as `branch-sim agent` has it), a vault contact toggled from the
simulator's own thread every `--every` seconds, and nothing else in the process.

    python bench/_drain_agent.py CONFIG OUT.json --backlog N --every S [--alarms K]

With `--backlog N` (events already in the outbox) it runs until those N are acknowledged and
the outbox is empty, toggling the contact meanwhile; with `--alarms K` (empty outbox) it toggles
K times and runs until the outbox is empty. OUT.json gets: the wall time of each edge (taken
just before the pin moves), the drain time from `Runtime.run` to an empty outbox, the wall time
the outbox was found empty, and the process's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

from _rig import proc_status_kb

from agent.config import load_config
from agent.core.log import configure_logging
from agent.runtime.root import Runtime
from branchsim.gpio import SimContact, sim_pin_factory
from branchsim.scenario import SimGpioInput

VAULT_PIN = 17


def vault_input() -> SimGpioInput:
    """The contact the benchmark drives. debounce_ms = 0: the figure is the agent's path, not
    the configured debounce, which adds its own fixed delay (default 50 ms) on top."""
    return SimGpioInput(name="vault", pin=VAULT_PIN, kind="vault", debounce_ms=0)


async def _empty(rt: Runtime) -> bool:
    assert rt.outbox is not None
    st = await rt.outbox.stats()
    return not any(st.depth.values()) and st.in_flight_batches == 0


async def run(cfg_path: Path, backlog: int, every: float, alarms: int) -> dict[str, object]:
    cfg = load_config(cfg_path)
    configure_logging(cfg.log.level, cfg.log.format)
    factory = sim_pin_factory()
    contact = SimContact(vault_input(), factory)
    rt = Runtime(cfg, pin_factory=factory, config_path=cfg_path)
    stop = asyncio.Event()
    start = time.perf_counter()
    task = asyncio.create_task(rt.run(stop), name="runtime")
    await rt.ready.wait()
    # Alarms are timed from a connected uplink: a connect is not what the figure is about.
    while not any(u.connected for u in rt.uplinks):
        if task.done():
            task.result()
            raise RuntimeError("runtime stopped")
        await asyncio.sleep(0.005)  # polling interval of a condition wait
    # Every edge's alarm must be committed before "drained" is judged: an edge made just before
    # the end is still crossing from the simulator's thread into the loop when the outbox is
    # first seen empty. The GPIO source counts the readings it has had committed.
    gpio = next(src for src in rt.sources if src.name == "gpio")
    # the contact's initial state is the first reading
    while gpio.health.readings < 1:  # noqa: ASYNC110 - a driver's counter, no event to await
        await asyncio.sleep(0.005)  # polling interval of a condition wait
    committed_before = gpio.health.readings
    edges: list[float] = []
    halt = threading.Event()

    def toggle() -> None:  # the simulator's thread: gpiozero calls the agent back on it
        # Under load the first edge comes at once, so that even a short drain holds one.
        n = 0
        wait = every if alarms else 0.0
        while not halt.wait(wait) and (alarms == 0 or n < alarms):
            edges.append(time.time())
            contact.set(not contact.asserted)
            n += 1
            wait = every

    driver = threading.Thread(target=toggle, name="sim-gpio", daemon=True)
    driver.start()
    try:
        assert rt.forwarder is not None
        while rt.forwarder.stats.events_acked < backlog or (alarms and driver.is_alive()):
            if task.done():
                task.result()
                raise RuntimeError("runtime stopped")
            await asyncio.sleep(0.01)  # polling interval of a condition wait
        halt.set()
        await asyncio.to_thread(driver.join, 10)
        while gpio.health.readings - committed_before < len(edges):  # noqa: ASYNC110 - as above
            await asyncio.sleep(0.005)  # polling interval of a condition wait
        # The last few events (alarms, audit records) may still be on their way.
        while not await _empty(rt):  # noqa: ASYNC110 - the condition is in SQLite: no event to await
            await asyncio.sleep(0.01)  # polling interval of a condition wait
        drained = time.perf_counter() - start
        drained_wall = time.time()
        peak_kb = proc_status_kb("self", "VmHWM")
    finally:
        halt.set()
        driver.join(10)
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {"edges": edges, "drain_s": drained, "drained_wall": drained_wall,
            "peak_rss_kb": peak_kb, "events_acked": rt.forwarder.stats.events_acked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--backlog", type=int, default=0)
    ap.add_argument("--every", type=float, default=0.25)
    ap.add_argument("--alarms", type=int, default=0)
    args = ap.parse_args()
    if not args.backlog and not args.alarms:
        sys.exit("give --backlog or --alarms")
    result = asyncio.run(run(args.config, args.backlog, args.every, args.alarms))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
