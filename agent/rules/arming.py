"""When is the branch armed? A weekly schedule of opening hours in a named time zone, dated
exceptions, and manual arm/disarm (keyswitch, signed command). Pure: wall time and whether the
clock is synchronised are passed in (docs/RULES.md has the semantics for the security team).

- Opening hours are *disarmed*; every other instant is armed. A day's periods are
  ``(start, end)`` local times, end after start (``24:00`` ends at midnight; a night shift is
  two periods, ``22:00-24:00`` and ``00:00-06:00`` the next day, which join up).
- A dated exception replaces that day's weekly periods: none (closed: armed all day, a holiday)
  or its own (a late opening: armed until the first period starts).
- Local times are turned into instants in the zone: a time inside the spring-forward gap
  (02:30 in Europe/Berlin on the last Sunday of March) means the first instant after the gap
  (03:00 CEST); a time inside the autumn overlap (02:30, twice) means its first occurrence. So
  a period that straddles the gap keeps its part after it, and an ambiguous end arms at the
  earlier instant; a period wholly inside the gap (02:00-02:45) does not happen that night.
- A manual act (keyswitch, command) overrides the schedule until the schedule next changes
  state: a manual disarm outside hours lasts until the next scheduled arm, a manual arm during
  hours until the next scheduled disarm; since the schedule agrees with the override at its next
  change, "until the next change" is the same thing. A manual disarm also ends after
  `max_disarm_s` (measured on the monotonic clock), so a forgotten disarm re-arms the branch.
- An unsynchronised clock never disarms: while the wall clock is not synchronised (a Pi has no
  RTC: after a power cut it boots at the last saved time) the schedule may arm but never
  disarm, and the branch starts armed. The keyswitch still works (someone is at it); a signed
  command does not (the command processor refuses all but ping and status on an unsynchronised
  clock: a command's validity is a time). The schedule's disarm applies once the clock is synced.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo

__all__ = [
    "WEEKDAYS",
    "ArmChange",
    "Arming",
    "Cause",
    "Period",
    "Schedule",
    "local_instant",
    "parse_period",
    "week_from",
]

Cause = Literal["schedule", "exception", "keyswitch", "command", "clock-unsynced"]
MANUAL: frozenset[str] = frozenset({"keyswitch", "command"})
LOOKAHEAD_DAYS = 15  # how far the next change is looked for; beyond it, look again then
_DAY = dt.timedelta(days=1)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class Period:
    """Disarmed from `start` to `end` (local times; `end` None means midnight, "24:00")."""

    start: dt.time
    end: dt.time | None

    def __str__(self) -> str:
        end = "24:00" if self.end is None else self.end.strftime("%H:%M")
        return f"{self.start.strftime('%H:%M')}-{end}"


def _clock_time(text: str) -> dt.time | None:
    """"HH:MM" (00:00 to 24:00; None for 24:00). Raises ValueError with the reason."""
    hh, sep, mm = text.strip().partition(":")
    if not sep or not (hh.isdigit() and mm.isdigit()) or len(mm) != 2 or not 1 <= len(hh) <= 2:
        raise ValueError(f"{text!r} is not a time HH:MM")
    h, m = int(hh), int(mm)
    if (h, m) == (24, 0):
        return None
    if h > 23 or m > 59:
        raise ValueError(f"{text!r} is not a time of day (00:00 to 24:00)")
    return dt.time(h, m)


def parse_period(text: str) -> Period:
    """"08:00-18:00" -> Period. Raises ValueError saying what is wrong."""
    a, sep, b = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r} is not a period HH:MM-HH:MM")
    start, end = _clock_time(a), _clock_time(b)
    if start is None:
        raise ValueError(f"{text!r} starts at 24:00 (write 00:00 of the next day)")
    if end is not None and end <= start:
        raise ValueError(f"{text!r} ends before it starts (a night period is two: "
                         f"{a.strip()}-24:00 and 00:00-{b.strip()} the next day)")
    return Period(start, end)


def local_instant(day: dt.date, at: dt.time | None, tz: ZoneInfo) -> float:
    """The Unix time of local `at` on `day` in `tz` (None: midnight ending the day). A time in a
    DST gap is the first instant after the gap; an ambiguous time its first occurrence."""
    if at is None:
        day, at = day + _DAY, dt.time(0, 0)
    naive = dt.datetime.combine(day, at)
    first = naive.replace(tzinfo=tz, fold=0)
    t = first.timestamp()
    if dt.datetime.fromtimestamp(t, tz).replace(tzinfo=None) == naive:
        return t  # exists (fold 0 is the first occurrence when ambiguous)
    # In a gap: fold=1 uses the offset after the transition and lands before it, fold=0 the
    # offset before it and lands after it; the transition is in between. Offsets change on
    # whole seconds: bisect to the first second at the new offset.
    lo, hi = int(naive.replace(tzinfo=tz, fold=1).timestamp()), int(t)
    after = dt.datetime.fromtimestamp(hi, tz).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, tz).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return float(hi)


def week_from(days: Mapping[str, Iterable[Period]]) -> dict[int, tuple[Period, ...]]:
    """{"mon": [...], ...} -> {0: (...), ...} (0 = Monday, as date.weekday())."""
    return {WEEKDAYS.index(name): tuple(ps) for name, ps in days.items()}


@dataclass(frozen=True)
class Schedule:
    """Opening hours (disarmed) per weekday (0 = Monday) and dated exceptions, in `tz`."""

    tz: ZoneInfo
    week: Mapping[int, Sequence[Period]] = field(default_factory=dict)
    exceptions: Mapping[dt.date, Sequence[Period]] = field(default_factory=dict)

    def periods_on(self, day: dt.date) -> tuple[Sequence[Period], Cause]:
        if day in self.exceptions:
            return self.exceptions[day], "exception"
        return self.week.get(day.weekday(), ()), "schedule"

    def _intervals(self, t: float) -> list[tuple[float, float, Cause]]:
        """Disarmed intervals (epoch start, end, cause) around `t`, joined where they touch."""
        today = dt.datetime.fromtimestamp(t, self.tz).date()
        out: list[tuple[float, float, Cause]] = []
        for k in range(-1, LOOKAHEAD_DAYS):
            day = today + k * _DAY
            periods, cause = self.periods_on(day)
            for p in sorted(periods, key=lambda p: p.start):
                a, b = local_instant(day, p.start, self.tz), local_instant(day, p.end, self.tz)
                if b <= a:
                    continue  # the whole period fell into a DST gap
                if out and a <= out[-1][1]:
                    prev = out[-1]
                    out[-1] = (prev[0], max(prev[1], b), prev[2])
                else:
                    out.append((a, b, cause))
        return out

    def state_at(self, t: float) -> tuple[bool, Cause, float]:
        """(armed, cause, next change) at Unix time `t`. The cause is `exception` when a dated
        exception decides the day, else `schedule`; the next change is the next instant the
        schedule's state flips (or the end of the look-ahead: ask again then)."""
        intervals = self._intervals(t)
        today = dt.datetime.fromtimestamp(t, self.tz).date()
        cause: Cause = self.periods_on(today)[1]
        horizon = local_instant(today + (LOOKAHEAD_DAYS - 1) * _DAY, dt.time(0, 0), self.tz)
        for a, b, c in intervals:
            if a <= t < b:
                return False, c, b
            if a > t:
                return True, cause, a
        return True, cause, horizon


@dataclass(frozen=True, slots=True)
class ArmChange:
    """The branch's arm state changed (or was first decided, `initial`)."""

    armed: bool
    cause: Cause
    t: float  # wall clock at the change
    initial: bool = False
    detail: Mapping[str, object] = field(default_factory=dict)

    @property
    def value(self) -> str:
        return "armed" if self.armed else "disarmed"


@dataclass(slots=True)
class _Override:
    armed: bool
    cause: Cause
    until_wall: float  # the schedule's next change when it was made
    until_mono: float | None  # max_disarm_s after a manual disarm


class Arming:
    """The branch's arm state: the schedule, manual overrides, the clock's quality.

    Feed it with `tick(wall, mono, synced)` (at `next_tick`, and whenever convenient) and
    `manual(armed, cause, wall, mono, synced)`; each returns the changes to report.
    """

    def __init__(self, schedule: Schedule, *, max_disarm_s: float) -> None:
        self.schedule = schedule
        self.max_disarm_s = max_disarm_s
        self.armed: bool | None = None  # None until the first tick
        self.cause: Cause | None = None
        self._override: _Override | None = None
        self._next_change: float | None = None

    def _set(self, armed: bool, cause: Cause, wall: float, initial: bool = False,
             **detail: object) -> list[ArmChange]:
        if self.armed is not None and armed == self.armed:
            return []
        self.armed, self.cause = armed, cause
        return [ArmChange(armed, cause, wall, initial, dict(detail))]

    def tick(self, wall: float, mono: float, synced: bool) -> list[ArmChange]:
        """Re-evaluate at this time; the changes (at most one) to report."""
        initial = self.armed is None
        sched_armed, sched_cause, nxt = self.schedule.state_at(wall)
        self._next_change = nxt
        detail: dict[str, object] = {}
        ov = self._override
        if ov is not None:
            if ov.until_mono is not None and mono >= ov.until_mono:
                self._override = None
                detail["override_ended"] = "max_disarm_s"  # a forgotten disarm re-arms
            elif wall >= ov.until_wall:
                self._override = None
            else:
                return self._set(ov.armed, ov.cause, wall, initial)
        if not sched_armed and not synced:
            # Never disarm on an unsynchronised clock. The schedule's disarm already in force
            # (decided while the clock was good) stays: losing sync is no reason to arm.
            if self.armed is False and self.cause in ("schedule", "exception") and not detail:
                return []
            return self._set(True, "clock-unsynced", wall, initial, **detail)
        return self._set(sched_armed, sched_cause, wall, initial, **detail)

    def manual(self, armed: bool, cause: Cause, wall: float, mono: float,
               synced: bool) -> list[ArmChange]:
        """A keyswitch turn or a signed command: overrides the schedule until its next change
        (a disarm at most `max_disarm_s`). The same state again is no change."""
        out = self.tick(wall, mono, synced) if self.armed is None else []
        sched_armed, _, nxt = self.schedule.state_at(wall)
        self._next_change = nxt
        if armed == sched_armed and (synced or armed):
            # Back to what the schedule says: no override needed.
            self._override = None
        else:
            self._override = _Override(armed, cause, nxt,
                                       None if armed else mono + self.max_disarm_s)
        until = min(nxt, wall + self.max_disarm_s) if not armed else nxt
        return out + self._set(armed, cause, wall, until=until)

    def next_tick(self, wall: float, mono: float) -> float:
        """Seconds from now until the state may change by itself (the schedule's next change
        or an override's end)."""
        waits = [] if self._next_change is None else [self._next_change - wall]
        ov = self._override
        if ov is not None:
            waits.append(ov.until_wall - wall)
            if ov.until_mono is not None:
                waits.append(ov.until_mono - mono)
        return max(0.0, min(waits)) if waits else 0.0
