"""The layering of shared/DESIGN.md holds: agent/core imports nothing above it, drivers/ see the
agent only through agent/core, and the product (agent/, drivers/) never imports the simulator,
which is a distribution of its own on top of it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules(path: Path) -> set[str]:
    """The dotted names of the modules a file imports (absolute imports)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def imports(path: Path) -> set[str]:
    """The top-level packages a file imports."""
    return {m.split(".")[0] for m in modules(path)}


def _outside_core(path: Path) -> list[str]:
    return sorted(m for m in modules(path)
                  if m.split(".")[0] in {"agent", "drivers", "branchsim", "tests"}
                  and not (m == "agent.core" or m.startswith("agent.core.")))


def test_core_imports_nothing_above_it() -> None:
    """agent/core is the vocabulary: it imports nothing from agent/, drivers/ or the simulator."""
    bad = {str(p.relative_to(ROOT)): _outside_core(p) for p in (ROOT / "agent/core").rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_drivers_see_the_agent_only_through_its_core() -> None:
    """drivers/ import agent/core and nothing else of the agent, and never the simulator."""
    bad = {str(p.relative_to(ROOT)): [m for m in _outside_core(p) if not m.startswith("drivers")]
           for p in (ROOT / "drivers").rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_rules_are_pure() -> None:
    """agent/rules (arming, stateful rules) import only agent/core: they are unit-tested with
    plain numbers, and the runtime feeds them time and events."""
    bad = {str(p.relative_to(ROOT)): [m for m in _outside_core(p)
                                      if not m.startswith("agent.rules")]
           for p in (ROOT / "agent/rules").rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_product_never_imports_the_simulator() -> None:
    """No module of agent/ or drivers/ imports branchsim, not even lazily: the simulator's
    distribution depends on the product, and adds `branch-agent demo` through an entry point."""
    bad = [str(p.relative_to(ROOT)) for top in ("agent", "drivers")
           for p in (ROOT / top).rglob("*.py") if "branchsim" in imports(p)]
    assert bad == []


def test_nothing_imports_the_tests() -> None:
    """Product code never imports test code."""
    for top in ("agent", "drivers", "hardware-sim"):
        for p in (ROOT / top).rglob("*.py"):
            assert "tests" not in imports(p), p


def test_loading_a_config_imports_no_driver_stack() -> None:
    """`load_config` (and the runtime module) import no radio, CoAP, Modbus or GPIO library:
    a driver's stack is imported only when that driver is configured (memory, start-up)."""
    code = ("import sys; import agent.config, agent.runtime.root; "
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip().split(",")
    heavy = {"gpiozero", "bleak", "dbus_fast", "aiocoap", "pymodbus", "serial", "bthome_ble",
             "ruuvitag_ble", "pysnmp", "pyasn1"}
    assert sorted(heavy & set(out)) == []


# What the operator commands that must start fast may not import (DESIGN.md, "Layering").
# rich is not listed yet: structlog imports it whenever it is installed, and the product still
# renders `status` and `doctor` with it (see the closing note of issue 14).
HEAVY = {"paho", "cryptography", "prometheus_client"}
_RUN_AND_LIST = (
    "import json, sys\n"
    "from agent.ops import cli\n"
    "try:\n"
    "    cli.main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
)


@pytest.mark.parametrize("argv", [
    ["check-config", "{example}"],
    ["status", "--config", "{example}", "--json"],
    ["audit", "verify", "--config", "{example}"],
    ["config", "show", "--config", "{example}"],
], ids=lambda a: " ".join(a[:2]))
def test_operator_commands_import_no_heavy_module(argv: list[str], tmp_path: Path) -> None:
    """check-config, status, audit verify and config show load the config and import neither
    paho nor cryptography nor prometheus_client (start-up time and memory on a Pi)."""
    example = str(ROOT / "config" / "example.toml")
    r = subprocess.run([sys.executable, "-c", _RUN_AND_LIST,
                        *(a.format(example=example) for a in argv)],
                       capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    loaded = set(json.loads(r.stderr.strip().splitlines()[-1]))
    assert "agent" in loaded and "pydantic" in loaded  # it did load the config
    assert sorted(HEAVY & loaded) == []


def test_loading_a_config_imports_no_heavy_module() -> None:
    """`import agent.config` alone pulls in no heavy module either."""
    code = ("import sys; import agent.config; "
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip().split(",")
    assert sorted(HEAVY & set(out)) == []


# Who may import whom (shared/DESIGN.md, "Layering"), as prefixes of dotted module names. A
# module of the left-hand part imports, of the project, only what its row allows (and itself).
ALLOWED = {
    "agent.core": ("agent.core",),
    "agent.protocol": ("agent.core", "agent.protocol"),
    "drivers": ("agent.core", "drivers"),
    "agent.outbox": ("agent.core", "agent.protocol", "agent.outbox"),
    "agent.uplink": ("agent.core", "agent.protocol", "agent.uplink"),
}
PROJECT = ("agent", "drivers", "branchsim", "tests")


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_is_below_it(layer: str) -> None:
    """agent/core imports nothing above it, the protocol only the core, drivers only the core,
    the outbox and the uplinks only the core and the protocol (an uplink moves bytes and knows
    no outbox)."""
    top = ROOT / Path(*layer.split("."))
    files = list(top.rglob("*.py")) if top.is_dir() else [top.with_suffix(".py")]
    assert files
    bad = {}
    for f in files:
        outside = sorted(m for m in modules(f) if m.split(".")[0] in PROJECT
                         and m != "agent" and not m.startswith(ALLOWED[layer]))
        if outside:
            bad[_module_of(f)] = outside
    assert bad == {}


def test_nothing_but_the_operator_commands_imports_them() -> None:
    """agent/ops is the top: no module of the product outside it imports it."""
    bad = [str(p.relative_to(ROOT)) for top in ("agent", "drivers")
           for p in (ROOT / top).rglob("*.py") if not p.is_relative_to(ROOT / "agent" / "ops")
           and any(m.startswith("agent.ops") for m in modules(p))]
    assert bad == []
