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


# The WAN end for any test that asks for it: a mosquitto (`mosquitto`, `mosquitto_factory`,
# `free_port`), the reference platform on it (`broker` / `platform`), or both with mutual TLS
# (`pki`, `mosquitto_tls`, `tls_platform`). The power-cut file system: `power`, `children`.
pytest_plugins = ["tests.support.broker", "tests.support.postgres", "tests.support.wan",
                  "tests.support.power"]
