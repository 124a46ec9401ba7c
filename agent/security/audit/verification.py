"""Reading the log's files, every generation oldest first, and checking the chain: `verify`
and `export`. Reads only; creates nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.security.audit.record import ZERO, digest

__all__ = ["VerifyResult", "check", "export", "generations", "records", "verify"]


@dataclass
class VerifyResult:
    records: int = 0
    first_n: int | None = None
    last_n: int | None = None
    last_h: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_n": self.first_n,
                "last_n": self.last_n, "last_h": self.last_h, "problems": self.problems,
                "notes": self.notes}


def generations(path: Path, keep: int | None = None) -> list[Path]:
    """The log's files, oldest first: audit.log.{k} ... audit.log.1, audit.log."""
    rotated: list[tuple[int, Path]] = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit() and (keep is None or int(suffix) <= keep):
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + [path]


def records(path: Path) -> Iterator[tuple[str, int, bytes]]:
    """(file name, line number, line) of every non-blank line, oldest first."""
    for p in generations(path):
        with contextlib.suppress(FileNotFoundError), open(p, "rb") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield p.name, i, line.rstrip(b"\n")


def verify(path: Path) -> VerifyResult:
    """Check every record's hash, the chain between records, and the numbering."""
    return check(records(Path(path)))


def check(items: Iterable[tuple[str, int, bytes]]) -> VerifyResult:
    """The verification of `records()` output (read by the caller, e.g. under a lock)."""
    res = VerifyResult()
    prev_h: str | None = None
    prev_n: int | None = None
    for name, lineno, line in items:
        where = f"{name}:{lineno}"
        try:
            doc = json.loads(line)
            body = {k: doc[k] for k in ("n", "t", "type", "actor", "pid", "attrs", "prev")}
            n, h = int(doc["n"]), str(doc["h"])
        except (ValueError, KeyError, TypeError):
            res.problems.append(f"{where}: not an audit record")
            prev_h, prev_n = hashlib.sha256(line).hexdigest(), None
            continue
        if digest(body) != h:
            res.problems.append(f"{where}: record n={n} was altered (hash mismatch)")
        if prev_h is None:
            if n != 1 or body["prev"] != ZERO:
                res.notes.append(f"{where}: starts at n={n}; older records were rotated away")
        elif body["prev"] != prev_h:
            res.problems.append(f"{where}: chain broken before n={n} (a record was removed, "
                                "inserted or altered)")
        if prev_n is not None and n != prev_n + 1:
            res.problems.append(f"{where}: n={n} follows n={prev_n}")
        res.first_n = n if res.first_n is None else res.first_n
        res.records += 1
        res.last_n, res.last_h, prev_h, prev_n = n, h, h, n
    return res


def export(path: Path, out: IO[str]) -> VerifyResult:
    """Write every record, oldest first, as JSON lines; return the verification of the same."""
    for _name, _lineno, line in records(Path(path)):
        out.write(line.decode("utf-8", "replace") + "\n")
    return verify(path)
