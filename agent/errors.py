"""The project's exception base. Each error also inherits the matching builtin, as gpiozero's do,
so callers can catch `ValueError` or `OSError` without knowing our names."""

from __future__ import annotations

from drivers.base import DriverError

__all__ = ["AgentError", "ConfigError", "StoreError", "UplinkError"]


class AgentError(DriverError):
    """Root of every error the agent raises on purpose. Carries advice for the operator."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (fix: {self.hint})" if self.hint else base


class ConfigError(AgentError, ValueError):
    """The configuration file is invalid. `problems` lists every `key.path: got X, expected Y`."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class StoreError(AgentError, OSError):
    """The outbox cannot be opened or written."""


class UplinkError(AgentError, ConnectionError):
    """An uplink failed in a way that needs the operator (bad certificate, refused auth)."""
