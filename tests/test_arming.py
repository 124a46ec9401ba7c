"""The arming schedule and state machine (agent.rules.arming), with plain Unix times: opening
hours in Europe/Berlin, dated exceptions, both DST transitions, manual overrides, and an
unsynchronised clock that never disarms."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from agent.rules.arming import Arming, Schedule, local_instant, parse_period

BERLIN = ZoneInfo("Europe/Berlin")
H = 3600.0
# Tuesday 1 December 2026, CET (UTC+1): 08:00 local is 07:00 UTC.
TUE_0800 = 1796108400.0
TUE_1800 = 1796144400.0
WED_0800 = 1796194800.0
# Sunday 29 March 2026: 02:00 CET -> 03:00 CEST at 01:00 UTC.
SPRING = 1774746000.0
# Sunday 25 October 2026: 03:00 CEST -> 02:00 CET at 01:00 UTC; 02:30 CEST is 00:30 UTC.
AUTUMN = 1792890000.0
AUTUMN_0230_FIRST = 1792888200.0

WEEKDAYS = {d: (parse_period("08:00-18:00"),) for d in range(5)}


def schedule(**kw: object) -> Schedule:
    return Schedule(tz=BERLIN, week=kw.pop("week", WEEKDAYS), **kw)  # type: ignore[arg-type]


def test_opening_hours_are_disarmed_with_the_next_change() -> None:
    """Inside opening hours the branch is disarmed until closing; outside, armed until opening;
    the boundaries are the local times in the zone (CET in December)."""
    s = schedule()
    assert s.state_at(TUE_0800 - 1) == (True, "schedule", TUE_0800)
    assert s.state_at(TUE_0800) == (False, "schedule", TUE_1800)
    assert s.state_at(TUE_1800) == (True, "schedule", WED_0800)


def test_weekend_is_armed_through_to_monday() -> None:
    """Saturday and Sunday have no opening hours: armed from Friday 18:00 to Monday 08:00."""
    fri_1800 = TUE_1800 + 3 * 24 * H
    mon_0800 = TUE_0800 + 6 * 24 * H
    assert schedule().state_at(fri_1800 + 36 * H) == (True, "schedule", mon_0800)


def test_holiday_is_armed_all_day_and_late_opening_until_its_start() -> None:
    """A closed exception arms the whole day; a late opening arms until its first period."""
    day = dt.date(2026, 12, 1)
    closed = schedule(exceptions={day: ()})
    assert closed.state_at(TUE_0800 + 2 * H) == (True, "exception", WED_0800)
    late = schedule(exceptions={day: (parse_period("10:00-18:00"),)})
    assert late.state_at(TUE_0800 + 1 * H) == (True, "exception", TUE_0800 + 2 * H)
    assert late.state_at(TUE_0800 + 2 * H) == (False, "exception", TUE_1800)
    # the next day follows the week again
    assert late.state_at(WED_0800) == (False, "schedule", WED_0800 + 10 * H)


def test_night_periods_join_across_midnight() -> None:
    """22:00-24:00 and 00:00-06:00 the next day are one disarmed stretch, ending at 06:00."""
    s = schedule(week={1: (parse_period("22:00-24:00"),), 2: (parse_period("00:00-06:00"),)})
    tue_2200 = TUE_0800 + 14 * H
    assert s.state_at(tue_2200) == (False, "schedule", tue_2200 + 8 * H)


def test_spring_gap_start_is_the_first_instant_after_the_gap() -> None:
    """02:00 and 02:30 do not exist on 29 March 2026 in Berlin: both mean 03:00 CEST."""
    day = dt.date(2026, 3, 29)
    assert local_instant(day, dt.time(2, 30), BERLIN) == SPRING
    assert local_instant(day, dt.time(2, 0), BERLIN) == SPRING
    assert local_instant(day, dt.time(3, 0), BERLIN) == SPRING
    assert local_instant(day, dt.time(1, 59), BERLIN) == SPRING - 60  # 01:59 CET, 00:59 UTC
    s = schedule(week={6: (parse_period("02:30-05:00"),)})
    assert s.state_at(SPRING - 1) == (True, "schedule", SPRING)
    assert s.state_at(SPRING) == (False, "schedule", SPRING + 2 * H)  # until 05:00 CEST


def test_autumn_overlap_means_the_first_occurrence() -> None:
    """02:30 happens twice on 25 October 2026 in Berlin: a period ending then ends (arms) at
    the first, CEST one; the hour after the change is counted once."""
    day = dt.date(2026, 10, 25)
    assert local_instant(day, dt.time(2, 30), BERLIN) == AUTUMN_0230_FIRST
    s = schedule(week={6: (parse_period("00:00-02:30"),)})
    midnight = local_instant(day, dt.time(0, 0), BERLIN)
    assert midnight == AUTUMN - 3 * H  # 00:00 CEST is 22:00 UTC the day before
    assert s.state_at(midnight) == (False, "schedule", AUTUMN_0230_FIRST)
    assert s.state_at(AUTUMN_0230_FIRST)[0] is True
    # 08:00 CET on that Sunday is 07:00 UTC: 25 hours after midnight-ish, not 24
    assert local_instant(day, dt.time(8, 0), BERLIN) == AUTUMN + 6 * H


def test_period_errors_say_why() -> None:
    """Bad times and periods that end before they start are refused with the reason."""
    for text, why in [("25:00-26:00", "not a time of day"), ("8-18", "not a time HH:MM"),
                      ("18:00-08:00", "ends before it starts"), ("08:00", "not a period"),
                      ("24:00-24:00", "starts at 24:00"), ("08:60-09:00", "not a time of day")]:
        with pytest.raises(ValueError, match=why):
            parse_period(text)


def test_unsynchronised_clock_never_disarms_but_arms() -> None:
    """Unsynced inside opening hours: armed (clock-unsynced); synced: the schedule disarms.
    A disarm in force stays when sync is lost, and the schedule still arms at closing."""
    a = Arming(schedule(), max_disarm_s=4 * H)
    [c] = a.tick(TUE_0800 + H, 0.0, synced=False)
    assert (c.armed, c.cause, c.initial) == (True, "clock-unsynced", True)
    assert a.tick(TUE_0800 + H + 10, 10.0, synced=False) == []
    [c] = a.tick(TUE_0800 + 2 * H, 20.0, synced=True)
    assert (c.value, c.cause, c.initial) == ("disarmed", "schedule", False)
    assert a.tick(TUE_0800 + 3 * H, 30.0, synced=False) == []
    [c] = a.tick(TUE_1800, 40.0, synced=False)
    assert (c.value, c.cause) == ("armed", "schedule")
    assert a.tick(WED_0800, 50.0, synced=False) == []  # and never disarms unsynced


def test_manual_disarm_at_night_ends_after_max_disarm() -> None:
    """A keyswitch disarm at 22:00 holds; after max_disarm_s (monotonic) the branch re-arms
    and the change says why."""
    a = Arming(schedule(), max_disarm_s=4 * H)
    night = TUE_1800 + 4 * H
    assert [c.value for c in a.tick(night, 100.0, True)] == ["armed"]
    [c] = a.manual(False, "keyswitch", night, 100.0, True)
    assert (c.value, c.cause, c.detail["until"]) == ("disarmed", "keyswitch", night + 4 * H)
    assert a.next_tick(night, 100.0) == 4 * H
    assert a.tick(night + 4 * H - 1, 100.0 + 4 * H - 1, True) == []
    [c] = a.tick(night + 4 * H, 100.0 + 4 * H, True)
    assert (c.value, c.cause, c.detail) == ("armed", "schedule",
                                            {"override_ended": "max_disarm_s"})


def test_manual_disarm_ends_at_the_schedule_change_and_arm_holds_to_disarm() -> None:
    """An early-morning disarm merges into opening hours (no event at 08:00) and the branch
    arms at 18:00; a manual arm at noon holds through 18:00 until the next day's opening."""
    a = Arming(schedule(), max_disarm_s=24 * H)
    early = TUE_0800 - 2 * H
    a.tick(early, 0.0, True)
    [c] = a.manual(False, "command", early, 0.0, True)
    assert c.detail["until"] == TUE_0800
    assert a.tick(TUE_0800, 2 * H, True) == []
    assert a.cause == "command"  # still the manual disarm's state, now agreed by the schedule
    [c] = a.tick(TUE_1800, 12 * H, True)
    assert (c.value, c.cause) == ("armed", "schedule")

    b = Arming(schedule(), max_disarm_s=H)
    noon = TUE_0800 + 4 * H
    b.tick(noon, 0.0, True)
    [c] = b.manual(True, "keyswitch", noon, 0.0, True)
    assert (c.value, c.cause) == ("armed", "keyswitch")
    assert b.tick(noon + 2 * H, 2 * H, True) == []  # no max for an arm
    assert b.tick(TUE_1800, 6 * H, True) == []
    [c] = b.tick(WED_0800, 20 * H, True)
    assert (c.value, c.cause) == ("disarmed", "schedule")


def test_same_state_again_is_no_change_and_manual_works_unsynced() -> None:
    """A keyswitch arm while armed reports nothing; a manual disarm works unsynced and ends at
    max_disarm_s even though the (untrusted) schedule says disarmed."""
    a = Arming(schedule(), max_disarm_s=H)
    a.tick(TUE_0800 + H, 0.0, False)
    assert a.manual(True, "keyswitch", TUE_0800 + H, 0.0, False) == []
    [c] = a.manual(False, "keyswitch", TUE_0800 + H, 0.0, False)
    assert (c.value, c.cause) == ("disarmed", "keyswitch")
    [c] = a.tick(TUE_0800 + 2 * H, H, False)
    assert (c.value, c.cause) == ("armed", "clock-unsynced")
