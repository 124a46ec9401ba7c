"""The benchmarks still run: `bench/run_all.py --quick` (each script once, tiny sizes) exits 0
and prints every figure in one table. No figure is asserted: timing belongs to `make bench`, not
to the test suite."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    """`bench/run_all.py --quick --json`: every benchmark once (each with --quick, writing its
    rows with --json, which run_all reads back), its output and every row."""
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    proc = run(str(BENCH / "run_all.py"), "--quick", "--json", str(out), timeout=300)
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("script", "figures"),
    [
        ("outbox.py", ["durable ingest, append x", "durable ingest, append_many"]),
        ("forward.py", ["end-to-end delivery", "agent alone", "platform alone",
                        "pipeline efficiency", "bytes per event on the wire"]),
        ("drain.py", ["backlog drain", "memory, peak RSS draining",
                      "alarm latency under load, p50", "alarm latency under load, p99"]),
        ("alarm_handling.py", ["platform alarm handling beside a backlog, p50",
                               "platform alarm handling beside a backlog, p99"]),
        ("footprint.py", ["start-up", "idle CPU", "memory, peak RSS idle", "memory, RSS growth",
                          "write amplification"]),
    ],
)
def test_bench_script_prints_its_rows(script: str, figures: list[str],
                                      quick_run: tuple[str, list[dict[str, Any]]]) -> None:
    """Each benchmark's figures are in the one table, each with a finite value and a baseline
    that is absent or positive."""
    stdout, rows = quick_run
    for fig in figures:
        assert any(line.startswith(fig) for line in stdout.splitlines()), (script, fig)
        row = next(r for r in rows if r["figure"].startswith(fig))
        assert math.isfinite(row["value"]) and row["met"] in (True, False, None), row
        assert row["baseline"] is None or row["baseline"] > 0, row


def test_run_all_prints_one_table_with_the_machine(
        quick_run: tuple[str, list[dict[str, Any]]]) -> None:
    """`bench/run_all.py --quick` prints one table, the machine, and the CoAP ingest lines
    beside the bare aiocoap baseline."""
    stdout, _ = quick_run
    assert "Machine:" in stdout and "Python 3." in stdout
    assert stdout.count("| met?") == 1
    assert "readings/s accepted" in stdout and "bare aiocoap baseline" in stdout


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_fleet_bench_runs(tmp_path: Path) -> None:
    """bench/fleet.py --quick (about 2.5 minutes, so `make bench-smoke`, not `make test`): the
    ceilings and the fleet runs print their rows and write them."""
    out = tmp_path / "rows.json"
    proc = run(str(BENCH / "fleet.py"), "--quick", "--json", str(out), timeout=400)
    rows = json.loads(out.read_text())
    for fig in ("fleet ceiling, COPY into events alone",
                "fleet ceiling, publish into the stream alone",
                "fleet, 20 gateways, 2 receiver(s), stored and acked",
                "fleet, 2 receiver(s), 20 ev/s per gateway, batch latency p99"):
        assert fig in proc.stdout, fig
        row = next(r for r in rows if r["figure"].startswith(fig))
        assert math.isfinite(row["value"]) and row["value"] > 0, row
