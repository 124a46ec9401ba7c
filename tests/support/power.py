"""Fixtures for tests on the power-cut file system (branchsim.powerfs): `power`, a mounted
supply under the test's tmp_path (skipped where FUSE is unavailable), and `children`, the
processes a test starts there, stopped before the mount is (they may hold files on it)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchsim.powerfs import PowerSupply, fuse_unavailable

__all__ = ["children", "power"]


@pytest.fixture
def power(tmp_path: Path) -> Iterator[PowerSupply]:
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(f"power-cut fs: {reason}")
    with PowerSupply(tmp_path / "mnt") as supply:
        yield supply


@pytest.fixture
def children(power: PowerSupply) -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; stopped before the mount is (they may hold files there)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
