"""The built artefacts and the clean environments `make test-dist` installed them into: venvs
holding exactly the locked runtime packages (pip --require-hashes) and the product's wheel
(--no-deps), alone (`installed`) or with the simulator's wheel on top (`installed_sim`). Every
command here runs the installed copy from a directory outside the checkout, with no PYTHONPATH,
so nothing can come from the source tree."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Installed:
    venv: Path
    dist: Path  # the sdist and the wheel
    cwd: Path  # outside the checkout

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
        return subprocess.run([self.bin(argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=self.cwd, env=env,
                              stdin=subprocess.DEVNULL)


def _installed(variable: str, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    venv, dist = os.environ.get(variable), os.environ.get("BRANCH_DIST_DIR")
    if not venv or not dist:
        pytest.skip("runs against the built wheels: `make test-dist` (part of `make test`)")
    return Installed(Path(venv), Path(dist), tmp_path_factory.mktemp("outside"))


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The product alone, as on a gateway."""
    return _installed("BRANCH_DIST_VENV", tmp_path_factory)


@pytest.fixture(scope="session")
def installed_sim(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The product with the simulator's distribution on top, as on a developer's machine."""
    return _installed("BRANCH_DIST_SIM_VENV", tmp_path_factory)
