"""Plain-text tables for the operator commands (doctor, status), with tabulate.

Not rich: structlog imports rich whenever it is installed, so a product that depended on it
would load rich and pygments into every process, the agent's included (about 3.4 MB of RSS
on a Pi). rich stays with the simulator's demo. Colour only on a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from tabulate import tabulate

__all__ = ["colour", "table"]

_CODES = {"green": "32", "yellow": "33", "red": "31", "dim": "2", "bold": "1"}


def colour(text: str, name: str, stream: TextIO | None = None) -> str:
    """`text` in an ANSI colour when `stream` (stdout) is a terminal and NO_COLOR is unset."""
    stream = stream or sys.stdout
    if not stream.isatty() or os.environ.get("NO_COLOR"):
        return text
    return f"\x1b[{_CODES[name]}m{text}\x1b[0m"


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], title: str | None = None,
          wrap: Sequence[int | None] | None = None) -> str:
    """A titled table; `wrap` gives a column's width to wrap its text at (None: no wrap)."""
    body = tabulate(list(rows), headers=list(headers), tablefmt="simple",
                    maxcolwidths=list(wrap) if wrap else None, disable_numparse=True)
    return f"{title}\n{body}" if title else body
