"""The audit trail: hash chain, tamper detection, rotation, concurrent writers, degraded mode."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.clock import make_clock
from agent.core.types import ALARM, Event
from agent.outbox import Outbox
from agent.protocol import kid_for, verify_batch
from agent.runtime.forwarder import Signer
from agent.security.audit import AuditLog, AuditTrail, AuditWriteError, config_digest, verify


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.security.audit", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def filled(tmp_path: Path, n: int = 5) -> Path:
    log = AuditLog(tmp_path / "audit" / "audit.log")
    for i in range(n):
        log.append("audit.operator_command", {"cmd": "keygen", "i": i}, actor="alice(1000)")
    return log.path


def test_records_chain_and_permissions(tmp_path: Path) -> None:
    """Records are numbered, chained by hash, 0640 in a 0750 directory, and verify intact."""
    path = filled(tmp_path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["n"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["prev"] == "0" * 64
    assert all(b["prev"] == a["h"] for a, b in itertools.pairwise(lines))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    res = verify(path)
    assert (res.ok, res.records, res.last_h) == (True, 5, lines[-1]["h"])


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
    """With the audit file read-only, records still reach the outbox, one audit.degraded alert is
    raised, alarms keep being committed, and audit.recovered follows once writable again."""
    log = AuditLog(tmp_path / "audit" / "audit.log")
    log.append("audit.config_loaded", {"sha256": "ab" * 32})
    async with await Outbox.open(tmp_path / "outbox.db") as outbox:
        trail = AuditTrail(log, outbox.append, make_clock("synced"))
        with read_only(log.path):
            with pytest.raises(AuditWriteError):
                log.append("audit.x")
            assert await trail.record("audit.tls_failure", {"peer": "broker"}) is None
            await trail.record("audit.tamper_contact", {"source": "gpio.case"})
            alarm = await outbox.append(Event(src="gpio.vault_door", type="contact", v=True,
                                              t=time.time(), prio=ALARM))
            assert trail.degraded and trail.failures == 2
        assert await trail.record("audit.clock_jump", {"delta_s": 3600}) is not None
        assert not trail.degraded
        key = Ed25519PrivateKey.generate()
        batch = await outbox.claim_batch(100, 1 << 20, Signer(key, "gw", time.time).build)
        assert batch is not None
        events = verify_batch(batch.data, {kid_for(key.public_key()): key.public_key()}.get
                              ).events
    by_type = [(e["type"], e["prio"]) for e in events]
    assert by_type[0] == ("contact", ALARM) and events[0]["id"] == alarm  # alarms first
    assert [t for t, _ in by_type[1:]] == ["audit.degraded", "audit.tls_failure",
                                           "audit.tamper_contact", "audit.recovered",
                                           "audit.clock_jump"]
    assert all(p == 1 for _, p in by_type[1:])
    assert verify(log.path).ok and verify(log.path).records == 3  # + recovered, clock_jump
