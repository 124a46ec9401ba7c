"""The layering of shared/DESIGN.md holds: drivers/ imports nothing from agent/ or branchsim/,
agent/ imports the simulator only where --sim and the demo start it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIM_ALLOWED = {"agent/simrun.py", "agent/demo.py", "agent/doctor.py"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_drivers_import_nothing_from_agent_or_the_simulator() -> None:
    """drivers/ is the ground floor."""
    bad = {str(p.relative_to(ROOT)): sorted(imports(p) & {"agent", "branchsim", "tests"})
           for p in (ROOT / "drivers").rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_agent_reaches_the_simulator_only_from_sim_and_demo() -> None:
    """The agent starts the simulator only for `run --sim` and `demo` (and doctor's self-test)."""
    bad = [str(p.relative_to(ROOT)) for p in (ROOT / "agent").rglob("*.py")
           if "branchsim" in imports(p) and str(p.relative_to(ROOT)) not in SIM_ALLOWED]
    assert bad == []


def test_nothing_imports_the_tests() -> None:
    """Product code never imports test code."""
    for top in ("agent", "drivers", "hardware-sim"):
        for p in (ROOT / top).rglob("*.py"):
            assert "tests" not in imports(p), p


def test_loading_a_config_imports_no_driver_stack() -> None:
    """`load_config` (and the runtime module) import no radio, CoAP, Modbus or GPIO library:
    a driver's stack is imported only when that driver is configured (memory, start-up)."""
    code = ("import sys; import agent.config, agent.runtime; "
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip().split(",")
    heavy = {"gpiozero", "bleak", "dbus_fast", "aiocoap", "pymodbus", "serial", "bthome_ble",
             "ruuvitag_ble"}
    assert sorted(heavy & set(out)) == []
