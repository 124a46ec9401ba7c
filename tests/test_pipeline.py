"""The pipeline's rules, with time passed in as plain numbers."""

from __future__ import annotations

from agent.core.types import ALERT, TQ_SYNCED, TQ_UNSYNCED, Reading
from agent.runtime.pipeline import Pipeline, Rule, Threshold


def pipe(*rules: Rule, synced: bool = True, **kw: object) -> Pipeline:
    return Pipeline(list(rules), wall=lambda: 1000.0, synchronized=lambda: synced, **kw)  # type: ignore[arg-type]


def temp(v: float, src: str = "ble.room") -> Reading:
    return Reading(source=src, type="temperature", value=v, unit="Cel", ts=5.0)


def test_no_rule_passes_through_with_time_quality() -> None:
    """Without a rule every reading becomes one event; time quality follows the clock."""
    [e] = pipe().process(temp(21.0), 0.0)
    assert (e.src, e.type, e.v, e.u, e.t, e.tq, e.prio) == ("ble.room", "temperature", 21.0,
                                                            "Cel", 5.0, TQ_SYNCED, 2)
    [e] = pipe(synced=False).process(temp(21.0), 0.0)
    assert e.tq == TQ_UNSYNCED


def test_deadband_and_heartbeat() -> None:
    """Within the deadband nothing is emitted, unless max_interval passed (heartbeat)."""
    p = pipe(Rule(type="temperature", deadband=0.5, max_interval_s=60))
    assert len(p.process(temp(20.0), 0)) == 1
    assert p.process(temp(20.3), 1) == []
    assert len(p.process(temp(20.6), 2)) == 1    # moved 0.6 from last emitted (20.0)
    assert p.process(temp(20.7), 3) == []
    assert len(p.process(temp(20.7), 63)) == 1   # heartbeat
    assert p.counters["suppressed_deadband"] == 2


def test_min_interval() -> None:
    """At most one event per min_interval for a source and type."""
    p = pipe(Rule(source="ble.*", min_interval_s=10))
    assert len(p.process(temp(1), 0)) == 1
    assert p.process(temp(5), 5) == []
    assert len(p.process(temp(6), 10)) == 1


def test_thresholds_raise_and_clear_with_hysteresis() -> None:
    """Crossing 'above' raises an alert once; it clears only below limit - hysteresis."""
    p = pipe(Rule(type="temperature", thresholds=(Threshold(above=30, hysteresis=1),)))
    types = lambda evs: [(e.type, e.v["state"] if isinstance(e.v, dict) else e.v) for e in evs]  # noqa: E731
    assert types(p.process(temp(29), 0)) == [("temperature", 29)]
    out = p.process(temp(31), 1)
    assert types(out) == [("temperature.high", "raised"), ("temperature", 31)]
    assert out[0].prio == ALERT
    assert types(p.process(temp(29.5), 2)) == [("temperature", 29.5)]  # inside hysteresis
    assert types(p.process(temp(28.9), 3)) == [("temperature.high", "cleared"),
                                               ("temperature", 28.9)]


def test_debounce_emits_settled_value_only() -> None:
    """Five changes within the window give one event with the settled value; a change that
    reverts inside the window gives none."""
    p = pipe(Rule(source="ble.door", debounce_s=0.02))
    door = lambda v: Reading(source="ble.door", type="door", value=v)  # noqa: E731
    p.process(door("closed"), 0.0)
    assert [e.v for e in p.due(0.03)] == ["closed"]
    for i, v in enumerate(["open", "closed", "open", "closed", "open"]):
        p.process(door(v), 1.0 + i * 0.004)
    assert p.due(1.02) == []                 # still bouncing
    assert p.next_deadline() == 1.016 + 0.02
    assert [e.v for e in p.due(1.04)] == ["open"]
    p.process(door("closed"), 2.0)
    p.process(door("open"), 2.005)           # reverted to the last emitted value
    assert p.due(3.0) == []
    assert p.counters["bounce_suppressed"] == 6  # 4 of the 5 edges, and the revert pair


def test_on_change_only_and_priority_override_and_drop() -> None:
    """Repeats are dropped; a rule can set priority or drop a type."""
    p = pipe(Rule(type="contact", on_change_only=True, priority=0), Rule(type="noise", drop=True))
    c = lambda v: Reading(source="gpio.vault", type="contact", value=v, priority=2)  # noqa: E731
    [e] = p.process(c("open"), 0)
    assert e.prio == 0
    assert p.process(c("open"), 1) == []
    assert len(p.process(c("closed"), 2)) == 1
    assert p.process(Reading(source="x", type="noise", value=1), 3) == []


def test_privacy_strips_and_pseudonymises_attributes() -> None:
    """Stripped attributes vanish; pseudonymised ones become a keyed hash, stable per key."""
    r = Reading(source="door.reader", type="badge", value="ok",
                attrs={"card_id": "12345678", "name": "J. Doe", "door": "vault"})
    p = pipe(pseudonym_key=b"k" * 32, pseudonymise_attrs=["card_id"], strip_attrs=["name"])
    [e] = p.process(r, 0)
    assert e.attrs is not None
    assert set(e.attrs) == {"card_id", "door"}
    assert e.attrs["card_id"] != "12345678" and len(e.attrs["card_id"]) == 16
    [again] = p.process(r, 1)
    assert again.attrs is not None and again.attrs["card_id"] == e.attrs["card_id"]
    [nokey] = pipe(pseudonymise_attrs=["card_id"]).process(r, 0)
    assert nokey.attrs is not None and "card_id" not in nokey.attrs
