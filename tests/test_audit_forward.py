"""Operator commands' audit records reach the outbox: the records of real `provision`, `provision
--renew`, `doctor` and `keygen` runs, forwarded at agent start or while it runs, each once (across
restarts and SIGKILL); a damaged log raises an alert without stopping the start, and an aborted
wipe is not recorded as a wipe."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.clock import make_clock
from agent.core.types import ALERT
from agent.outbox import Outbox
from agent.protocol import kid_for, verify_batch
from agent.runtime.forwarder import Signer
from agent.security.audit import AuditForwarder, AuditLog, AuditRecord, AuditTrail, verify
from agent.security.keys import load_public_key
from branchsim.broker import Mosquitto, get_free_port
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AGENT, AgentProcess, mqtt_uplink, wait_until
from tests.support.pki import Pki, issue

OPERATOR = "alice(1000) via sudo by alice"  # for records written in process
# What an operator command run here under `sudo` by alice records as its actor.
SUDO_ALICE = f"{pwd.getpwuid(os.getuid()).pw_name}({os.getuid()}) via sudo by alice"


def stored(db: Path) -> list[dict[str, Any]]:
    """Every event in an outbox file, decoded, by id (read-only: the agent may be running)."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
            rows = c.execute("SELECT body FROM events ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []  # created but its tables not yet committed
    return [cbor2.loads(bytes(body)) for (body,) in rows]


def audit_log(agent: AgentProcess) -> AuditLog:
    return AuditLog(agent.state / "audit" / "audit.log")


def operator(*args: str) -> tuple[int, int, str]:
    """`branch-agent ARGS` as alice runs it with sudo, in its own process: (exit code, pid,
    stdout)."""
    p = subprocess.Popen([*AGENT, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "SUDO_USER": "alice"})
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode in (0, 1, 2), err  # 1, 2: doctor's warn / fail
    return p.returncode, p.pid, out


def written_by(log: Path, pid: int) -> AuditRecord:
    """The one record the process `pid` wrote to the log."""
    [doc] = [d for d in map(json.loads, log.read_text().splitlines()) if d["pid"] == pid]
    return AuditRecord(**doc)


def doctor(agent: AgentProcess) -> AuditRecord:
    """`branch-agent doctor` on the gateway: its record says its exit code and integrity
    result (whatever they are here) as the invoking user."""
    code, pid, out = operator("doctor", "--config", str(agent.config_path), "--json",
                              "--timeout", "1")
    rec = written_by(audit_log(agent).path, pid)
    integrity = {c["name"]: c["status"] for c in json.loads(out)["checks"]}.get("integrity")
    assert (rec.type, rec.actor, rec.attrs) == (
        "audit.operator_command", SUDO_ALICE, {"cmd": "doctor", "exit": code,
                                               "integrity": integrity})
    return rec


def renew(agent: AgentProcess) -> AuditRecord:
    """`branch-agent provision --renew`: its record names the signing key's kid and the new
    key's CSR."""
    code, pid, _ = operator("provision", "--renew", "--config", str(agent.config_path))
    assert code == 0
    rec = written_by(audit_log(agent).path, pid)
    tls = Path(agent.doc["uplink"]["mqtt"]["tls"]["key"]).parent
    assert (rec.type, rec.actor, rec.attrs) == (
        "audit.operator_command", SUDO_ALICE,
        {"cmd": "renew", "kid": kid_for(load_public_key(agent.pubkey)).hex(), "new_key": True,
         "csr": str(tls / "next" / "client.csr")})
    return rec


def copies(agent: AgentProcess, rec: AuditRecord) -> list[dict[str, Any]]:
    """The outbox events that carry this local record."""
    return [e for e in stored(agent.state / "outbox.db")
            if e["src"] == "agent.audit" and (e.get("attrs") or {}).get("h") == rec.h]


def forwarded_as_is(ev: dict[str, Any], rec: AuditRecord) -> None:
    """The event is the record: the actor, its own time, its attrs with n and h, priority 1."""
    assert (ev["src"], ev["type"], ev["prio"], ev["v"], ev["t"]) == (
        "agent.audit", rec.type, ALERT, rec.actor, rec.t)
    assert ev["attrs"] == {**rec.attrs, "n": rec.n, "h": rec.h}


def of_type(agent: AgentProcess, type: str) -> list[dict[str, Any]]:
    return [e for e in stored(agent.state / "outbox.db") if e["type"] == type]


def start_ready(agent: AgentProcess) -> None:
    at = len(agent.log_text())
    agent.start()
    agent.wait_log('"agent.ready"', after=at)


@pytest.fixture
def offline(tmp_path: Path, pki: Pki) -> Iterator[AgentProcess]:
    """A gateway whose uplink never connects (mutual TLS, its files its own copies in
    gw/tls, as `provision --renew` wants them), so what it forwards stays in its outbox to be
    counted; killed at the end if a test left it running."""
    tls = tmp_path / "gw" / "tls"
    tls.mkdir(parents=True)
    for src, name in ((pki.ca_cert, "ca.pem"), (pki.client_cert, "client.pem"),
                      (pki.client_key, "client.key")):
        shutil.copy(src, tls / name)
    (tls / "client.key").chmod(0o600)
    up = mqtt_uplink(get_free_port(), pki)
    up["tls"] = {"ca": str(tls / "ca.pem"), "cert": str(tls / "client.pem"),
                 "key": str(tls / "client.key")}
    agent = AgentProcess(tmp_path / "gw", uplink={"order": ["mqtt"], "mqtt": up})
    agent.write_config()
    try:
        yield agent
    finally:
        agent.kill()


# --------------------------------------------------------------------------- the real agent


def test_operator_command_reaches_the_platform_signed(tmp_path: Path, broker: Mosquitto,
                                                      platform: Receiver) -> None:
    """`branch-agent keygen` run under sudo writes only the local log; at the next start the
    agent forwards its record: the platform verifies and stores one `audit.operator_command`
    at priority 1 with the invoking user, the record's n, h and time, and its attrs."""
    agent = AgentProcess(tmp_path / "gw",
                         uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, None)})
    cfg = agent.write_config()
    run = subprocess.run([*AGENT, "keygen", "--dir", str(tmp_path / "other-keys"),
                          "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                         check=False, stdin=subprocess.DEVNULL,
                         env={**os.environ, "SUDO_USER": "alice"})
    assert run.returncode == 0, run.stderr
    [line] = audit_log(agent).path.read_text().splitlines()
    rec = json.loads(line)
    assert rec["actor"].endswith("via sudo by alice")
    platform.register(agent.gw, agent.pubkey.read_bytes())
    try:
        start_ready(agent)
        wait_until(lambda: any(e["type"] == "audit.operator_command"
                               for e in platform.events(agent.gw)), 30,
                   "the keygen record at the platform", agent)
    finally:
        assert agent.stop() == 0
    events = [e for e in platform.events(agent.gw) if e["type"] == "audit.operator_command"]
    assert len(events) == 1
    ev = events[0]
    assert (ev["src"], ev["prio"], ev["v"], ev["t"]) == ("agent.audit", ALERT, rec["actor"],
                                                         rec["t"])
    assert ev["attrs"] == {**rec["attrs"], "n": rec["n"], "h": rec["h"]}
    assert ev["attrs"]["cmd"] == "keygen"
    assert not platform.counters(), platform.counters()
    types = [e["type"] for e in platform.events(agent.gw)]
    assert "audit.integrity_failure" not in types and types.count("audit.config_loaded") == 1


def provisioned(root: Path, port: int, pki: Pki) -> AgentProcess:
    """The gateway in image `root` as the installer completes it: the bank's CA and the
    certificate it issued for the provisioned key's CSR installed in tls/, and the config
    with its paths as seen from here (the test cannot chroot into the image)."""
    etc = root / "etc" / "branch-agent"
    issue(pki, etc / "tls" / "client.csr", etc / "tls" / "client.pem")
    shutil.copy(pki.ca_cert, etc / "tls" / "ca.pem")
    doc = tomllib.loads((etc / "agent.toml").read_text())

    def here(path: str) -> str:
        return str(root / Path(path).relative_to("/"))

    mqtt = doc["uplink"]["mqtt"]
    agent = AgentProcess(etc, gw=doc["gateway"]["id"], gateway={
        **doc["gateway"], "state_dir": here(doc["gateway"]["state_dir"]),
        "key_file": here(doc["gateway"]["key_file"]), "time_sync": "synced"},
        uplink={**doc["uplink"], "mqtt": {
            **mqtt_uplink(port, pki), **{k: v for k, v in mqtt.items() if k != "tls"},
            "tls": {k: here(v) for k, v in mqtt["tls"].items()}}})
    agent.state = Path(agent.doc["gateway"]["state_dir"])
    agent.write_config()  # replaces the image's config (target paths) with this one
    return agent


def test_provision_renew_and_doctor_records_reach_the_platform(
        tmp_path: Path, pki: Pki, mosquitto_tls: Mosquitto, tls_platform: Receiver) -> None:
    """A gateway image made with `provision --root`, then `provision --renew` and `doctor` on
    it, each run by alice with sudo: each command's record lands in the image's own log, and at
    the first start the agent forwards all three over mutual TLS; the platform verifies and
    stores each once, as written: the actor, cmd and attrs (gateway, root and kid; kid, new
    key and CSR; exit code and integrity result), its n, h and time."""
    root = tmp_path / "root"
    code, pid, _ = operator("provision", "--root", str(root), "--gateway-id", "gw-image",
                            "--broker", f"127.0.0.1:{mosquitto_tls.port}", "--non-interactive",
                            "--no-qr")
    assert code == 0
    agent = provisioned(root, mosquitto_tls.port, pki)
    log = audit_log(agent).path
    assert log == root / "var/lib/branch-agent/audit/audit.log"
    prov = written_by(log, pid)
    kid = kid_for(load_public_key(agent.pubkey)).hex()
    assert (prov.type, prov.actor, prov.attrs) == (
        "audit.operator_command", SUDO_ALICE,
        {"cmd": "provision", "gateway": "gw-image", "root": str(root), "kid": kid})
    recs = [prov, renew(agent), doctor(agent)]
    assert verify(log).ok
    tls_platform.register(agent.gw, agent.pubkey.read_bytes())
    try:
        start_ready(agent)
        wait_until(lambda: len([e for e in tls_platform.events(agent.gw)
                                if e["type"] == "audit.operator_command"]) >= 3, 30,
                   "the three records at the platform", agent)
    finally:
        assert agent.stop() == 0
    events = [e for e in tls_platform.events(agent.gw) if e["type"] == "audit.operator_command"]
    assert [e["attrs"]["cmd"] for e in events] == ["provision", "renew", "doctor"]
    for ev, rec in zip(events, recs, strict=True):
        forwarded_as_is(ev, rec)
    assert not tls_platform.counters(), tls_platform.counters()


def test_restarts_forward_each_record_once(offline: AgentProcess) -> None:
    """Three starts: records `doctor` wrote before the first are forwarded by the first only,
    one written between the second and third by the third only; the agent's own records (one
    config_loaded per start) are not forwarded a second time."""
    first = [doctor(offline), doctor(offline)]
    for _ in range(2):
        start_ready(offline)
        assert offline.stop() == 0
        assert [len(copies(offline, r)) for r in first] == [1, 1]
    later = doctor(offline)
    start_ready(offline)
    assert offline.stop() == 0
    assert [len(copies(offline, r)) for r in [*first, later]] == [1, 1, 1]
    for rec in [*first, later]:
        forwarded_as_is(copies(offline, rec)[0], rec)
    assert len(of_type(offline, "audit.config_loaded")) == 3
    assert len(of_type(offline, "audit.operator_command")) == 3
    assert of_type(offline, "audit.integrity_failure") == []
    assert verify(audit_log(offline).path).ok


def test_record_written_while_the_agent_runs_is_forwarded(offline: AgentProcess) -> None:
    """`doctor` run beside the running agent: its record joins the outbox within a few
    seconds, without a restart, once; so does the record of a `provision --renew` after it;
    and a restart does not forward either again."""
    start_ready(offline)
    first = doctor(offline)
    wait_until(lambda: len(copies(offline, first)) >= 1, 20,
               "the record in the outbox while the agent runs", offline)
    second = renew(offline)
    wait_until(lambda: len(copies(offline, second)) >= 1, 20,
               "the second record in the outbox while the agent runs", offline)
    assert offline.stop() == 0
    start_ready(offline)
    assert offline.stop() == 0
    assert [len(copies(offline, r)) for r in (first, second)] == [1, 1]
    forwarded_as_is(copies(offline, first)[0], first)
    forwarded_as_is(copies(offline, second)[0], second)
    assert of_type(offline, "audit.integrity_failure") == []


def test_sigkill_after_start_forwards_once(offline: AgentProcess) -> None:
    """Killed with SIGKILL as soon as the record is in the outbox, then restarted: still one
    copy. Then the window itself (events committed, cursor not yet written: the cursor file
    removed) and a restart: the idempotency keys keep it at one copy."""
    rec = renew(offline)
    start_ready(offline)
    wait_until(lambda: len(copies(offline, rec)) >= 1, 20, "the record in the outbox", offline)
    offline.kill()
    start_ready(offline)
    assert offline.stop() == 0
    assert len(copies(offline, rec)) == 1
    cursor = offline.state / "audit-forwarded.json"
    assert cursor.exists()
    cursor.unlink()  # what a kill between the commit and the cursor write leaves
    start_ready(offline)
    assert offline.stop() == 0
    assert len(copies(offline, rec)) == 1
    assert of_type(offline, "audit.integrity_failure") == []


def edit_record(path: Path, n: int, key: str, value: Any) -> None:
    """Change one attr of record n in place, leaving its hashes as they were (tampering)."""
    lines = path.read_text().splitlines(keepends=True)
    doc = json.loads(lines[n - 1])
    assert doc["n"] == n
    doc["attrs"][key] = value
    lines[n - 1] = json.dumps(doc, sort_keys=True) + "\n"
    path.write_text("".join(lines))


def test_tampered_log_alerts_once_and_the_agent_starts(offline: AgentProcess) -> None:
    """A `doctor` record edited afterwards: the agent still starts, raises one
    audit.integrity_failure naming the record, forwards what it can read; a second start does
    not repeat the alert."""
    recs = [doctor(offline) for _ in range(3)]
    path = audit_log(offline).path
    edit_record(path, 2, "exit", 0 if recs[1].attrs["exit"] else 1)
    assert not verify(path).ok
    for _ in range(2):
        start_ready(offline)
        assert offline.stop() == 0
    [alert] = of_type(offline, "audit.integrity_failure")
    assert alert["prio"] == ALERT and alert["attrs"]["reason"] == "audit_log"
    assert any("n=2 was altered" in p for p in alert["attrs"]["problems"]), alert
    assert [len(copies(offline, r)) for r in recs] == [1, 1, 1]
    edited = copies(offline, recs[1])[0]["attrs"]["exit"]
    assert edited != recs[1].attrs["exit"]  # forwarded as the log now says


def test_aborted_wipe_is_not_recorded_as_a_wipe(offline: AgentProcess,
                                                tmp_path: Path) -> None:
    """`wipe --keep-audit` with a log that does not verify refuses before anything goes: no
    `wipe` record, one `wipe_refused` record naming why, every file still there."""
    rec = doctor(offline)
    path = audit_log(offline).path
    edit_record(path, rec.n, "exit", rec.attrs["exit"] + 1)
    before = sorted(offline.dir.rglob("*"))
    res = subprocess.run([*AGENT, "wipe", "--config", str(offline.config_path),
                          "--yes-i-am-sure", offline.gw, "--keep-audit",
                          str(tmp_path / "export.jsonl")], capture_output=True, text=True,
                         timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "does not verify" in res.stderr, res.stderr
    assert sorted(offline.dir.rglob("*")) == before
    assert not (tmp_path / "export.jsonl").exists()
    cmds = [json.loads(ln)["attrs"].get("cmd") for ln in path.read_text().splitlines()]
    assert cmds == ["doctor", "wipe_refused"]
    refusal = json.loads(path.read_text().splitlines()[-1])
    assert "does not verify" in refusal["attrs"]["reason"]


# --------------------------------------------------------------------------- in process


async def forward(tmp_path: Path, log: AuditLog) -> int:
    """One agent start's forwarding, into tmp_path/outbox.db (cursor beside it)."""
    async with await Outbox.open(tmp_path / "outbox.db") as outbox:
        trail = AuditTrail(log, outbox.append, make_clock("synced"))
        return await AuditForwarder(trail, tmp_path / "audit-forwarded.json",
                                    outbox.append_many).run()


async def test_every_rotated_generation_is_forwarded_in_order(tmp_path: Path) -> None:
    """300 records over several rotated files and the current one go out oldest first, once
    each, in more than one commit group; a second start forwards nothing."""
    log = AuditLog(tmp_path / "audit" / "audit.log", max_bytes=16384, keep=10)
    for i in range(300):
        log.append("audit.operator_command", {"cmd": "doctor", "i": i}, actor=OPERATOR)
    assert len(list(log.path.parent.iterdir())) >= 4
    assert verify(log.path).records == 300
    assert await forward(tmp_path, log) == 300
    assert await forward(tmp_path, log) == 0
    events = stored(tmp_path / "outbox.db")
    assert [e["attrs"]["n"] for e in events] == list(range(1, 301))
    assert [e["attrs"]["i"] for e in events] == list(range(300))


async def test_records_the_wire_cannot_carry_are_named_not_sent(tmp_path: Path) -> None:
    """Records with intact hashes but a non-audit type, an integer past 64 bits or nesting too
    deep are not forwarded (the platform would refuse the batch, holding up the ones behind
    it); the alert names each; the batch that goes out verifies."""
    log = AuditLog(tmp_path / "audit" / "audit.log")
    log.append("audit.operator_command", {"cmd": "doctor", "exit": 0}, actor=OPERATOR)
    log.append("alarm.panic", {"cmd": "doctor"}, actor=OPERATOR)
    log.append("audit.operator_command", {"cmd": "x", "big": 2**70}, actor=OPERATOR)
    log.append("audit.operator_command", {"cmd": "x", "deep": {"a": {"b": {"c": {"d": 1}}}}},
               actor=OPERATOR)
    assert verify(log.path).ok
    assert await forward(tmp_path, log) == 1
    async with await Outbox.open(tmp_path / "outbox.db") as outbox:
        key = Ed25519PrivateKey.generate()
        batch = await outbox.claim_batch(100, 1 << 20, Signer(key, "gw", time.time).build)
        assert batch is not None
        events = verify_batch(batch.data, {kid_for(key.public_key()): key.public_key()}.get
                              ).events
    assert [e["type"] for e in events] == ["audit.integrity_failure", "audit.operator_command"]
    problems = events[0]["attrs"]["problems"]
    assert [p.split(":")[0] for p in problems] == ["n=2", "n=3", "n=4"], problems
    assert events[1]["attrs"]["n"] == 1


async def test_truncated_log_is_noticed_and_later_records_forwarded(tmp_path: Path) -> None:
    """The newest records deleted (the record forwarded last is gone) and a new one appended in
    their place: an alert says so, the new record is forwarded, the older ones not again."""
    log = AuditLog(tmp_path / "audit" / "audit.log")
    for i in range(3):
        log.append("audit.operator_command", {"cmd": "doctor", "i": i}, actor=OPERATOR)
    assert await forward(tmp_path, log) == 3
    log.path.write_text(log.path.read_text().splitlines(keepends=True)[0])
    new = log.append("audit.operator_command", {"cmd": "keygen"}, actor=OPERATOR)
    assert new.n == 2
    assert await forward(tmp_path, log) == 1
    events = stored(tmp_path / "outbox.db")
    ops = [e for e in events if e["type"] == "audit.operator_command"]
    assert [e["attrs"]["cmd"] for e in ops] == ["doctor"] * 3 + ["keygen"]
    [alert] = [e for e in events if e["type"] == "audit.integrity_failure"]
    assert any("is not in the log" in p for p in alert["attrs"]["problems"]), alert
