"""Base for every config model: strict (unknown keys are errors), frozen once loaded. Each
family keeps its model in a light module of its own (`*_config.py`), so that loading a config
imports no driver stack, no paho and no cryptography (tests/test_layering.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """Unknown keys are errors (agent.config turns them into did-you-mean messages)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
