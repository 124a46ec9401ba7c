"""Run every benchmark (each in its own process) and print one table with the machine.

    .venv/bin/python bench/run_all.py [--quick] [--pin CPU] [--agent-python PATH] [--json F]
                                                              # `make bench` runs it plain

About 21 minutes on a 2-core desktop (the 1M-event drain twice, a minute of idle agent, and
the fleet benchmark's 15).

``--pin 0`` runs each benchmark under ``taskset -c 0`` (one core, closer to a Pi 4; the
broker and the platform process inherit the pin). ``--quick`` passes ``--quick`` to each:
tiny sizes, a check that the scripts still run, not a measurement; it leaves out the fleet
benchmark, whose quick run alone takes about 2.5 minutes (three NATS clusters and PostgreSQL
started and stopped): ``make bench-smoke`` runs that one too.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, machine, print_table, read_json, write_json

HERE = Path(__file__).resolve().parent
# (script, extra args for a full run); each writes its rows with --json.
BENCHES: list[tuple[str, list[str]]] = [
    ("outbox.py", []),
    ("forward.py", []),
    # One 1M-event drain per run serves the drain, alarm-latency and draining-RSS figures.
    ("drain.py", ["--runs", "2"]),
    # The platform's part of the alarm figure, with and without bulk standing aside (1 minute).
    ("alarm_handling.py", []),
    ("footprint.py", []),
    # The platform at fleet scale (docs/SCALE.md): about 15 minutes.
    ("fleet.py", []),
]
TIMEOUT_S = {"fleet.py": 2400}  # others: 600
SKIP_QUICK = {"fleet.py"}
# bench/coap_ingest.py prints its own lines (no --json); it is run and shown as it prints.
COAP = ("coap_ingest.py", {"full": ["--seconds", "3"], "quick": ["--seconds", "0.3"]})


def agent_python(given: str | None) -> str:
    """The interpreter of footprint.py's agent (which runs this tree's code): `.venv-dist`'s,
    which has exactly the product's locked packages as a gateway installs them (`make bench`
    builds it from the wheelhouse), else this one, whose venv also has the simulator's and the
    test tools' packages (rich alone adds ~4 MB of RSS to every process that imports
    structlog)."""
    if given:
        return given
    dist = HERE.parent / ".venv-dist" / "bin" / "python"
    return str(dist) if dist.exists() else sys.executable


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    print(f"$ {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True,
                          timeout=timeout, check=False)
    print(f"  ({time.monotonic() - start:.1f} s, exit {proc.returncode})", flush=True)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pin", metavar="CPU", help="taskset -c CPU for every benchmark")
    ap.add_argument("--agent-python", metavar="PATH",
                    help="the agent's interpreter in footprint.py (default: .venv-dist's when "
                         "it exists, else this one)")
    ap.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = ap.parse_args()
    prefix = ["taskset", "-c", args.pin] if args.pin else []
    product = agent_python(args.agent_python)
    print(f"# footprint.py's agent runs on {product}", flush=True)
    if product == sys.executable:
        print("#   (not the product as installed: `make bench` builds .venv-dist for that)",
              flush=True)
    rows: list[Row] = []
    failed: list[str] = []
    extra_out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-all-") as d:
        for script, extra in BENCHES:
            if args.quick and script in SKIP_QUICK:
                print(f"$ {script}: left out with --quick (make bench-smoke runs it)", flush=True)
                continue
            out = Path(d) / f"{script}.json"
            cmd = [*prefix, sys.executable, str(HERE / script), "--json", str(out),
                   *(["--quick"] if args.quick else extra)]
            if script == "footprint.py":
                cmd += ["--agent-python", product]
            proc = run(cmd, timeout=TIMEOUT_S.get(script, 600))
            if proc.returncode != 0 or not out.exists():
                failed.append(script)
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
                continue
            rows += read_json(out)
        script, sizes = COAP
        cmd = [*prefix, sys.executable, str(HERE / script),
               *(sizes["quick"] if args.quick else sizes["full"])]
        proc = run(cmd, timeout=300)
        if proc.returncode != 0:
            failed.append(script)
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        else:
            extra_out = [f"  {line}" for line in proc.stdout.splitlines()]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(f"Benchmarks {stamp}{' (QUICK: sizes too small to mean anything)' if args.quick else ''}")
    print(f"Machine: {machine()}" + (f", pinned to CPU {args.pin}" if args.pin else ""))
    print(f"Command: {shlex.join([sys.executable, *sys.argv])}")
    print()
    print_table(rows)
    write_json(args.json, rows)
    if extra_out:
        print()
        print("CoAP ingest (bench/coap_ingest.py):")
        print("\n".join(extra_out))
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
