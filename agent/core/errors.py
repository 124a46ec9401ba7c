"""The project's one exception root, and the errors every layer shares. Each error also inherits
the matching builtin, as gpiozero's do (`PinInvalidPin(PinError, ValueError)`), so callers can
catch `ValueError` or `OSError` without knowing our names."""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ConfigError",
    "DriverError",
    "OperatorError",
    "RefusedError",
    "StoreError",
]


class AgentError(Exception):
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


class OperatorError(AgentError, ValueError):
    """An operator command refused its input or the state it found (a certificate for another
    key, a wipe while the agent runs ...). The command line prints the message alone; any
    other exception is a programming error and keeps its traceback."""


class StoreError(AgentError, OSError):
    """The outbox cannot be opened or written."""


class DriverError(AgentError):
    """Base of the errors a driver raises."""


class RefusedError(AgentError, RuntimeError):
    """The outbox refused a reading (quota reached for that priority). The caller counts it.

    `retry_after` is a hint in seconds (CoAP ingest turns it into Max-Age on a 5.03).
    """

    def __init__(self, message: str, *, priority: int, retry_after: float = 30.0) -> None:
        super().__init__(message)
        self.priority = priority
        self.retry_after = retry_after
