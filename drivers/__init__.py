"""Sensor drivers: GPIO, BLE, serial devices and CoAP ingest. Imports nothing from `agent`."""

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
