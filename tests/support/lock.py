"""Reading the requirements locks (requirements.lock, tests/requirements.lock,
tests/compat/requirements.lock), for tests/test_lock.py and `make lock`.

    python -m tests.support.lock version NAME    the installed version of NAME (Makefile)
    python -m tests.support.lock pin NAME LOCK   NAME's line of LOCK, hashes included, as a
                                                 requirements file of its own (make wheelhouse)
    python -m tests.support.lock armv7l LOCK     which locked packages have no armv7l wheel
                                                 for CPython 3.11 (asks PyPI; make lock)
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.lock"  # the product: what a gateway installs
SIM_LOCK = ROOT / "hardware-sim" / "requirements.lock"  # the product and the simulator
TEST_LOCK = ROOT / "tests" / "requirements.lock"
COMPAT_LOCK = ROOT / "tests" / "compat" / "requirements.lock"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Pin:
    name: str  # normalised (PEP 503)
    version: str
    hashes: tuple[str, ...]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, Pin]:
    """Every `name==version` of a pip requirements file with its `--hash` options."""
    pins: dict[str, Pin] = {}
    name = version = None
    hashes: list[str] = []

    def flush() -> None:
        if name is not None and version is not None:
            pins[normalise(name)] = Pin(normalise(name), version, tuple(hashes))

    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            flush()
            name, version, hashes = m.group(1), m.group(2), []
        hashes.extend(_HASH.findall(line))
    flush()
    return pins


ARMV7L_PLATFORMS = ["linux_armv7l", "manylinux2014_armv7l",
                    *(f"manylinux_2_{v}_armv7l" for v in (17, 28, 31, 34, 35, 36))]


def without_armv7l_wheel(lock: Path) -> list[str]:
    """The locked packages pip finds no CPython 3.11 armv7l wheel for (downloads the rest)."""
    missing = []
    with tempfile.TemporaryDirectory() as tmp:
        for pin in read_lock(lock).values():
            plats = [a for p in ARMV7L_PLATFORMS for a in ("--platform", p)]
            r = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--only-binary=:all:", *plats, "--python-version", "3.11",
                 "--implementation", "cp", "-d", tmp, f"{pin.name}=={pin.version}"],
                capture_output=True, text=True, check=False, timeout=300)
            if r.returncode != 0:
                missing.append(f"{pin.name}=={pin.version}")
    return missing


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "version":
        from importlib.metadata import version

        print(version(argv[1]))
        return 0
    if len(argv) == 3 and argv[0] == "pin":
        pin = read_lock(Path(argv[2]))[normalise(argv[1])]
        print(f"{pin.name}=={pin.version} " + " ".join(f"--hash=sha256:{h}" for h in pin.hashes))
        return 0
    if len(argv) == 2 and argv[0] == "armv7l":
        missing = without_armv7l_wheel(Path(argv[1]))
        print("armv7l (CPython 3.11): "
              + (f"no wheel for {', '.join(missing)}" if missing else "a wheel for every package"))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
