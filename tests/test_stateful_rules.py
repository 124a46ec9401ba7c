"""Held-open, silence and sequence rules (agent.rules.stateful) with plain monotonic numbers."""

from __future__ import annotations

from typing import Any

from agent.core.types import Event
from agent.rules.stateful import HeldOpen, Match, SequenceRule, Silence, StatefulRules


def ev(src: str, type_: str, v: Any, **attrs: Any) -> Event:
    return Event(src=src, type=type_, v=v, t=0.0, attrs=attrs or None)


def test_held_open_raises_after_the_wait_and_closing_clears() -> None:
    """Open at 10: the deadline is 40; nothing before it, one raise at it (repeats of open
    do not restart the wait), one clear on closing."""
    r = HeldOpen(Match("gpio.*", "contact"), 30.0)
    assert r.observe(ev("gpio.door", "contact", "open"), 10.0) == []
    assert r.observe(ev("gpio.door", "contact", "open"), 20.0) == []
    assert r.next_deadline() == 40.0
    assert r.due(39.9) == []
    [f] = r.due(40.0)
    assert (f.src, f.type, f.value, f.prio) == ("gpio.door", "contact.held_open",
                                                {"state": "raised", "open_s": 30.0}, 1)
    assert r.due(50.0) == [] and r.next_deadline() is None
    [f] = r.observe(ev("gpio.door", "contact", "closed"), 55.0)
    assert f.value == {"state": "cleared", "open_s": 45.0}


def test_held_open_closed_in_time_is_nothing_and_others_are_ignored() -> None:
    """Closed before the wait: no finding, no deadline; other sources/types are not watched."""
    r = HeldOpen(Match("gpio.door", "contact"), 30.0)
    r.observe(ev("gpio.door", "contact", "open"), 0.0)
    assert r.observe(ev("gpio.door", "contact", "closed"), 29.0) == []
    assert r.next_deadline() is None and r.due(100.0) == []
    r.observe(ev("gpio.vault", "contact", "open"), 0.0)
    r.observe(ev("gpio.door", "motion", "open"), 0.0)
    assert r.next_deadline() is None


def test_silence_raises_once_and_hearing_clears() -> None:
    """A source heard at 5 and then silent raises at 5 + after_s, once; hearing it clears."""
    r = Silence(Match("ups.*"), 60.0, start=0.0)
    assert r.next_deadline() is None  # a pattern: watched from the first reading
    assert r.heard("ups.main", "ups.load", 5.0) == []
    assert r.next_deadline() == 65.0
    assert r.due(64.0) == []
    [f] = r.due(65.0)
    assert (f.src, f.type, f.value) == ("ups.main", "sensor.silent",
                                        {"state": "raised", "silent_s": 60.0})
    assert r.due(200.0) == []
    [f] = r.heard("ups.main", "ups.load", 205.0)
    assert f.value == {"state": "cleared", "silent_s": 200.0}


def test_silence_named_source_is_expected_from_the_start_and_status_is_not_hearing() -> None:
    """A source named without wildcards is watched from `start`; the driver's source.offline
    does not count as hearing the sensor."""
    r = Silence(Match("line.climate"), 30.0, start=100.0)
    assert r.next_deadline() == 130.0
    assert r.heard("line.climate", "source.offline", 120.0) == []
    assert [f.value["state"] for f in r.due(130.0)] == ["raised"]  # type: ignore[index]
    assert r.heard("line.other", "temperature", 131.0) == []


def test_sequence_without_a_preceding_event() -> None:
    """The vault opening with no keyswitch disarm in the 300 s before it raises; after one it
    does not; once the disarm is older than 300 s it raises again."""
    r = SequenceRule("vault", Match("gpio.keyswitch", "keyswitch", "disarm"),
                     Match("gpio.vault", "contact", "open"), 300.0, mode="without",
                     type="vault.unexpected_open", prio=0)
    [f] = r.observe(ev("gpio.vault", "contact", "open"), 10.0)
    assert (f.src, f.type, f.value, f.prio) == ("gpio.vault", "vault.unexpected_open", "open", 0)
    assert f.attrs == {"rule": "vault", "within_s": 300.0}
    assert r.observe(ev("gpio.keyswitch", "keyswitch", "disarm"), 100.0) == []
    assert r.observe(ev("gpio.vault", "contact", "open"), 400.0) == []
    [f] = r.observe(ev("gpio.vault", "contact", "open"), 400.5)
    assert f.attrs == {"rule": "vault", "within_s": 300.0, "since_first_s": 300.5}
    assert r.observe(ev("gpio.vault", "contact", "closed"), 500.0) == []


def test_sequence_after_and_attribute_match() -> None:
    """B within T after A raises (A matched on an attribute too); outside T it does not."""
    first = Match("arming", "arm.state", "disarmed", {"cause": "command"})
    r = SequenceRule("x", first, Match("gpio.*", "tamper", "tampered"), 60.0, mode="after",
                     type="tamper.after_disarm", prio=1)
    r.observe(ev("arming", "arm.state", "disarmed", cause="keyswitch"), 0.0)
    assert r.observe(ev("gpio.t", "tamper", "tampered"), 10.0) == []
    r.observe(ev("arming", "arm.state", "disarmed", cause="command"), 20.0)
    assert len(r.observe(ev("gpio.t", "tamper", "tampered"), 80.0)) == 1
    assert r.observe(ev("gpio.t", "tamper", "tampered"), 80.1) == []


def test_value_match_tells_true_from_one() -> None:
    """A value of True matches True, not 1 (a motion flag is not a count)."""
    m = Match("*", "*", True)
    assert m(ev("a", "motion", True)) and not m(ev("a", "motion", 1))


def test_rules_together_give_the_earliest_deadline() -> None:
    """StatefulRules feeds every rule and reports the earliest deadline of all."""
    rules = StatefulRules([HeldOpen(Match(), 30.0), Silence(Match("x"), 20.0, start=0.0)])
    rules.observe(ev("gpio.door", "contact", "open"), 5.0)
    assert rules.next_deadline() == 20.0
    assert [f.type for f in rules.due(35.0)] == ["contact.held_open", "sensor.silent"]
