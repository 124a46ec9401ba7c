"""Logs are one format: with JSON configured, the agent's own events and the libraries'
standard-library records (aiocoap, paho, bleak …) are all JSON lines, tracebacks included."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import logging, structlog
from agent.core.log import configure_logging
configure_logging("info", "json")
structlog.get_logger("agent.test").info("agent.event", n=1)
logging.getLogger("aiocoap").warning("library said %s", "this")
logging.getLogger("bleak").info("hidden: BLE internals stay at WARNING")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("paho").exception("library failed")
"""


def test_library_records_are_json_lines_too() -> None:
    """Every line on stderr parses as JSON, with level, logger and timestamp; the BLE stack's
    INFO is held back; a library's traceback stays inside its JSON line."""
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60,
                       check=True)
    lines = [json.loads(line) for line in r.stderr.splitlines()]
    assert [d["event"] for d in lines] == ["agent.event", "library said this", "library failed"]
    lib = lines[1]
    assert (lib["level"], lib["logger"]) == ("warning", "aiocoap") and "timestamp" in lib
    assert "ZeroDivisionError" in lines[2]["exception"]
