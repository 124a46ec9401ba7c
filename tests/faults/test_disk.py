"""Disk faults under the outbox: quota reached during an outage, the filesystem full (a real
4 MiB tmpfs), and the filesystem remounted read-only. The full-disk cases need root; the same
effects without root, on a fake disk: tests/test_outbox.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tests.faults.checker import SUMMARY
from tests.faults.conftest import Chain, counter, run_quiet
from tests.support.agentproc import wait_until


def fill(fs: Path) -> Path:
    """Write a ballast file until the filesystem says ENOSPC."""
    ballast = fs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:  # unbuffered: a buffered file would raise ENOSPC again from its close()
        while True:
            try:
                os.write(fd, b"\0" * 65536)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        while True:  # the last partial page too
            try:
                os.write(fd, b"\0" * 512)
            except OSError:
                break
    finally:
        os.close(fd)
    SUMMARY.faults["disk full"] += 1
    return ballast


def test_quota_during_outage_drops_with_records(chain: Chain) -> None:
    """The outbox quota (64 KiB) is reached during a WAN black hole: the oldest telemetry is
    evicted, a gateway.dropped record names every evicted id, alarms are kept, and after the
    outage every accepted id is delivered or named dropped."""
    chain.agent.doc["outbox"]["quota_bytes"] = 64 * 1024
    chain.proxy.blackhole(True)
    chain.start_agent(counter("tele", 1000.0, batch=10), counter("alarm", 10.0, prio=0,
                                                                  type="alarm.test"))
    chain.agent.wait_log("outbox.evicted", timeout=30)
    SUMMARY.faults["outbox quota reached"] += 1
    chain.proxy.heal()
    chain.proxy.cut()  # the black-holed connection is dead; do not wait for the keepalive
    chain.drain()
    rep = chain.check("quota during outage", counter_sources=["synthetic.alarm"])
    assert rep.dropped > 0 and rep.lost == 0 and rep.alarms > 0


def test_full_disk_loses_nothing_accepted(chain: Chain, small_fs: Path) -> None:
    """The outbox's filesystem fills up while events flow: commits fail and nothing more is
    accepted, but nothing already accepted is lost; after space returns (and a restart, as
    systemd would do) everything accepted is delivered."""
    chain.move_state(small_fs / "state")
    chain.counted = False  # a failed commit restarts the source, so its counter restarts
    chain.proxy.blackhole(True)  # keep a backlog in the outbox while the disk fills
    chain.start_agent(counter("tele", 300.0, batch=3), counter("alarm", 5.0, prio=0,
                                                                type="alarm.test"))
    chain.wait_accepting(300)
    ballast = fill(small_fs)
    chain.agent.wait_log("database or disk is full", timeout=20)
    chain.kill()  # systemd would restart it; the outbox file must still hold everything
    ballast.unlink()
    chain.drain()
    rep = chain.check("disk full", counter_sources=[])
    assert rep.lost == 0 and rep.accepted >= 300


def test_read_only_fs_loses_nothing_accepted(chain: Chain, small_fs: Path) -> None:
    """The agent dies and its filesystem comes back read-only (a kernel remounts a failing SD
    card ro): the agent refuses to run with a clear error instead of pretending to accept;
    once the filesystem is writable again everything accepted before is delivered."""
    chain.move_state(small_fs / "state")
    chain.counted = False
    chain.proxy.blackhole(True)
    chain.start_agent(counter("tele", 300.0, batch=3), counter("alarm", 5.0, prio=0,
                                                                type="alarm.test"))
    chain.wait_accepting(300)
    chain.kill()
    # Linux refuses to remount ro while a process has files open for writing, so the fault
    # is injected while the agent is down (the SD-card case: it comes back ro after a reboot).
    res = run_quiet("mount", "-o", "remount,ro", str(small_fs))
    assert res.returncode == 0, res.stderr
    SUMMARY.faults["filesystem read-only"] += 1
    log_at = len(chain.agent.log_text())
    chain.agent.start()
    assert chain.agent.proc is not None
    rc = chain.agent.proc.wait(30)
    assert rc != 0, "the agent ran on a read-only outbox"
    assert "read-only" in chain.agent.log_text()[log_at:].lower() \
        or "readonly" in chain.agent.log_text()[log_at:].lower(), chain.agent.log_text()[log_at:]
    res = run_quiet("mount", "-o", "remount,rw", str(small_fs))
    assert res.returncode == 0, res.stderr
    chain.drain()
    rep = chain.check("read-only fs", counter_sources=[])
    assert rep.lost == 0 and rep.accepted >= 300


def test_full_disk_keeps_alarms_flowing(chain: Chain, small_fs: Path) -> None:
    """On a full disk the agent keeps running, keeps accepting and delivering alarms, records
    what it could not keep, and accepts telemetry again once space returns."""
    chain.move_state(small_fs / "state")
    chain.counted = False
    chain.start_agent(counter("tele", 300.0, batch=3), counter("alarm", 5.0, prio=0,
                                                                type="alarm.test"))
    chain.wait_delivered(300)
    ballast = fill(small_fs)
    chain.agent.wait_log("database or disk is full", timeout=20)
    alarms = len([e for e in chain.rx.events(chain.agent.gw) if e["prio"] == 0])
    wait_until(lambda: len([e for e in chain.rx.events(chain.agent.gw) if e["prio"] == 0])
               >= alarms + 10, 15, "alarms delivered while the disk is full", chain.agent)
    assert chain.agent.running
    ballast.unlink()
    n = chain.delivered()
    chain.wait_delivered(n + 300)
    chain.drain()
    rep = chain.check("disk full, alarms flowing", counter_sources=["synthetic.alarm"])
    assert rep.lost == 0
