"""Token buckets for drivers that take input nobody asked for (CoAP ingest, BLE adverts,
serial line devices): a flood is refused in O(1) before any parsing, so it cannot starve the
event loop that also carries the GPIO alarms.

`TokenBucket` refills at `rate` tokens per second up to `burst`; `take()` never waits (a driver
answers "too many requests" or drops instead of queueing). `LogGate` lets one log line per
interval through and counts what it held back, so a refused flood does not become a log flood;
`LogGates` keeps one per kind of rejection.

Both take a monotonic time function (the driver's ``ctx.clock.monotonic``) so tests can drive
them with a fake clock. No library on PyPI that is kept up to date offers a non-blocking bucket
without a storage backend (aiolimiter only waits; `limits` is window based and needs storage).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["REJECT_LOG_INTERVAL", "LogGate", "LogGates", "TokenBucket"]

# Seconds between two log lines about the same kind of rejection.
REJECT_LOG_INTERVAL = 10.0


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; starts full."""

    __slots__ = ("_last", "_now", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._now = now
        self._tokens = float(burst)
        self._last = now()

    def _refill(self) -> None:
        now = self._now()
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, n: float = 1.0) -> bool:
        """Take `n` tokens if there are that many (True); otherwise take none (False)."""
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def retry_after(self, n: float = 1.0) -> float:
        """Seconds until `n` tokens will be there (0 if they are now)."""
        self._refill()
        return max(0.0, (n - self._tokens) / self.rate)

    def retry_after_s(self, n: float = 1.0) -> int:
        """`retry_after` rounded up to whole seconds, at least 1 (a CoAP Max-Age)."""
        return max(1, math.ceil(self.retry_after(n)))

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens


class LogGate:
    """At most one pass per `interval` seconds; `suppressed` counts the ones held back since the
    last pass (log it with the line that passes)."""

    __slots__ = ("_next", "_now", "interval", "suppressed")

    def __init__(self, interval: float, now: Callable[[], float]) -> None:
        self.interval = interval
        self._now = now
        self._next = -math.inf
        self.suppressed = 0

    def open(self) -> int | None:
        """None when held back; else the number held back since the last pass (then reset)."""
        now = self._now()
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self.interval
        held, self.suppressed = self.suppressed, 0
        return held


class LogGates:
    """One `LogGate` per key, made on first use. Keys must come from the configuration (a kind
    of rejection, a configured sensor's name), never from a peer, so that the table stays as
    small as the config however many peers flood."""

    __slots__ = ("_gates", "_now", "interval")

    def __init__(self, now: Callable[[], float], interval: float = REJECT_LOG_INTERVAL) -> None:
        self.interval = interval
        self._now = now
        self._gates: dict[str, LogGate] = {}

    def open(self, key: str) -> int | None:
        """`LogGate.open` of the gate for `key`."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = LogGate(self.interval, self._now)
        return gate.open()
