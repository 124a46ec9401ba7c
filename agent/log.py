"""structlog set-up: JSON lines under systemd (or any non-TTY), pretty console in a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """fmt: auto (console on a TTY, JSON otherwise), json, console."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    # Libraries log through the standard library. bleak at DEBUG logs every D-Bus signal, with
    # the addresses of customers' phones: keep BLE and D-Bus internals at WARNING whatever our
    # own level is (privacy by default, docs/BLE.md).
    logging.basicConfig(level=logging.WARNING, stream=stream,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("bleak", "dbus_fast", "aiocoap", "pymodbus", "paho"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
