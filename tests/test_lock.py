"""What is tested is what is locked: requirements.lock satisfies the product's pyproject.toml
exactly and hardware-sim/requirements.lock the product's and the simulator's (no missing and no
stray package), every pin carries hashes, the two agree, no test tool moves a runtime package,
and the environment the tests run in holds exactly the locked versions."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.support.lock import (
    COMPAT_LOCK,
    ROOT,
    RUNTIME_LOCK,
    SIM_LOCK,
    TEST_LOCK,
    Pin,
    normalise,
    read_lock,
)

RUNTIME = read_lock(RUNTIME_LOCK)
SIM = read_lock(SIM_LOCK)
# The gateway's environment: CPython 3.11 on Linux (x86_64 here; aarch64 resolves the same,
# which `make lock` checks).
TARGET = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux",
          "os_name": "posix", "python_version": "3.11", "implementation_name": "cpython"}


OURS = {"branch-gateway-agent", "branch-gateway-sim"}


def project_requirements(*pyprojects: Path) -> list[Requirement]:
    """The dependencies of the given distributions, without the simulator's on the product."""
    reqs = []
    for pyproject in pyprojects:
        doc = tomllib.loads(pyproject.read_text())
        reqs += [r for r in map(Requirement, doc["project"]["dependencies"])
                 if normalise(r.name) not in OURS]
    return reqs


PRODUCT = ROOT / "pyproject.toml"
SIMULATOR = ROOT / "hardware-sim" / "pyproject.toml"


def closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the roots need on the target, following the installed metadata
    (the environment was installed from the lock, which test_environment_is_the_lock checks)."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in roots]
    while todo:
        req, extras = todo.pop()
        name = normalise(req.name)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for raw in distribution(name).requires or []:
            sub = Requirement(raw)
            envs = [{**TARGET, "extra": e} for e in (extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, frozenset(sub.extras)))
    return {k.split("[")[0] for k in seen}


def test_every_pin_has_hashes() -> None:
    """Each lock pins name==version with at least one sha256 (pip --require-hashes needs it)."""
    for lock in (RUNTIME_LOCK, SIM_LOCK, TEST_LOCK, COMPAT_LOCK):
        pins = read_lock(lock)
        assert pins, lock
        assert [p.name for p in pins.values() if not p.hashes] == [], lock


@pytest.mark.parametrize(("lock", "pyprojects"), [
    (RUNTIME, (PRODUCT,)), (SIM, (PRODUCT, SIMULATOR))], ids=["product", "simulator"])
def test_lock_satisfies_pyproject_exactly(lock: dict[str, Pin], pyprojects: tuple[Path, ...]
                                          ) -> None:
    """Each dependency is locked at a version its specifier admits, and the lock holds exactly
    the closure of those dependencies: a dependency added to, removed from or narrowed in a
    pyproject.toml without `make lock` fails here. The product's lock has nothing of the
    simulator's (rich is not on a gateway)."""
    reqs = project_requirements(*pyprojects)
    outside = {r.name: lock[normalise(r.name)].version for r in reqs
               if normalise(r.name) in lock
               and lock[normalise(r.name)].version not in r.specifier}
    assert outside == {}, "pinned outside pyproject.toml's range: run make lock"
    assert sorted(normalise(r.name) for r in reqs if normalise(r.name) not in lock) == []
    needed = closure(reqs)
    assert sorted(needed - lock.keys()) == [], "needed but not locked: run make lock"
    assert sorted(lock.keys() - needed) == [], "locked but not needed: run make lock"


def test_the_simulators_lock_extends_the_products() -> None:
    """Every package of the product's lock is in the simulator's at the same version and with
    the same hashes: a developer's machine runs what a gateway runs."""
    assert {n: (p.version, p.hashes) for n, p in RUNTIME.items()} == {
        n: (SIM[n].version, SIM[n].hashes) for n in RUNTIME if n in SIM}
    assert RUNTIME.keys() <= SIM.keys() and "rich" in SIM and "rich" not in RUNTIME


def test_environment_is_the_lock() -> None:
    """Every runtime package in this environment (product and simulator) has exactly its
    locked version."""
    got = {}
    for pin in SIM.values():
        try:
            got[pin.name] = version(pin.name)
        except PackageNotFoundError:
            got[pin.name] = "missing"
    assert {n: v for n, v in got.items() if v != SIM[n].version} == {}


@pytest.mark.parametrize("lock", [TEST_LOCK, COMPAT_LOCK], ids=["test", "compat"])
def test_test_tools_do_not_move_runtime_packages(lock: Path) -> None:
    """The test tools' lock agrees with the runtime lock on every package they share. The
    compat environment differs in cbor2 alone (5.x, for cwt), on purpose."""
    allowed = {"cbor2"} if lock == COMPAT_LOCK else set()
    other = read_lock(lock)
    moved = {n: (SIM[n].version, p.version) for n, p in other.items()
             if n in SIM and p.version != SIM[n].version and n not in allowed}
    assert moved == {}
    if lock == COMPAT_LOCK:
        assert other["cbor2"].version.startswith("5.")
        assert SIM["cbor2"].version.startswith("6.")


def test_a_version_changed_without_its_hashes_is_refused(tmp_path: Path) -> None:
    """A lock edited by hand (another version, the old hashes) is refused by pip: the install
    that `make test` and the runbook do fails. Asks the package index, as any install does."""
    pin = RUNTIME["tomli-w"]
    other = "1.1.0" if pin.version != "1.1.0" else "1.0.0"
    lock = tmp_path / "edited.lock"
    lock.write_text(f"tomli-w=={other} " + " ".join(f"--hash=sha256:{h}" for h in pin.hashes)
                    + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                        "--no-input", "-d", str(tmp_path / "dl"), "-r", str(lock)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0
    assert re.search(r"(?i)do not match the hashes", r.stdout + r.stderr), r.stdout + r.stderr


def test_the_simulator_requires_this_very_product() -> None:
    """hardware-sim/pyproject.toml pins the product at the version pyproject.toml declares
    (and agent.__version__ says): the two distributions are released together."""
    from agent import __version__

    product = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    sim = tomllib.loads((ROOT / "hardware-sim" / "pyproject.toml").read_text())["project"]
    [pin] = [Requirement(r) for r in sim["dependencies"]
             if normalise(Requirement(r).name) == "branch-gateway-agent"]
    assert str(pin.specifier) == f"=={product}" and __version__ == product
    assert sim["version"] == product
