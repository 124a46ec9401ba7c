"""The shipped unit, sysusers and tmpfiles files, checked with systemd's own tools."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "branch-agent.service"
SYSUSERS = ROOT / "systemd" / "sysusers.d" / "branch-agent.conf"
TMPFILES = ROOT / "systemd" / "tmpfiles.d" / "branch-agent.conf"
EXEC = "/opt/branch-agent/bin/branch-agent"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (make sysdeps)"
)


def _unit_with_exec(tmp_path: Path) -> Path:
    """The unit with ExecStart/ExecStartPre pointing at an executable that exists here."""
    exe = tmp_path / "branch-agent"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / "branch-agent.service"
    unit.write_text(UNIT.read_text().replace(EXEC, str(exe)))
    return unit


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single warning."""
    res = _run("systemd-analyze", "verify", str(_unit_with_exec(tmp_path)))
    assert res.returncode == 0, res.stderr
    own = [ln for ln in res.stderr.splitlines() if "branch-agent.service" in ln]
    assert own == [], own


def _exposure(unit: Path) -> tuple[float, str]:
    res = _run("systemd-analyze", "security", "--offline=true", "--no-pager", str(unit))
    m = re.search(r"Overall exposure level for branch-agent\.service: (\d+\.\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    return float(m.group(1)), res.stdout


def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit's exposure at 2.0 or less."""
    exposure, out = _exposure(_unit_with_exec(tmp_path))
    assert exposure <= MAX_EXPOSURE, out
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert f"exposure level {exposure}" in doc, "docs/OPERATIONS.md must state the current figure"


def test_unit_has_the_service_contract() -> None:
    """The unit is Type=notify with a watchdog, restarts always, runs as its own user and is
    bounded in memory, tasks and open files."""
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=always", "User=branch-agent",
                 "SupplementaryGroups=gpio dialout bluetooth", "StateDirectory=branch-agent",
                 "ConfigurationDirectory=branch-agent", "CapabilityBoundingSet=\n",
                 "DevicePolicy=closed", "UMask=0077", "NoNewPrivileges=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_BLUETOOTH AF_NETLINK",
                 "SystemCallFilter=@system-service", "StartLimitBurst=", "MemoryMax=256M",
                 "TasksMax=64\n", "LimitNOFILE=1024\n"):
        assert line in text, line


def test_sysusers_and_tmpfiles_apply_to_an_image_root(tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles with --root create the user, groups and dirs."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for src, sub in ((SYSUSERS, "sysusers.d"), (TMPFILES, "tmpfiles.d")):
        dest = root / "usr" / "lib" / sub
        dest.mkdir(parents=True)
        shutil.copy(src, dest / src.name)
    res = _run("systemd-sysusers", f"--root={root}")
    assert res.returncode == 0, res.stderr
    passwd = (root / "etc" / "passwd").read_text()
    group = (root / "etc" / "group").read_text()
    assert re.search(r"^branch-agent:x:\d+:\d+:.*:/usr/sbin/nologin$", passwd, re.M), passwd
    for g in ("gpio", "dialout", "bluetooth"):
        assert re.search(rf"^{g}:x:\d+:branch-agent$", group, re.M), group
    # what `provision --root` leaves: the image's audit log, written as root
    audit = root / "var" / "lib" / "branch-agent" / "audit"
    audit.mkdir(parents=True, mode=0o750)
    (audit / "audit.log").write_text("{}\n")
    (audit / "audit.log").chmod(0o640)
    res = _run("systemd-tmpfiles", f"--root={root}", "--create")
    assert res.returncode == 0, res.stderr
    state = root / "var" / "lib" / "branch-agent"
    assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700
    assert (root / "etc" / "branch-agent" / "keys").stat().st_mode & 0o007 == 0
    uid = int(re.search(r"^branch-agent:x:(\d+):", passwd, re.M).group(1))  # type: ignore[union-attr]
    for p in (audit, audit / "audit.log"):  # the agent can write the log from the first boot
        assert (p.stat().st_uid, p.stat().st_mode & 0o777) == (
            uid, 0o750 if p.is_dir() else 0o640), p


def test_provisioned_unit_with_egress_dropin_verifies(tmp_path: Path) -> None:
    """The unit as provisioned, with its generated egress drop-in (IPAddressDeny=any plus the
    broker), passes `systemd-analyze verify`, and its exposure is lower than the bare unit's
    and is the figure docs/OPERATIONS.md states for it."""
    root = tmp_path / "root"
    res = subprocess.run(
        [sys.executable, "-m", "agent.ops.cli", "provision", "--root", str(root), "--gateway-id",
         "gw1", "--broker", "192.0.2.10:8883", "--non-interactive", "--no-qr"],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    dropin = (root / "etc/systemd/system/branch-agent.service.d/10-egress.conf").read_text()
    assert "IPAddressDeny=any" in dropin and "IPAddressAllow=192.0.2.10" in dropin
    unit = _unit_with_exec(tmp_path)
    # A drop-in's [Service] lines apply as if appended to the unit: analyse them together.
    unit.write_text(unit.read_text() + "\n" + dropin)
    verified = _run("systemd-analyze", "verify", str(unit))
    assert verified.returncode == 0, verified.stderr
    assert [ln for ln in verified.stderr.splitlines() if "branch-agent.service" in ln] == []
    exposure, out = _exposure(unit)
    (tmp_path / "bare").mkdir()
    bare, _ = _exposure(_unit_with_exec(tmp_path / "bare"))
    assert exposure <= MAX_EXPOSURE and exposure < bare, out
    assert "Service defines IP address allow list" in out, out
    doc = (Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md").read_text()
    assert f"With the drop-in the\nexposure is **{exposure}**" in doc, (
        f"docs/OPERATIONS.md must state the exposure with the egress drop-in ({exposure})")
