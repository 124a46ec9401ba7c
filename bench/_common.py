"""Shared by the bench scripts: the machine's description, median/spread, the results table.

Every bench script prints its own table and, with ``--json PATH``, also writes its rows there
so that ``bench/run_all.py`` can print one table for the whole suite. A row is one figure:
its median over the runs, the spread (min..max), the baseline measured in the same run, the
ratio, the target and whether it was met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "Row",
    "add_common_args",
    "machine",
    "print_table",
    "read_json",
    "summarise",
    "write_json",
]


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    value: float
    unit: str
    spread: str = ""  # "min..max" over the runs
    baseline: float | None = None
    baseline_what: str = ""
    target: str = ""  # human-readable, e.g. ">= 0.5x baseline"
    met: bool | None = None  # None: no target
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test uses it)")
    ap.add_argument("--runs", type=int, default=None, help="repetitions (median and spread)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")


def summarise(values: Sequence[float]) -> tuple[float, str]:
    """(median, "min..max") of one figure over the runs."""
    med = statistics.median(values)
    return med, f"{_fmt(min(values))}..{_fmt(max(values))}" if len(values) > 1 else ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores usable by this process (taskset shows here), Python version."""
    usable = len(os.sched_getaffinity(0))
    return (
        f"{cpu_model()}, {usable} of {os.cpu_count()} cores usable, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()} "
        f"({sys.implementation.name})"
    )


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def print_table(rows: Sequence[Row], out: Callable[[str], None] = print) -> None:
    head = ("figure", "value", "spread", "baseline", "ratio", "target", "met?")
    body = []
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        base = f"{_fmt(r.baseline)} {r.baseline_what}".strip() if r.baseline is not None else "-"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        body.append((r.figure, f"{_fmt(r.value)} {r.unit}", r.spread or "-", base, ratio,
                     r.target or "-", met))
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out(line)
    out("-|-".join("-" * w for w in widths))
    for b in body:
        out(" | ".join(str(c).ljust(w) for c, w in zip(b, widths, strict=True)))
    for r in rows:
        if r.note:
            out(f"  {r.figure}: {r.note}")


def write_json(path: Path | None, rows: Sequence[Row]) -> None:
    if path is None:
        return
    path.write_text(json.dumps([asdict(r) for r in rows], indent=1))


def read_json(path: Path) -> list[Row]:
    return [Row(**d) for d in json.loads(path.read_text())]
