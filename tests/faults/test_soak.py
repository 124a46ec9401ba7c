"""Soak: realistic branch traffic with periodic WAN outages; the agent's RSS and open file
descriptors are sampled and must not grow. FAULTS_SOAK_S sets the full run's length (default
1800 s, `make faults`); the default suite runs a 20 s version."""

from __future__ import annotations

import os
import random
import statistics
import time

import pytest

from tests.faults.checker import SUMMARY
from tests.faults.conftest import Chain, counter


def sample(pid: int) -> tuple[int, int]:
    """(RSS in kB, open fds) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def soak(chain: Chain, seconds: float, rng: random.Random) -> None:
    chain.start_agent(
        *(counter(f"temp{i}", 2.0) for i in range(8)),        # room sensors
        counter("power", 10.0),                                # UPS / mains telemetry
        counter("diag", 1.0, prio=3, type="diag.heartbeat"),   # diagnostics
        counter("door", 0.5, prio=1, type="door.state"),       # alerts
        counter("alarm", 0.3, prio=0, type="alarm.test"),      # alarms
        counter("burst", 200.0, batch=20),                     # a chatty serial device
    )
    chain.wait_delivered(50)
    assert chain.agent.proc is not None
    pid = chain.agent.proc.pid
    period = max(6.0, seconds / 10)
    outages = ["cut", "blackhole", "latency", "half_open"]
    samples: list[tuple[float, int, int]] = []
    t0 = time.monotonic()
    next_outage = t0 + period / 2
    outage_end: float | None = None
    injected = 0
    while (now := time.monotonic()) - t0 < seconds:
        rss, fds = sample(pid)
        samples.append((now - t0, rss, fds))
        if outage_end is not None and now >= outage_end:
            chain.proxy.heal()
            outage_end = None
        if now >= next_outage:
            # Long runs take every kind in turn; short ones a random one each period.
            kind = outages[injected % len(outages)] if seconds > 60 else rng.choice(outages)
            injected += 1
            if kind == "cut":
                chain.proxy.cut()
            elif kind == "blackhole":
                chain.proxy.blackhole(True)
                outage_end = now + period / 3
            elif kind == "latency":
                chain.proxy.latency(0.5)
                outage_end = now + period / 3
            else:
                chain.proxy.half_open()
            next_outage = now + period
        time.sleep(0.5)  # the sampling interval of the soak, not a wait for a condition
    assert chain.agent.running
    chain.drain(timeout=120)
    rep = chain.check(f"soak {seconds:.0f} s", counter_sources=[])
    assert rep.lost == 0
    # Growth: the last quarter against the quarter after warm-up (first 20 % skipped).
    n = len(samples)
    warm = samples[n // 5: n // 5 + max(1, n // 4)]
    last = samples[-max(1, n // 4):]
    rss0 = statistics.median(s[1] for s in warm)
    rss1 = statistics.median(s[1] for s in last)
    fd0 = max(s[2] for s in warm)
    fd1 = max(s[2] for s in last)
    SUMMARY.figures[f"soak {seconds:.0f}s RSS kB start->end"] = f"{rss0:.0f}->{rss1:.0f}"
    SUMMARY.figures[f"soak {seconds:.0f}s open fds start->end"] = f"{fd0}->{fd1}"
    assert rss1 <= rss0 * 1.10 + 4096, f"RSS grew from {rss0} kB to {rss1} kB"
    assert fd1 <= fd0 + 2, f"open fds grew from {fd0} to {fd1}"


def test_soak_short(chain: Chain, rng: random.Random) -> None:
    """20 s of branch traffic with outages: nothing lost, RSS and open fds flat."""
    soak(chain, 20.0, rng)


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_soak_full(chain: Chain, rng: random.Random) -> None:
    """FAULTS_SOAK_S (default 30 min) of branch traffic with outages: nothing lost, RSS and
    open fds flat."""
    soak(chain, float(os.environ.get("FAULTS_SOAK_S", "1800")), rng)
