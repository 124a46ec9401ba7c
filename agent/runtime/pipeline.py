"""Readings become events: per-source rules, priorities, time quality, privacy.

Pure and synchronous: `Pipeline.process(reading, now)` returns the events a reading becomes, with
time passed in (monotonic `now` for rule timing, wall clock for capture times), so every rule is
unit-tested with plain numbers. The one rule that needs time to pass on its own, debounce, keeps
its pending change and hands it out from `due(now)`; the runtime calls `due` at
`next_deadline()`.

Rules are matched by source and type patterns (fnmatch), first match wins:

- `debounce_s` (binary/text values): a change is emitted only once the value has stayed the same
  for the window; a change that reverts inside the window is never emitted.
- `on_change_only`: repeats of the last emitted value are dropped.
- `deadband` (numbers): emitted only when it moved at least this much from the last emitted value,
  or `max_interval_s` passed (a heartbeat, so the platform knows the sensor is alive).
- `min_interval_s`: at most one event per interval for that source and type.
- `thresholds`: crossing `above`/`below` raises an alert event (`<type>.high` / `<type>.low` by
  default, priority 1) with hysteresis; returning inside the band raises the clearing event.
- `priority`: overrides the driver's suggestion.
- `priority_armed` / `priority_disarmed`: the priority while the branch is armed / disarmed
  (`set_armed`, from agent.rules.arming); a vault contact is telemetry during opening hours and
  an alarm at night. Before the arm state is known (and without [arming]) `priority` applies.

Stateful rules (agent.rules.stateful: held-open, silence, sequences) see every reading as
*heard* and every event this pipeline emits; what they find becomes events here too, and their
deadlines join the debounce's in `next_deadline()` / `due(now)`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.core.types import ALERT, TQ_SYNCED, TQ_UNSYNCED, Event, Reading
from agent.rules.stateful import Finding, StatefulRules

__all__ = ["Pipeline", "Rule", "Threshold"]


@dataclass(frozen=True, slots=True)
class Threshold:
    above: float | None = None
    below: float | None = None
    hysteresis: float = 0.0
    type: str | None = None  # alert type; default "<reading type>.high" / ".low"
    priority: int = ALERT


@dataclass(frozen=True, slots=True)
class Rule:
    source: str = "*"
    type: str = "*"
    debounce_s: float = 0.0
    on_change_only: bool = False
    deadband: float | None = None
    min_interval_s: float = 0.0
    max_interval_s: float | None = None
    priority: int | None = None
    thresholds: tuple[Threshold, ...] = ()
    drop: bool = False
    priority_armed: int | None = None
    priority_disarmed: int | None = None

    def matches(self, r: Reading) -> bool:
        return fnmatch.fnmatchcase(r.source, self.source) and fnmatch.fnmatchcase(r.type, self.type)


_NO_RULE = Rule()


@dataclass(slots=True)
class _Track:
    """What a rule remembers for one (source, type)."""

    last_value: Any = None
    has_last: bool = False
    last_emit: float = float("-inf")
    pending: Reading | None = None
    pending_since: float = 0.0
    breached: dict[int, bool] = field(default_factory=dict)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Pipeline:
    def __init__(
        self,
        rules: Sequence[Rule] = (),
        *,
        wall: Callable[[], float],
        synchronized: Callable[[], bool],
        pseudonym_key: bytes | None = None,
        pseudonymise_attrs: Sequence[str] = (),
        strip_attrs: Sequence[str] = (),
        stateful: StatefulRules | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.stateful = stateful if stateful is not None else StatefulRules()
        self.armed: bool | None = None  # unknown until agent.rules.arming decides
        self._wall = wall
        self._synced = synchronized
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._rule_cache: dict[tuple[str, str], Rule] = {}
        self._pkey = pseudonym_key
        self._pseudo = frozenset(pseudonymise_attrs)
        self._strip = frozenset(strip_attrs)
        self.counters: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def rule_for(self, r: Reading) -> Rule:
        key = (r.source, r.type)
        rule = self._rule_cache.get(key)
        if rule is None:
            rule = next((x for x in self.rules if x.matches(r)), _NO_RULE)
            self._rule_cache[key] = rule
        return rule

    @property
    def has_deadlines(self) -> bool:
        """Whether anything here ever waits for time to pass (debounce, stateful rules)."""
        return bool(self.stateful) or any(r.debounce_s > 0 for r in self.rules)

    def set_armed(self, armed: bool | None) -> None:
        """The branch's arm state, for `priority_armed` / `priority_disarmed`."""
        self.armed = armed

    def process(self, r: Reading, now: float) -> list[Event]:
        """The events `r` becomes at monotonic time `now` (often none, sometimes two)."""
        if not self.stateful:
            return self._process(r, now)
        found = self.stateful.heard(r.source, r.type, now)
        return self._with_findings(self._process(r, now), now, found)

    def _with_findings(self, events: list[Event], now: float,
                       found: list[Finding]) -> list[Event]:
        for e in events:
            found.extend(self.stateful.observe(e, now))
        return events + [self._finding(f) for f in found]

    def _finding(self, f: Finding) -> Event:
        return Event(src=f.src, type=f.type, v=f.value, t=self._wall(),
                     tq=TQ_SYNCED if self._synced() else TQ_UNSYNCED, prio=f.prio,
                     attrs=f.attrs)

    def _process(self, r: Reading, now: float) -> list[Event]:
        rule = self.rule_for(r)
        if rule.drop:
            self._count("dropped_by_rule")
            return []
        if rule is _NO_RULE:
            return [self._event(r, rule)]
        track = self._tracks.setdefault((r.source, r.type), _Track())
        out: list[Event] = []
        if rule.thresholds and _is_number(r.value):
            out.extend(self._thresholds(r, rule, track))
        if rule.debounce_s > 0:
            self._debounce(r, rule, track, now)
            return out
        if self._passes(r, rule, track, now):
            out.append(self._emit(r, rule, track, now))
        return out

    def _passes(self, r: Reading, rule: Rule, track: _Track, now: float) -> bool:
        if not track.has_last:
            return True
        since = now - track.last_emit
        if since < rule.min_interval_s:
            self._count("suppressed_min_interval")
            return False
        heartbeat = rule.max_interval_s is not None and since >= rule.max_interval_s
        if rule.deadband is not None and _is_number(r.value) and _is_number(track.last_value):
            moved = abs(float(r.value) - float(track.last_value))  # type: ignore[arg-type]
            if moved < rule.deadband and not heartbeat:
                self._count("suppressed_deadband")
                return False
        if rule.on_change_only and r.value == track.last_value and not heartbeat:
            self._count("suppressed_repeat")
            return False
        return True

    def _emit(self, r: Reading, rule: Rule, track: _Track, now: float) -> Event:
        track.last_value = r.value
        track.has_last = True
        track.last_emit = now
        return self._event(r, rule)

    def _debounce(self, r: Reading, rule: Rule, track: _Track, now: float) -> None:
        if track.has_last and r.value == track.last_value:
            if track.pending is not None:
                # Reverted inside the window: neither the change nor its revert is an event.
                self.counters["bounce_suppressed"] = self.counters.get("bounce_suppressed", 0) + 2
            track.pending = None
            return
        if track.pending is not None:
            self._count("bounce_suppressed")
        track.pending = r
        track.pending_since = now

    def next_deadline(self) -> float | None:
        """Monotonic time at which `due` has something to hand out, if any."""
        best: float | None = self.stateful.next_deadline() if self.stateful else None
        for (src, typ), t in self._tracks.items():
            if t.pending is None:
                continue
            rule = self._rule_cache[(src, typ)]
            at = t.pending_since + rule.debounce_s
            best = at if best is None else min(best, at)
        return best

    def due(self, now: float) -> list[Event]:
        """Debounced changes whose value stayed stable for the rule's window, and what the
        stateful rules find at `now` (a contact held open, a silent sensor)."""
        out = self._due(now)
        if not self.stateful:
            return out
        return self._with_findings(out, now, self.stateful.due(now))

    def _due(self, now: float) -> list[Event]:
        out: list[Event] = []
        for (src, typ), t in self._tracks.items():
            if t.pending is None:
                continue
            rule = self._rule_cache[(src, typ)]
            if now - t.pending_since >= rule.debounce_s:
                r, t.pending = t.pending, None
                out.append(self._emit(r, rule, t, now))
        return out

    def _thresholds(self, r: Reading, rule: Rule, track: _Track) -> list[Event]:
        out: list[Event] = []
        value = float(r.value)  # type: ignore[arg-type]
        for i, th in enumerate(rule.thresholds):
            was = track.breached.get(i, False)
            if th.above is not None:
                now_breached = value > th.above if not was else value > th.above - th.hysteresis
                limit, suffix = th.above, "high"
            elif th.below is not None:
                now_breached = value < th.below if not was else value < th.below + th.hysteresis
                limit, suffix = th.below, "low"
            else:
                continue
            if now_breached != was:
                track.breached[i] = now_breached
                out.append(
                    Event(
                        src=r.source,
                        type=th.type or f"{r.type}.{suffix}",
                        v={"state": "raised" if now_breached else "cleared", "value": value,
                           "limit": limit},
                        t=r.ts if r.ts is not None else self._wall(),
                        tq=TQ_SYNCED if self._synced() else TQ_UNSYNCED,
                        prio=th.priority,
                        u=r.unit,
                    )
                )
        return out

    def _event(self, r: Reading, rule: Rule) -> Event:
        return Event(
            src=r.source,
            type=r.type,
            v=r.value,
            t=r.ts if r.ts is not None else self._wall(),
            tq=TQ_SYNCED if self._synced() else TQ_UNSYNCED,
            prio=self._priority(r, rule),
            u=r.unit,
            attrs=self._private(r.attrs) if r.attrs else None,
        )

    def _priority(self, r: Reading, rule: Rule) -> int:
        if self.armed is True and rule.priority_armed is not None:
            return rule.priority_armed
        if self.armed is False and rule.priority_disarmed is not None:
            return rule.priority_disarmed
        return rule.priority if rule.priority is not None else r.priority

    def _private(self, attrs: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """Strip listed attributes; replace pseudonymised ones by a keyed hash (HMAC-SHA256,
        first 16 hex chars) so the platform can correlate without learning the identifier."""
        if not self._strip and not self._pseudo:
            return attrs
        out: dict[str, Any] = {}
        for k, v in attrs.items():
            if k in self._strip:
                continue
            if k in self._pseudo:
                if self._pkey is None:
                    continue  # no key, no pseudonym: strip rather than leak
                v = hmac.new(self._pkey, str(v).encode(), hashlib.sha256).hexdigest()[:16]
            out[k] = v
        return out or None
