"""Base for every config model: strict (unknown keys are errors), frozen once loaded. Each
family keeps its model in a light module of its own (`*_config.py`), so that loading a config
imports no driver stack, no paho and no cryptography (tests/test_layering.py)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict

__all__ = ["StrictModel", "duplicates", "host_port", "unique_names"]


class StrictModel(BaseModel):
    """Unknown keys are errors (agent.config turns them into did-you-mean messages)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def host_port(host: str, port: int) -> str:
    """``host:port`` as logs, health and the doctor name a device (an IPv6 literal
    bracketed)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def duplicates(items: Iterable[Hashable]) -> list[str]:
    """The items that occur more than once, sorted, as text (for an error message)."""
    seen: set[Hashable] = set()
    twice: set[str] = set()
    for item in items:
        if item in seen:
            twice.add(str(item))
        seen.add(item)
    return sorted(twice)


class _Named(Protocol):
    name: str


def unique_names(what: str) -> Any:
    """The validator of a list of entries whose `name`s must be unique (they make ids such as
    ``nut.<name>``): ``Annotated[list[NutConfig], unique_names("nut")]``."""

    def check(entries: list[_Named]) -> list[_Named]:
        if dups := duplicates(e.name for e in entries):
            raise ValueError(f"duplicate {what} names: {', '.join(dups)}")
        return entries

    return AfterValidator(check)
