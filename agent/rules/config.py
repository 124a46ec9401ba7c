"""`[arming]`, `[[held_open]]`, `[[silence]]` and `[[sequence]]`: the config models of the branch
security rules (docs/RULES.md), apart from the rules, so that loading a config stays light.

Checks that span several entries (two exceptions on one date, a day's periods that overlap)
are `problems()`: lines in agent.config's ``key.path: got VALUE, expected WHAT`` form, so that
they name the exact entry rather than the whole table.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field, field_validator, model_validator

from agent.core.config import StrictModel
from agent.core.types import ALERT
from agent.rules.arming import WEEKDAYS, Period, Schedule, parse_period, week_from
from agent.rules.stateful import HeldOpen, Match, SequenceRule, Silence, StatefulRule

__all__ = [
    "ArmingConfig",
    "ExceptionConfig",
    "HeldOpenConfig",
    "MatchConfig",
    "SequenceConfig",
    "SilenceConfig",
    "WeekConfig",
    "problems",
]


def _period(text: str) -> str:
    parse_period(text)  # ValueError says why ("'25:00' is not a time of day ...")
    return text


PeriodText = Annotated[str, AfterValidator(_period)]
Priority = Annotated[int, Field(ge=0, le=3)]


class WeekConfig(StrictModel):
    """`[arming.week]`: opening hours (disarmed) per weekday; a day left out is armed all day."""

    mon: list[PeriodText] = Field(default_factory=list)
    tue: list[PeriodText] = Field(default_factory=list)
    wed: list[PeriodText] = Field(default_factory=list)
    thu: list[PeriodText] = Field(default_factory=list)
    fri: list[PeriodText] = Field(default_factory=list)
    sat: list[PeriodText] = Field(default_factory=list)
    sun: list[PeriodText] = Field(default_factory=list)

    def periods(self) -> dict[str, tuple[Period, ...]]:
        return {d: tuple(parse_period(p) for p in getattr(self, d)) for d in WEEKDAYS}


class ExceptionConfig(StrictModel):
    """`[[arming.exceptions]]`: a date (or `date` to `until`, inclusive) whose opening hours
    replace the week's: `closed = true` (armed all day: a holiday) or `open = [...]`."""

    date: dt.date
    until: dt.date | None = None
    closed: bool = False
    open: list[PeriodText] = Field(default_factory=list)
    note: str = ""

    @model_validator(mode="after")
    def _one(self) -> ExceptionConfig:
        if self.closed == bool(self.open):
            raise ValueError("exactly one of closed = true or open = [periods]")
        if self.until is not None and self.until < self.date:
            raise ValueError(f"until {self.until} is before date {self.date}")
        return self

    def days(self) -> list[dt.date]:
        last = self.until or self.date
        return [self.date + dt.timedelta(days=k) for k in range((last - self.date).days + 1)]


class ArmingConfig(StrictModel):
    """`[arming]`: when the branch is armed. Off unless this table is present."""

    timezone: str = Field(description="IANA zone of the branch, e.g. Europe/Berlin")
    week: WeekConfig = WeekConfig()
    exceptions: list[ExceptionConfig] = Field(default_factory=list)
    max_disarm_s: float = Field(default=4 * 3600.0, ge=60, le=7 * 24 * 3600)
    priority: Priority = ALERT

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("an IANA time zone name such as Europe/Berlin "
                             "(unknown time zone)") from None
        return v

    def schedule(self) -> Schedule:
        exceptions = {day: tuple(parse_period(p) for p in e.open)
                      for e in self.exceptions for day in e.days()}
        return Schedule(tz=ZoneInfo(self.timezone), week=week_from(self.week.periods()),
                        exceptions=exceptions)


class MatchConfig(StrictModel):
    source: str = "*"
    type: str = "*"
    value: str | int | float | bool | None = None
    attrs: dict[str, str | int | float | bool] = Field(default_factory=dict)

    def match(self) -> Match:
        return Match(self.source, self.type, self.value, dict(self.attrs))


class HeldOpenConfig(StrictModel):
    """`[[held_open]]`: a contact open longer than `after_s` raises `alert_type`."""

    source: str = "gpio.*"
    type: str = "contact"
    open_values: list[str | bool] = Field(default_factory=lambda: list[str | bool](["open"]),
                                          min_length=1)
    after_s: float = Field(gt=0)
    alert_type: str = "contact.held_open"
    priority: Priority = ALERT

    def rule(self) -> HeldOpen:
        return HeldOpen(Match(self.source, self.type), self.after_s,
                        open_values=tuple(self.open_values), type=self.alert_type,
                        prio=self.priority)


class SilenceConfig(StrictModel):
    """`[[silence]]`: a source not heard for `after_s` raises `alert_type`."""

    source: str
    type: str = "*"
    after_s: float = Field(gt=0)
    alert_type: str = "sensor.silent"
    priority: Priority = ALERT

    def rule(self, start: float) -> Silence:
        return Silence(Match(self.source, self.type), self.after_s, start=start,
                       type=self.alert_type, prio=self.priority)


class SequenceConfig(StrictModel):
    """`[[sequence]]`: `then` within `within_s` after `first` (mode after), or `then` with no
    `first` in the `within_s` before it (mode without)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    first: MatchConfig
    then: MatchConfig
    within_s: float = Field(gt=0)
    mode: Literal["after", "without"]
    alert_type: str | None = Field(default=None, description="default: sequence.{name}")
    priority: Priority = ALERT

    def rule(self) -> SequenceRule:
        return SequenceRule(self.name, self.first.match(), self.then.match(), self.within_s,
                            mode=self.mode, type=self.alert_type or f"sequence.{self.name}",
                            prio=self.priority)


def stateful_rules(held_open: list[HeldOpenConfig], silence: list[SilenceConfig],
                   sequence: list[SequenceConfig], start: float) -> list[StatefulRule]:
    """The configured rules, silence watches starting at monotonic `start`."""
    return ([h.rule() for h in held_open] + [s.rule(start) for s in silence]
            + [q.rule() for q in sequence])


def _show(value: Any) -> str:
    return repr(value if not isinstance(value, dt.date) else str(value))


def problems(arming: ArmingConfig | None, prefix: str = "arming") -> list[str]:
    """Cross-entry problems of `[arming]`: overlapping periods in a day, dates given twice."""
    if arming is None:
        return []
    out: list[str] = []

    def overlaps(where: str, texts: list[str]) -> None:
        ps = sorted(((parse_period(t), i) for i, t in enumerate(texts)), key=lambda x: x[0].start)
        for (a, _), (b, j) in itertools.pairwise(ps):
            if a.end is None or a.end > b.start:
                out.append(f"{where}[{j}]: got {str(b)!r}, expected a period that does not "
                           f"overlap {str(a)!r} on the same day")

    for name in WEEKDAYS:
        overlaps(f"{prefix}.week.{name}", getattr(arming.week, name))
    seen: dict[dt.date, int] = {}
    for i, e in enumerate(arming.exceptions):
        overlaps(f"{prefix}.exceptions[{i}].open", e.open)
        for day in e.days():
            if day in seen:
                key = "date" if day == e.date else "until"
                value = e.date if key == "date" else e.until
                out.append(f"{prefix}.exceptions[{i}].{key}: got {_show(value)}, expected dates "
                           f"not already in {prefix}.exceptions[{seen[day]}] ({day} is in both)")
                break
            seen[day] = i
    return out
