"""`branch-sim demo --headless` (also reachable as `branch-agent demo`) runs to its summary with
nothing lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from branchsim.broker import find_mosquitto


@pytest.mark.parametrize("transport,duration", [("auto", 30), ("coap", 15)])
def test_demo_runs_to_summary_with_zero_lost(tmp_path: Path, transport: str,
                                             duration: int) -> None:
    """The whole branch (simulator, agent, platform), with an uplink cut halfway, ends with
    every produced event delivered and verified: LOST 0, exit 0."""
    if transport == "auto":
        assert find_mosquitto(), "make test installs mosquitto; the demo's default path needs it"
    r = subprocess.run(
        [sys.executable, "-m", "branchsim.cli", "demo", "--headless", "--duration", str(duration),
         "--transport", transport, "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=duration + 120,
    )
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "LOST: 0" in out
    assert "uplink CUT" in out and "uplink restored" in out
    # piped, each progress line is one line (rich would wrap it at 80 columns)
    progress = [line for line in out.splitlines() if line.startswith("t=")]
    assert progress and all("events at platform" in line for line in progress), progress[:3]
    produced = int(out.split("events produced (accepted)")[1].split("│")[1].strip())
    delivered = int(out.split("delivered to the platform")[1].split("│")[1].strip())
    assert produced > 100 and produced == delivered
