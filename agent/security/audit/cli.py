"""`branch-agent audit verify|export` (also `python -m agent.security.audit`): check or export
the local log from a shell, without the agent running."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.core.paths import StateLayout
from agent.security.audit.verification import export, verify

__all__ = ["DEFAULT_PATH", "main"]

# Where a gateway provisioned with the defaults keeps it (the config may say otherwise).
DEFAULT_PATH = StateLayout(Path("/var/lib/branch-agent")).audit_log


def main(argv: Sequence[str] | None = None) -> int:
    """`branch-agent audit {verify,export} [--file PATH]`. Exit 0: intact; 1: tampered;
    2: unreadable."""
    p = argparse.ArgumentParser(prog="branch-agent audit",
                                description="check or export the local audit log")
    p.add_argument("action", choices=["verify", "export"])
    p.add_argument("--file", type=Path, default=DEFAULT_PATH, help=f"default {DEFAULT_PATH}")
    p.add_argument("--json", action="store_true", help="verify: print the result as JSON")
    args = p.parse_args(argv)
    if not args.file.exists():
        print(f"branch-agent audit: {args.file} does not exist", file=sys.stderr)
        return 2
    try:
        res = export(args.file, sys.stdout) if args.action == "export" else verify(args.file)
    except OSError as exc:
        print(f"branch-agent audit: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    report = sys.stdout if args.action == "verify" else sys.stderr
    if args.json and args.action == "verify":
        print(json.dumps(res.as_dict(), indent=2), file=report)
    else:
        state = "intact" if res.ok else "TAMPERED"
        print(f"audit log {args.file}: {state}; {res.records} records "
              f"(n={res.first_n}..{res.last_n}); head {res.last_h}", file=report)
        for line in res.notes:
            print(f"  note: {line}", file=report)
        for line in res.problems:
            print(f"  problem: {line}", file=report)
    return 0 if res.ok else 1
