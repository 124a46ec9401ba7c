"""config/example.toml documents every key of the configuration: each field of every model
reachable from `AgentConfig` appears in it as a key (set, or commented out with its default).

The check is by key name, not by full path: a key that exists under two tables is satisfied by
either (e.g. `name`). It still fails for any new key that the example never mentions."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from agent.config import AgentConfig, parse_config
from agent.core.config import StrictModel

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "example.toml"


def _models(tp: object) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (X, X | None, list[X], dict[str, X])."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in getattr(tp, "__args__", ()) for m in _models(arg)]


def keys(model: type[BaseModel], prefix: str = "", seen: set[type] | None = None) -> list[str]:
    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    out: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        for inner in _models(field.annotation):
            out += keys(inner, path, seen)
    return out


def documented(text: str, key: str) -> bool:
    """`key = ...`, `[...key]`, `[[...key]]`, `key.sub = ...` or `{ key = ... }`, commented or
    not."""
    return re.search(rf"(^|[\s{{,#\[.]){re.escape(key)}\s*(=|\]|\.)", text, re.M) is not None


def test_every_key_is_in_the_example() -> None:
    text = EXAMPLE.read_text()
    missing = [k for k in keys(AgentConfig) if not documented(text, k.rsplit(".", 1)[-1])]
    assert missing == [], f"config/example.toml does not document: {', '.join(missing)}"


def test_the_check_sees_a_key_missing() -> None:
    """The check above can fail: a model with a key the example never names is caught."""

    class Extra(StrictModel):
        a_key_nobody_documented: int = 0

    text = EXAMPLE.read_text()
    assert [k for k in keys(Extra) if not documented(text, k)] == ["a_key_nobody_documented"]


def test_the_example_is_a_valid_config() -> None:
    import tomllib

    parse_config(tomllib.loads(EXAMPLE.read_text()), str(EXAMPLE))
