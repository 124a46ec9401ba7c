"""End to end against what users install: the wheel built from the sdist, installed without
its dependencies into a venv that holds exactly the locked runtime packages (`make test-dist`).
Run from a directory outside the checkout, with no PYTHONPATH."""

from __future__ import annotations

import json
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from agent import __version__
from tests.dist.conftest import Installed
from tests.support.broker import Mosquitto
from tests.support.lock import ROOT, RUNTIME_LOCK, SIM_LOCK, normalise, read_lock
from tests.support.pki import Pki, issue

# What the commands read at run time besides Python modules: the systemd units (provision) and
# the documented example config in the product; the scenarios (branch-sim, the demo) in the sim.
PRODUCT = {"agent": ROOT / "agent", "drivers": ROOT / "drivers"}
SIM = {"branchsim": ROOT / "hardware-sim" / "branchsim"}
DATA = {"share/branch-agent/systemd/branch-agent.service": "systemd/branch-agent.service",
        "share/branch-agent/systemd/sysusers.d/branch-agent.conf":
            "systemd/sysusers.d/branch-agent.conf",
        "share/branch-agent/systemd/tmpfiles.d/branch-agent.conf":
            "systemd/tmpfiles.d/branch-agent.conf",
        "share/branch-agent/config/example.toml": "config/example.toml"}
SCENARIOS = sorted(p.stem for p in (SIM["branchsim"] / "scenarios").glob("*.toml"))


def source_files(packages: dict[str, Path]) -> set[str]:
    """Every module, marker and scenario of the packages, as wheel paths."""
    out = set()
    for pkg, src in packages.items():
        for p in src.rglob("*"):
            if p.suffix in {".py", ".toml", ".typed"} and "__pycache__" not in p.parts:
                out.add(f"{pkg}/{p.relative_to(src)}")
    return out


def wheel(installed: Installed, dist: str) -> zipfile.ZipFile:
    [whl] = installed.dist.glob(f"{dist}-*.whl")
    return zipfile.ZipFile(whl)


def test_product_wheel_holds_the_product_and_what_its_commands_read(
        installed: Installed) -> None:
    """The product's wheel lists every module of agent/ and drivers/, their py.typed, the units
    and the example config as data files, and nothing of the simulator or the tests."""
    whl = wheel(installed, "branch_gateway_agent")
    names = set(whl.namelist())
    assert sorted(source_files(PRODUCT) - names) == []
    [data] = {n.split("/")[0] for n in names if ".data/" in n}
    for inside, src in DATA.items():
        member = f"{data}/data/{inside}"
        assert member in names, member
        assert whl.read(member) == (ROOT / src).read_bytes(), member
    assert [n for n in names if n.split("/")[0] in {"branchsim", "tests"}] == []


def test_sim_wheel_holds_the_simulator_its_scenarios_and_the_demo_command(
        installed: Installed) -> None:
    """The simulator's wheel lists every module of branchsim and each scenario, depends on the
    product's exact version, and declares `demo` for `branch-agent`."""
    whl = wheel(installed, "branch_gateway_sim")
    names = set(whl.namelist())
    assert sorted(source_files(SIM) - names) == []
    assert len(SCENARIOS) >= 4
    assert [n for n in names if n.split("/")[0] in {"agent", "drivers", "tests"}] == []
    [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert f"Requires-Dist: branch-gateway-agent=={__version__}" in whl.read(meta).decode()
    [eps] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "[branch_agent.commands]\ndemo = branchsim.demo:register" in whl.read(eps).decode()


def test_sdists_hold_the_sources_the_wheels_were_built_from(installed: Installed) -> None:
    """Each sdist (which `make dist` builds its wheel from) has the sources, the data files,
    pyproject.toml and README."""
    for dist, wanted in (
            ("branch_gateway_agent", source_files(PRODUCT) | set(DATA.values())),
            ("branch_gateway_sim", source_files(SIM))):
        [sdist] = installed.dist.glob(f"{dist}-*.tar.gz")
        with tarfile.open(sdist) as tar:
            names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        assert sorted((wanted | {"pyproject.toml", "README.md"}) - names) == [], dist


def test_installed_copy_is_not_the_checkout(installed: Installed,
                                            installed_sim: Installed) -> None:
    """The product imports from the venv's site-packages and has no simulator; the venvs'
    runtime packages are exactly the lock's, nothing more."""
    r = installed.run("python", "-c", "import agent, drivers; print(agent.__file__, "
                      "drivers.__file__); import branchsim")
    assert "No module named 'branchsim'" in r.stderr, r.stderr
    for path in r.stdout.split():
        assert path.startswith(str(installed.venv)) and "site-packages" in path, path
    for venv, lock, ours in (
            (installed, RUNTIME_LOCK, {"branch-gateway-agent"}),
            (installed_sim, SIM_LOCK, {"branch-gateway-agent", "branch-gateway-sim"})):
        listing = venv.run("python", "-m", "pip", "list", "--format=json")
        got = {normalise(d["name"]): d["version"] for d in json.loads(listing.stdout)}
        assert {n: got.pop(n) for n in ours} == dict.fromkeys(ours, __version__)
        assert got == {n: p.version for n, p in read_lock(lock).items()}, lock
    assert "rich" not in {normalise(n) for n in read_lock(RUNTIME_LOCK)}


LIST_MODULES = ("import json, sys\n"
                "from agent.ops import cli\n"
                "try:\n"
                "    cli.main(sys.argv[1:])\n"
                "except SystemExit:\n"
                "    pass\n"
                "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), "
                "file=sys.stderr)\n")


@pytest.mark.parametrize("argv", [["check-config"], ["status", "--json"],
                                  ["audit", "verify"], ["config", "show"]],
                         ids=lambda a: " ".join(a))
def test_fast_operator_commands_import_nothing_heavy(installed: Installed, argv: list[str]
                                                     ) -> None:
    """On a gateway (the product alone), check-config, status, audit verify and config show
    import neither paho, cryptography, prometheus_client nor rich (which is not even installed
    there: structlog would load it, with pygments, into every process)."""
    example = str(ROOT / "config" / "example.toml")
    args = [*argv, example] if argv == ["check-config"] else [*argv, "--config", example]
    r = installed.run("python", "-c", LIST_MODULES, *args)
    loaded = set(json.loads(r.stderr.strip().splitlines()[-1]))
    assert {"agent", "pydantic", "structlog"} <= loaded, r.stderr[-2000:]
    assert sorted(loaded & {"paho", "cryptography", "prometheus_client", "rich"}) == []
    assert installed.run("python", "-c", "import rich").returncode != 0


def test_product_alone_has_no_demo(installed: Installed) -> None:
    """Without the simulator, `branch-agent demo` is not a command (argparse names the ones
    there are), and `branch-sim` is not installed."""
    r = installed.run("branch-agent", "demo")
    assert r.returncode == 2 and "invalid choice: 'demo'" in r.stderr, r.stderr
    assert not Path(installed.bin("branch-sim")).exists()


def test_branch_sim_lists_every_scenario(installed_sim: Installed) -> None:
    """`branch-sim list` from the installed copy names each shipped scenario."""
    r = installed_sim.run("branch-sim", "list")
    assert r.returncode == 0, r.stderr
    listed = sorted(line.split()[0] for line in r.stdout.splitlines() if line.strip())
    assert listed == SCENARIOS


@pytest.mark.parametrize("transport", ["mqtt", "coap"])
def test_demo_delivers_everything(installed_sim: Installed, tmp_path: Path,
                                  transport: str) -> None:
    """The installed demo (`branch-agent demo`, which the simulator's wheel adds), headless,
    over MQTT (mutual TLS) and over CoAP (OSCORE), with the uplink cut halfway: every produced
    event delivered and verified, LOST 0, exit 0."""
    r = installed_sim.run("branch-agent", "demo", "--headless", "--duration", "20", "--transport",
                      transport, "--workdir", str(tmp_path / "demo"), timeout=200)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "LOST: 0" in out and "uplink CUT" in out and "uplink restored" in out
    row = {k: summary(out, k) for k in ("transport", "events produced (accepted)",
                                         "delivered to the platform", "batches rejected")}
    assert row["transport"] == transport, row
    produced, delivered = int(row["events produced (accepted)"]), int(row["delivered to the platform"])
    assert produced > 100 and delivered == produced and row["batches rejected"] == "0", row


def summary(out: str, figure: str) -> str:
    """A value of the demo's summary table (`figure │ value`)."""
    m = re.search(re.escape(figure) + r"\s*│\s*(\S+)", out)
    assert m, f"no {figure!r} in the summary"
    return m[1]


def test_provision_then_doctor(installed: Installed, tmp_path: Path, pki: Pki,
                               mosquitto_tls: Mosquitto) -> None:
    """An installer's path with the installed copy: provision a scratch root (keys, CSR,
    config, unit, snippets, manifest); the bank's CA signs the CSR and `provision
    --install-cert` installs it; then `check-config` and `doctor` (every check, the file
    manifest included, against a real mutual-TLS broker) pass."""
    root = tmp_path / "root"
    r = installed.run("branch-agent", "provision", "--root", str(root), "--gateway-id",
                      "branch-0042", "--broker", f"127.0.0.1:{mosquitto_tls.port}",
                      "--non-interactive", "--no-qr", "--exec-path", installed.bin("branch-agent"))
    assert r.returncode == 0, r.stdout + r.stderr
    unit = root / "etc/systemd/system/branch-agent.service"
    exec_path = installed.bin("branch-agent").encode()
    assert b"ExecStart=" + exec_path + b" run" in unit.read_bytes()
    assert unit.read_bytes().replace(exec_path, b"X") == (ROOT / "systemd/branch-agent.service"
        ).read_bytes().replace(b"/opt/branch-agent/bin/branch-agent", b"X")
    for snippet in ("sysusers.d/branch-agent.conf", "tmpfiles.d/branch-agent.conf"):
        assert (root / "usr/lib" / snippet).read_bytes() == (ROOT / "systemd" / snippet).read_bytes()
    # The config names the gateway's own paths; seen from here they are under the scratch root.
    # This machine's clock is not NTP-synchronised (a container): say it is, as the other
    # doctor tests do, so that "clock" is judged like every other check.
    etc = root / "etc/branch-agent"
    cfg = etc / "agent.toml"
    text = cfg.read_text()
    assert 'time_sync = "auto"' in text
    cfg.write_text(text.replace('"/etc/branch-agent', f'"{etc}')
                   .replace('"/var/lib/branch-agent', f'"{root}/var/lib/branch-agent')
                   .replace('time_sync = "auto"', 'time_sync = "synced"'))
    (etc / "tls/ca.pem").write_bytes(pki.ca_cert.read_bytes())
    cert = issue(pki, etc / "tls/client.csr", tmp_path / "issued.pem")
    r = installed.run("branch-agent", "provision", "--install-cert", str(cert), "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    check = installed.run("branch-agent", "check-config", str(cfg))
    assert check.returncode == 0, check.stdout + check.stderr
    doc = installed.run("branch-agent", "doctor", "--config", str(cfg), "--json", "--timeout", "5",
                        "--manifest", str(root / "usr/lib/branch-agent/manifest.json"))
    checks = {c["name"]: c for c in json.loads(doc.stdout)["checks"]}
    assert doc.returncode == 0, doc.stdout + doc.stderr
    for name in ("config", "signing key", "state dir", "clock", "integrity", "mqtt certificate",
                 "mqtt broker", "mqtt tls handshake", "mqtt connect"):
        assert checks[name]["status"] == "pass", checks[name]


def test_doctor_reaches_the_ip_devices_with_the_locked_libraries(installed: Installed,
                                                                 tmp_path: Path) -> None:
    """The IP sources import their protocol libraries only when they talk to a device (pysnmp,
    pymodbus): the installed product's doctor, on exactly the locked packages, reaches a real
    upsd, snmpd and Modbus TCP server, and fails a device nothing answers for."""
    import tomli_w

    from branchsim.modbustcp import ModbusTcpDevice
    from branchsim.nutserver import NutServer, find_nut
    from branchsim.snmpagent import SnmpAgentSim, find_snmpd
    from tests.support.broker import get_free_port
    from tests.support.offline import offline_gateway

    if find_nut() is None or find_snmpd() is None:
        pytest.skip("nut-server and snmpd are not installed (make sysdeps)")
    with NutServer(tmp_path / "nut") as nut, SnmpAgentSim(tmp_path / "snmp") as snmp:
        meter = ModbusTcpDevice("meter").start()
        try:
            dead = {**meter.agent_config(), "name": "dead", "port": get_free_port()}
            doc = offline_gateway(tmp_path / "gw", "gw-dist", sources={
                "nut": [nut.agent_config(name="ups")],
                "snmp": [{"name": "card", "profile": "ups-mib", **snmp.agent_config("3")}],
                "modbus_tcp": [meter.agent_config(), dead]})
            cfg = tmp_path / "agent.toml"
            cfg.write_text(tomli_w.dumps(doc))
            r = installed.run("branch-agent", "doctor", "--config", str(cfg), "--json",
                              "--timeout", "5")
        finally:
            meter.stop()
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    for name in ("nut ups", "snmp card", "modbus_tcp meter"):
        assert checks[name]["status"] == "pass", (checks[name], r.stderr[-2000:])
    assert checks["modbus_tcp dead"]["status"] == "fail", checks["modbus_tcp dead"]
