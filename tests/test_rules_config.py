"""[arming], [[held_open]], [[silence]], [[sequence]] and armed-state priorities in the config:
bad schedules are refused with the key path and the reason, by check-config too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.core.errors import ConfigError

CLI = [sys.executable, "-m", "agent.ops.cli"]
MINIMAL: dict[str, Any] = {
    "gateway": {"id": "gw-1"},
    "uplink": {"order": ["mqtt"], "mqtt": {"host": "h", "insecure": True}},
}


def problems(**extra: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, **extra})
    return list(info.value.problems)


def arming(**kw: Any) -> dict[str, Any]:
    return {"arming": {"timezone": "Europe/Berlin", **kw}}


@pytest.mark.parametrize(("extra", "line"), [
    (arming(timezone="Europe/Berln"),
     "arming.timezone: got 'Europe/Berln', expected an IANA time zone name"),
    (arming(week={"mon": ["25:00-26:00"]}),
     "arming.week.mon[0]: got '25:00-26:00', expected '25:00' is not a time of day"),
    (arming(week={"tue": ["08:00-18:00", "18:00-07:00"]}),
     "arming.week.tue[1]: got '18:00-07:00', expected '18:00-07:00' ends before it starts"),
    (arming(week={"thur": ["08:00-18:00"]}),
     "arming.week.thur: unknown key; did you mean 'thu'?"),
    (arming(week={"wed": ["08:00-12:00", "11:00-18:00"]}),
     "arming.week.wed[1]: got '11:00-18:00', expected a period that does not overlap "
     "'08:00-12:00' on the same day"),
    (arming(exceptions=[{"date": "2026-12-24", "open": ["10:00-13:00"]},
                        {"date": "2026-12-24", "closed": True}]),
     "arming.exceptions[1].date: got '2026-12-24', expected dates not already in "
     "arming.exceptions[0] (2026-12-24 is in both)"),
    (arming(exceptions=[{"date": "2026-12-27", "closed": True},
                        {"date": "2026-12-23", "until": "2026-12-28", "closed": True}]),
     "arming.exceptions[1].until: got '2026-12-28', expected dates not already in "
     "arming.exceptions[0] (2026-12-27 is in both)"),
    (arming(exceptions=[{"date": "2026-12-24", "until": "2026-12-20", "closed": True}]),
     "arming.exceptions[0]: got"),
    (arming(exceptions=[{"date": "2026-12-24"}]),
     "expected exactly one of closed = true or open = [periods]"),
    (arming(exceptions=[{"date": "2026-13-01", "closed": True}]),
     "arming.exceptions[0].date: got '2026-13-01'"),
    ({"rules": [{"source": "gpio.vault", "priority_armed": 0}]},
     "rules[0].priority_armed: got 0, expected an [arming] table"),
    ({"held_open": [{"after_s": 0}]}, "held_open[0].after_s: got 0"),
    ({"silence": [{"after_s": 10}]}, "silence[0].source: missing"),
    ({"sequence": [{"name": "x", "first": {}, "then": {}, "within_s": 5, "mode": "before"}]},
     "sequence[0].mode: got 'before'"),
])
def test_bad_rules_config_names_key_path_and_reason(extra: dict[str, Any], line: str) -> None:
    """Each bad schedule or rule is one problem line naming its key path and the reason."""
    found = problems(**extra)
    assert any(p.startswith(line) or line in p for p in found), found


def test_until_before_date_says_so() -> None:
    """An exception whose until is before its date says which dates."""
    [p] = problems(**arming(exceptions=[{"date": "2026-12-24", "until": "2026-12-20",
                                         "closed": True}]))
    assert "until 2026-12-20 is before date 2026-12-24" in p


def test_good_rules_config_builds_the_rules() -> None:
    """A valid [arming] gives a schedule in its zone; the rule tables build their rules."""
    cfg = parse_config({**MINIMAL, **arming(week={"mon": ["08:00-18:00"]},
                                            exceptions=[{"date": "2026-12-25", "closed": True}]),
                        "rules": [{"source": "gpio.vault", "priority_armed": 0,
                                   "priority_disarmed": 2}],
                        "held_open": [{"after_s": 30}], "silence": [{"source": "ups.main",
                                                                     "after_s": 60}],
                        "sequence": [{"name": "v", "first": {"type": "keyswitch"},
                                      "then": {"type": "contact", "value": "open"},
                                      "within_s": 300, "mode": "without"}]})
    assert cfg.arming is not None
    s = cfg.arming.schedule()
    assert str(s.tz) == "Europe/Berlin" and len(s.exceptions) == 1
    r = cfg.rules[0].to_rule()
    assert (r.priority_armed, r.priority_disarmed) == (0, 2)
    assert cfg.sequence[0].rule().type == "sequence.v"


def test_check_config_rejects_a_bad_schedule(tmp_path: Path) -> None:
    """`branch-agent check-config` exits 2 and prints the key path and reason."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "gw"\n[uplink]\norder = ["mqtt"]\n'
                   '[uplink.mqtt]\nhost = "h"\ninsecure = true\n'
                   '[arming]\ntimezone = "Europe/Berlin"\n[arming.week]\nmon = ["08:00-25:00"]\n')
    r = subprocess.run([*CLI, "check-config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "arming.week.mon[0]: got '08:00-25:00', expected '25:00' is not a time of day" in (
        r.stderr)
