"""The branch gateway agent: sensors to a durable outbox to signed batches for the platform."""

__version__ = "0.1.0"

__all__ = ["__version__"]
