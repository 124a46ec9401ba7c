"""Shared fixtures. Real parts only: real SQLite files, real processes, real brokers."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; every one still running is killed and reaped when it ends."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


# The WAN end (a plain mosquitto and the reference platform on it) for any test that asks for
# `broker` / `platform`; modules that need TLS or another shape define their own.
from tests.support.wan import broker, platform  # noqa: E402, F401 - fixtures, by name
