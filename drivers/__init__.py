"""Sensor drivers: GPIO, BLE, serial devices and CoAP ingest. Of the agent they import only
`agent.core` (tests/test_layering.py)."""

from drivers.base import (
    ALARM,
    ALERT,
    DIAGNOSTIC,
    TELEMETRY,
    Backoff,
    Clock,
    Reading,
    RefusedError,
    Sink,
    Source,
    SourceContext,
    SourceHealth,
    SourceState,
    SystemClock,
)

__all__ = [
    "ALARM",
    "ALERT",
    "DIAGNOSTIC",
    "TELEMETRY",
    "Backoff",
    "Clock",
    "Reading",
    "RefusedError",
    "Sink",
    "Source",
    "SourceContext",
    "SourceHealth",
    "SourceState",
    "SystemClock",
]
