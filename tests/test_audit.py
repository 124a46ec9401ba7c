"""The audit trail: hash chain, tamper detection, rotation, concurrent writers, the audit
group, degraded mode."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gpiozero.pins.mock import MockFactory

from agent.config import parse_config
from agent.core.types import ALARM, ALERT
from agent.outbox import Outbox
from agent.protocol import kid_for, verify_batch
from agent.runtime.forwarder import Signer
from agent.security.audit import AuditLog, AuditWriteError, config_digest, verify
from tests.support.agentproc import until
from tests.test_audit_forward import stored
from tests.test_audit_runtime import TAMPER_PIN, WALL0, gateway_config, records, running


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.security.audit", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def filled(tmp_path: Path, n: int = 5, wall: Callable[[], float] | None = None) -> Path:
    log = AuditLog(tmp_path / "audit" / "audit.log", wall=wall)
    for i in range(n):
        log.append("audit.operator_command", {"cmd": "keygen", "i": i}, actor="alice(1000)")
    return log.path


def test_records_chain_and_permissions(tmp_path: Path) -> None:
    """Records are numbered, chained by hash, stamped with the wall clock the log was given
    (the system's by default), 0640 in a 0750 directory, and verify intact."""
    stamps = [WALL0 + 0.25 * i for i in range(5)]
    path = filled(tmp_path, wall=iter(stamps).__next__)
    before = time.time()
    AuditLog(path).append("audit.operator_command", {"cmd": "doctor"})
    after = time.time()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["n"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[0]["prev"] == "0" * 64
    assert all(b["prev"] == a["h"] for a, b in itertools.pairwise(lines))
    assert [r["t"] for r in lines[:5]] == stamps
    assert before <= lines[5]["t"] <= after
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    res = verify(path)
    assert (res.ok, res.records, res.last_h) == (True, 6, lines[-1]["h"])


def other_group() -> grp.struct_group | None:
    """A group the audit files can be given that they would not have anyway (not this
    process's own group): any other group for root, which may chown to any; for a user, a
    supplementary group it belongs to. None if there is none."""
    own = os.getegid()
    if os.geteuid() == 0:
        return next((g for g in grp.getgrall() if g.gr_gid != own), None)
    for gid in os.getgroups():
        with contextlib.suppress(KeyError):
            if gid != own:
                return grp.getgrgid(gid)
    return None


def test_log_and_directory_belong_to_the_audit_group(tmp_path: Path) -> None:
    """With `[audit] group` set, the directory, the log and every rotated file have that group
    (the admins who may read them) and keep modes 0750 / 0640."""
    group = other_group()
    if group is None:
        pytest.skip("this user belongs to no group but its own: a chown to the audit group "
                    "cannot be told apart from the default group")
    cfg = parse_config({
        "gateway": {"id": "gw", "state_dir": str(tmp_path / "state"),
                    "runtime_dir": str(tmp_path / "run"),
                    "key_file": str(tmp_path / "signing.key")},
        "uplink": {"order": ["mqtt"], "mqtt": {"host": "127.0.0.1", "insecure": True}},
        "audit": {"group": group.gr_name, "max_bytes": 4096, "keep": 2},
    })
    log = AuditLog.from_config(cfg.audit, cfg.gateway.state_dir)
    for i in range(60):
        log.append("audit.operator_command", {"cmd": "doctor", "i": i, "pad": "x" * 100})
    files = sorted(log.path.parent.iterdir())
    assert [p.name for p in files] == ["audit.log", "audit.log.1", "audit.log.2"]
    for p, mode in [(log.path.parent, 0o750)] + [(f, 0o640) for f in files]:
        st = p.stat()
        assert (p.name, st.st_gid, stat.S_IMODE(st.st_mode)) == (p.name, group.gr_gid, mode)
    assert verify(log.path).ok


def test_tampered_record_is_detected_by_cli(tmp_path: Path) -> None:
    """Editing one field of one record makes `audit verify` exit 1 naming that record."""
    path = filled(tmp_path)
    assert audit_cli("verify", "--file", str(path)).returncode == 0
    text = path.read_text().replace('"i": 2', '"i": 7')
    path.write_text(text)
    out = audit_cli("verify", "--file", str(path))
    assert out.returncode == 1
    assert "TAMPERED" in out.stdout and "n=3 was altered" in out.stdout


def test_removed_record_breaks_the_chain(tmp_path: Path) -> None:
    """Deleting a whole record (hashes intact) is found as a broken chain."""
    path = filled(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + lines[3:]))
    res = verify(path)
    assert not res.ok
    assert any("chain broken before n=4" in p for p in res.problems)


def test_export_writes_every_record(tmp_path: Path) -> None:
    """`audit export` prints every record as a JSON line, oldest first."""
    path = filled(tmp_path, 3)
    out = audit_cli("export", "--file", str(path))
    assert out.returncode == 0
    assert [json.loads(x)["n"] for x in out.stdout.splitlines()] == [1, 2, 3]


def test_rotation_is_bounded_and_chained(tmp_path: Path) -> None:
    """Past max_bytes the log rotates, keeps `keep` old files, and the chain runs across them."""
    log = AuditLog(tmp_path / "audit.log", max_bytes=4096, keep=2)
    for i in range(200):
        log.append("audit.test", {"i": i, "pad": "x" * 100})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 4 * 4096
    res = verify(tmp_path / "audit.log")
    assert res.ok and res.last_n == 200
    assert res.notes and "rotated away" in res.notes[0]


def test_concurrent_processes_keep_one_chain(tmp_path: Path) -> None:
    """Several processes appending at once (agent, operator CLIs) still make one valid chain."""
    path = tmp_path / "audit.log"
    code = ("import sys; from agent.security.audit import AuditLog; log = AuditLog(sys.argv[1], "
            "max_bytes=8192); [log.append('audit.x', {'w': sys.argv[2]}) for _ in range(40)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(w)])
             for w in range(4)]
    try:
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    res = verify(path)
    assert res.ok, res.problems
    assert res.last_n == 160


def test_config_digest_is_canonical() -> None:
    """The config hash ignores key order and changes with any value."""
    assert config_digest({"a": 1, "b": [1, 2]}) == config_digest({"b": [1, 2], "a": 1})
    assert config_digest({"a": 1}) != config_digest({"a": 2})


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make a file unwritable for this process: chmod for a user, the immutable flag for root
    (root ignores file modes)."""
    if os.geteuid() != 0:
        path.chmod(0o440)
        try:
            yield
        finally:
            path.chmod(0o640)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], check=False).returncode:
        pytest.skip("running as root without chattr +i: cannot make a file read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


async def test_read_only_log_degrades_but_alarms_flow(tmp_path: Path) -> None:
    """With the audit log read-only, a tamper loop broken on a GPIO input is still an ALARM
    event and the runtime's `audit.tamper_contact` still reaches the outbox, after one
    `audit.degraded` alert; once the log is writable, `audit.recovered` and the next record
    follow. The batch the outbox signs carries the alarms first, then the audit events."""
    cfg = gateway_config(tmp_path, tamper=True)
    factory = MockFactory()
    db = cfg.outbox_path
    path = cfg.gateway.state_dir / "audit" / "audit.log"

    async def audited(*types: str) -> None:
        await until(lambda: [e["type"] for e in stored(db) if e["src"] == "agent.audit"]
                    == ["audit.config_loaded", "audit.tamper_contact", *types], 10,
                    f"audit events {types}")

    async with running(cfg, factory=factory) as rt:
        assert rt.audit is not None
        pin = factory.pin(TAMPER_PIN)
        await audited()  # the loop's state at start
        with read_only(path):
            with pytest.raises(AuditWriteError):
                AuditLog(path).append("audit.x")
            await asyncio.to_thread(pin.drive_low)  # from another thread, as gpiozero calls
            await audited("audit.degraded", "audit.tamper_contact")
            assert rt.audit.degraded and rt.audit.failures == 1
        await asyncio.to_thread(pin.drive_high)
        await audited("audit.degraded", "audit.tamper_contact", "audit.recovered",
                      "audit.tamper_contact")
        assert not rt.audit.degraded
    async with await Outbox.open(db) as outbox:
        key = Ed25519PrivateKey.generate()
        batch = await outbox.claim_batch(100, 1 << 20, Signer(key, "gw", time.time).build)
        assert batch is not None
        events = verify_batch(batch.data, {kid_for(key.public_key()): key.public_key()}.get
                              ).events
    alarms = [(e["src"], e["v"]) for e in events if e["prio"] == ALARM]
    assert alarms == [("gpio.case", "normal"), ("gpio.case", "tampered"), ("gpio.case", "normal")]
    assert all(e["prio"] == ALARM for e in events[:3])  # alarms first
    audit = [e for e in events if e["src"] == "agent.audit"]
    assert all(e["prio"] == ALERT for e in audit)
    [lost] = [e for e in audit if e["attrs"].get("state") == "tampered"]
    assert lost["type"] == "audit.tamper_contact" and lost["attrs"]["n"] is None
    assert str(path) in audit[2]["attrs"]["error"]  # audit.degraded names the log
    assert audit[4]["attrs"]["failures"] == 1  # audit.recovered: how many were not written
    assert [r["type"] for r in records(path)] == ["audit.config_loaded", "audit.tamper_contact",
                                                  "audit.recovered", "audit.tamper_contact"]
