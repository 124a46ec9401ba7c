"""Base for every config model: strict (unknown keys are errors), frozen once loaded."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """Unknown keys are errors (agent.config turns them into did-you-mean messages)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
