"""The benchmarks still run: each script with --quick (tiny sizes) exits 0 and prints its table.
No figure is asserted: timing belongs to `make bench`, not to the test suite."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.parametrize(
    ("script", "figures"),
    [
        ("outbox.py", ["durable ingest, append x", "durable ingest, append_many"]),
        ("forward.py", ["end-to-end delivery"]),
        ("drain.py", ["backlog drain", "memory, peak RSS draining",
                      "alarm latency under load, p50", "alarm latency under load, p99"]),
        ("alarm_handling.py", ["platform alarm handling beside a backlog, p50",
                               "platform alarm handling beside a backlog, p99"]),
        ("footprint.py", ["start-up", "idle CPU", "memory, peak RSS idle", "memory, RSS growth",
                          "write amplification"]),
    ],
)
def test_bench_script_prints_its_table(script: str, figures: list[str], tmp_path: Path) -> None:
    """A benchmark with --quick prints the table with its figures and writes the same rows."""
    out = tmp_path / "rows.json"
    proc = run(str(BENCH / script), "--quick", "--json", str(out))
    assert "figure" in proc.stdout and "baseline" in proc.stdout
    rows = json.loads(out.read_text())
    for fig in figures:
        assert any(fig in line for line in proc.stdout.splitlines()), fig
        row = next(r for r in rows if r["figure"].startswith(fig))
        assert math.isfinite(row["value"]) and row["met"] in (True, False, None)
        assert row["baseline"] is None or row["baseline"] > 0


def test_coap_ingest_bench_runs() -> None:
    """bench/coap_ingest.py prints accepted readings/s beside the bare aiocoap baseline."""
    proc = run(str(BENCH / "coap_ingest.py"), "--seconds", "0.2")
    assert "readings/s accepted" in proc.stdout
    assert "bare aiocoap baseline" in proc.stdout


def test_run_all_prints_one_table_with_the_machine() -> None:
    """`bench/run_all.py --quick` runs every benchmark and prints one table and the machine."""
    proc = run(str(BENCH / "run_all.py"), "--quick")
    assert "Machine:" in proc.stdout and "Python 3." in proc.stdout
    for fig in ("durable ingest", "end-to-end delivery", "backlog drain", "alarm latency",
                "idle CPU", "write amplification", "start-up", "CoAP ingest"):
        assert fig in proc.stdout, fig
    assert "| met?" in proc.stdout


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
