"""Privacy by default: adverts from devices that are not allowlisted never leave the scanner's
callback. The opt-in presence mode counts them per window through a keyed hash of the address;
the key is random, held in memory only and replaced every UTC day, so no stable identifier of a
customer's phone is stored, logged or sent — only the count."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

__all__ = ["PresenceCounter"]

_DAY = 86_400
# Pseudonyms kept per window (~100 bytes each). A branch hears a few hundred devices; a flood of
# random addresses must not grow memory without bound, so past this the count saturates.
MAX_DISTINCT = 10_000


class PresenceCounter:
    """Distinct devices seen in the current window, up to `max_distinct`. `observe` keeps only a
    truncated HMAC of the address under today's key; `take` returns the count and forgets the
    window."""

    def __init__(
        self,
        wall_time: Callable[[], float],
        key_source: Callable[[int], bytes] = secrets.token_bytes,
        max_distinct: int = MAX_DISTINCT,
    ) -> None:
        self._wall_time = wall_time
        self._key_source = key_source
        self._max_distinct = max_distinct
        self._day: int | None = None
        self._key = b""
        self._seen: set[bytes] = set()

    def _current_key(self) -> bytes:
        day = int(self._wall_time() // _DAY)
        if day != self._day:
            # A new day: a new key, so today's pseudonyms cannot be linked to yesterday's.
            self._day, self._key = day, self._key_source(32)
        return self._key

    def observe(self, address: str) -> None:
        if len(self._seen) >= self._max_distinct:
            return  # saturated: whatever this is, the count cannot grow
        digest = hmac.new(self._current_key(), address.upper().encode(), hashlib.sha256).digest()
        self._seen.add(digest[:16])

    def take(self) -> int:
        count = len(self._seen)
        self._seen.clear()
        return count
