"""Rules that need memory and time: a contact held open, a source gone silent, one event
following (or not following) another. Pure: fed events and readings with a monotonic `now`,
they return `Finding`s (what to report); the pipeline turns them into events. Like the
pipeline's debounce, the rules that wait hand their deadline out from `next_deadline()` and
their findings from `due(now)` (docs/RULES.md).

- `HeldOpen`: a matching source whose value is "open" for `after_s` raises `contact.held_open`
  (state raised); the value leaving "open" clears it (state cleared).
- `Silence`: a matching source not heard for `after_s` raises `sensor.silent`; hearing it again
  clears it. Every reading counts as heard (before deadband or debounce drop it), except the
  driver's own `source.*` status readings: an `source.offline` is the driver saying the sensor
  is gone. A source is watched from its first reading; a source named without wildcards is
  watched from the start, so a sensor that never speaks is reported too.
- `Sequence`: an event B within `within_s` after an event A (`mode = "after"`), or B with no A
  in the `within_s` before it (`mode = "without"`), raises one finding per B.

Findings are not fed back into the rules (no cascades).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from agent.core.types import Event, Value

__all__ = [
    "Finding",
    "HeldOpen",
    "Match",
    "SequenceRule",
    "Silence",
    "StatefulRule",
    "StatefulRules",
]

_WILDCARDS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class Finding:
    """What a rule reports; the pipeline makes it an event (wall time, time quality)."""

    src: str
    type: str
    value: Value
    prio: int
    attrs: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """Which events a rule looks at: fnmatch patterns on source and type, and optionally an
    exact value and attribute values (e.g. ``{"cause": "keyswitch"}``)."""

    source: str = "*"
    type: str = "*"
    value: Value = None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, e: Event) -> bool:
        if not (fnmatch.fnmatchcase(e.src, self.source) and fnmatch.fnmatchcase(e.type, self.type)):
            return False
        if self.value is not None and not _same(e.v, self.value):
            return False
        got = e.attrs or {}
        return all(k in got and _same(got[k], v) for k, v in self.attrs.items())


def _same(a: object, b: object) -> bool:
    """Equal, and of the same kind: True is not 1 (a motion flag is not a count)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


class StatefulRule(Protocol):
    def observe(self, e: Event, now: float) -> list[Finding]: ...

    def heard(self, source: str, type_: str, now: float) -> list[Finding]: ...

    def next_deadline(self) -> float | None: ...

    def due(self, now: float) -> list[Finding]: ...


class HeldOpen:
    """A contact open longer than `after_s` raises an alert; closing it clears the alert."""

    def __init__(self, match: Match, after_s: float, *, open_values: Sequence[Value] = ("open",),
                 type: str = "contact.held_open", prio: int = 1) -> None:
        self.match, self.after_s, self.type, self.prio = match, after_s, type, prio
        self.open_values = tuple(open_values)
        self._since: dict[str, float] = {}  # source -> when it opened
        self._raised: set[str] = set()

    def observe(self, e: Event, now: float) -> list[Finding]:
        if not self.match(e):
            return []
        if any(_same(e.v, v) for v in self.open_values):
            self._since.setdefault(e.src, now)  # a repeat of "open" does not restart the wait
            return []
        since = self._since.pop(e.src, None)
        if e.src in self._raised:
            self._raised.discard(e.src)
            held = round(now - since, 3) if since is not None else None
            return [Finding(e.src, self.type, {"state": "cleared", "open_s": held}, self.prio)]
        return []

    def heard(self, source: str, type_: str, now: float) -> list[Finding]:
        return []

    def next_deadline(self) -> float | None:
        waiting = [t + self.after_s for s, t in self._since.items() if s not in self._raised]
        return min(waiting) if waiting else None

    def due(self, now: float) -> list[Finding]:
        out = []
        for src, since in self._since.items():
            if src not in self._raised and now - since >= self.after_s:
                self._raised.add(src)
                out.append(Finding(src, self.type,
                                   {"state": "raised", "open_s": round(now - since, 3)},
                                   self.prio))
        return out


class Silence:
    """A source not heard for `after_s` raises `sensor.silent`; hearing it again clears it."""

    def __init__(self, match: Match, after_s: float, *, start: float,
                 type: str = "sensor.silent", prio: int = 1) -> None:
        self.match, self.after_s, self.type, self.prio = match, after_s, type, prio
        self._last: dict[str, float] = {}
        self._silent: set[str] = set()
        if not _WILDCARDS & set(match.source):
            self._last[match.source] = start  # named: expected from the start

    def observe(self, e: Event, now: float) -> list[Finding]:
        return []

    def heard(self, source: str, type_: str, now: float) -> list[Finding]:
        if type_.startswith("source.") or not (
            fnmatch.fnmatchcase(source, self.match.source)
            and fnmatch.fnmatchcase(type_, self.match.type)
        ):
            return []
        last = self._last.get(source)
        self._last[source] = now
        if source in self._silent:
            self._silent.discard(source)
            gap = round(now - last, 3) if last is not None else None
            return [Finding(source, self.type, {"state": "cleared", "silent_s": gap}, self.prio)]
        return []

    def next_deadline(self) -> float | None:
        waiting = [t + self.after_s for s, t in self._last.items() if s not in self._silent]
        return min(waiting) if waiting else None

    def due(self, now: float) -> list[Finding]:
        out = []
        for src, last in self._last.items():
            if src not in self._silent and now - last >= self.after_s:
                self._silent.add(src)
                out.append(Finding(src, self.type,
                                   {"state": "raised", "silent_s": round(now - last, 3)},
                                   self.prio))
        return out


class SequenceRule:
    """B within `within_s` after A (`after`), or B with no A in the `within_s` before it
    (`without`): one finding per such B, from B's source."""

    def __init__(self, name: str, first: Match, then: Match, within_s: float, *,
                 mode: Literal["after", "without"], type: str, prio: int) -> None:
        self.name, self.first, self.then, self.within_s = name, first, then, within_s
        self.mode, self.type, self.prio = mode, type, prio
        self._last_a: float | None = None

    def observe(self, e: Event, now: float) -> list[Finding]:
        out: list[Finding] = []
        if self.then(e):
            recent = self._last_a is not None and now - self._last_a <= self.within_s
            if recent == (self.mode == "after"):
                attrs: dict[str, Any] = {"rule": self.name, "within_s": self.within_s}
                if self._last_a is not None:
                    attrs["since_first_s"] = round(now - self._last_a, 3)
                out.append(Finding(e.src, self.type, e.v, self.prio, attrs))
        if self.first(e):  # after judging B: an event that is both is not its own A
            self._last_a = now
        return out

    def heard(self, source: str, type_: str, now: float) -> list[Finding]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def due(self, now: float) -> list[Finding]:
        return []


class StatefulRules:
    """All configured stateful rules, fed together."""

    def __init__(self, rules: Iterable[StatefulRule] = ()) -> None:
        self.rules = tuple(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def observe(self, e: Event, now: float) -> list[Finding]:
        return [f for r in self.rules for f in r.observe(e, now)]

    def heard(self, source: str, type_: str, now: float) -> list[Finding]:
        return [f for r in self.rules for f in r.heard(source, type_, now)]

    def next_deadline(self) -> float | None:
        ds = [d for r in self.rules if (d := r.next_deadline()) is not None]
        return min(ds) if ds else None

    def due(self, now: float) -> list[Finding]:
        return [f for r in self.rules for f in r.due(now)]
