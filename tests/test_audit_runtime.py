"""The audit records the runtime writes itself, each driven by its real cause: a tamper loop on a
GPIO input, a stepped wall clock, a corrupt outbox at start, the platform refusing the
gateway's batches (fork, bad signature), the configuration loaded. Each is asserted twice: the
local record (read back under the log's lock, chain verified) and the `audit.*` event in the
outbox that names it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from gpiozero.pins.mock import MockFactory

from agent.config import AgentConfig, load_config, parse_config
from agent.core.types import ALARM, ALERT, TQ_SYNCED, TQ_UNSYNCED, Event
from agent.outbox import Outbox
from agent.runtime.root import Runtime
from agent.security.audit import AuditLog, config_digest
from agent.security.keys import generate_keypair
from branchsim.broker import Mosquitto, get_free_port
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AGENT, AgentProcess, mqtt_uplink, until, wait_until
from tests.test_audit_forward import stored

TAMPER_PIN = 24
# The runtime's clock starts here (2001-09-09): a record stamped by any other clock (the
# system's) is decades away.
WALL0 = 1_000_000_000.0


class SteppedClock:
    """A wall clock that starts at `wall` and runs with the monotonic clock until `step` moves
    it (an NTP step after a boot without RTC); `synced` is what the time-sync probe answers."""

    def __init__(self, wall: float = WALL0, synced: bool = True) -> None:
        self._offset = wall - time.monotonic()
        self.synced = synced

    def time(self) -> float:
        return time.monotonic() + self._offset

    def monotonic(self) -> float:
        return time.monotonic()

    def synchronized(self) -> bool:
        return self.synced

    def step(self, seconds: float) -> None:
        self._offset += seconds


def gateway_config(dir: Path, *, tamper: bool = False, **extra: Any) -> AgentConfig:
    """A gateway in `dir` (its key made once), optionally with a tamper loop on a mock pin."""
    if not (dir / "keys" / "signing.key").exists():
        generate_keypair(dir / "keys")
    doc: dict[str, Any] = {
        "gateway": {"id": "gw-audit", "state_dir": str(dir / "state"),
                    "runtime_dir": str(dir / "run"),
                    "key_file": str(dir / "keys" / "signing.key"), "time_sync": "synced"},
        # nothing listens there: every event stays in the outbox, where the test reads it
        "uplink": {"order": ["mqtt"], "mqtt": {"host": "127.0.0.1", "port": get_free_port(),
                                               "insecure": True}},
        **extra,
    }
    if tamper:
        doc["sources"] = {"gpio": {"pin_factory": "mock", "snapshot_interval_s": 0, "inputs": [
            {"name": "case", "pin": TAMPER_PIN, "kind": "tamper", "debounce_ms": 20}]}}
    return parse_config(doc)


@contextlib.asynccontextmanager
async def running(cfg: AgentConfig, clock: SteppedClock | None = None,
                  factory: MockFactory | None = None) -> AsyncIterator[Runtime]:
    """The real runtime until the block ends; ready when the block starts."""
    rt = Runtime(cfg, pin_factory=factory, clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(rt.run(stop), name="runtime-under-test")
    try:
        await until(lambda: rt.ready.is_set() or task.done(), 20, "the runtime ready")
        if task.done():
            task.result()  # raises why it ended
        yield rt
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


def records(path: Path, type: str | None = None) -> list[dict[str, Any]]:
    """The local log's records (every generation, read under its lock), after checking that
    the chain verifies; only those of `type` if given."""
    lines, checked = AuditLog(path).read()
    assert checked.ok, checked.problems
    docs = [json.loads(line) for line in lines]
    return [d for d in docs if type is None or d["type"] == type]


def events(db: Path, type: str) -> list[dict[str, Any]]:
    return [e for e in stored(db) if e["type"] == type]


def assert_event_of(ev: dict[str, Any], rec: dict[str, Any]) -> None:
    """The outbox event is the audit event of this local record: its attrs, n and h, the
    actor, priority ALERT, from the audit trail."""
    assert (ev["src"], ev["prio"], ev["v"]) == ("agent.audit", ALERT, rec["actor"])
    assert ev["attrs"] == {**rec["attrs"], "n": rec["n"], "h": rec["h"]}


# --------------------------------------------------------------------------- in process


async def test_tamper_loop_is_audited_by_the_runtime(tmp_path: Path) -> None:
    """A tamper loop on a GPIO input, broken and restored: next to each ALARM event of the
    input, the runtime records `audit.tamper_contact` (actor sensor, the source and its state)
    for the loop's state at start and for each change, locally and as the event naming it."""
    cfg = gateway_config(tmp_path, tamper=True)
    factory = MockFactory()
    db = cfg.outbox_path

    async def audited(*states: str) -> None:
        await until(lambda: [e["attrs"]["state"] for e in events(db, "audit.tamper_contact")]
                    == list(states), 10, f"audit.tamper_contact {states}")

    async with running(cfg, factory=factory):
        pin = factory.pin(TAMPER_PIN)
        await audited("normal")  # the loop's state at start
        await asyncio.to_thread(pin.drive_low)  # from another thread, as gpiozero calls back
        await audited("normal", "tampered")
        await asyncio.to_thread(pin.drive_high)
        await audited("normal", "tampered", "normal")
    path = cfg.gateway.state_dir / "audit" / "audit.log"
    recs = records(path, "audit.tamper_contact")
    assert [(r["attrs"], r["actor"]) for r in recs] == [
        ({"source": "gpio.case", "state": s}, "sensor") for s in ("normal", "tampered", "normal")]
    evs = events(db, "audit.tamper_contact")
    assert len(evs) == 3
    for ev, rec in zip(evs, recs, strict=True):
        assert_event_of(ev, rec)
    alarms = [(e["v"], e["prio"]) for e in stored(db) if e["src"] == "gpio.case"]
    assert alarms == [("normal", ALARM), ("tampered", ALARM), ("normal", ALARM)]


async def test_wall_clock_step_is_audited_with_time_and_quality(tmp_path: Path) -> None:
    """The wall clock stepped by an hour while the agent runs: one `audit.clock_jump` with the
    step in seconds. Each record carries the runtime's wall time (its clock's, not the
    system's), each audit event its time and time quality: 1 while the clock is not
    synchronised, 0 once it is."""
    cfg = gateway_config(tmp_path)
    clock = SteppedClock(synced=False)
    db = cfg.outbox_path
    async with running(cfg, clock) as rt:
        started = clock.time()
        # A step before the audit loop's first reading has nothing to be compared with.
        await until(lambda: rt._clock_ref is not None, 10, "the audit loop's first reading")
        clock.synced = True
        clock.step(3600.0)
        stepped = clock.time()
        await until(lambda: bool(events(db, "audit.clock_jump")), 10, "audit.clock_jump")
        after = clock.time()
    path = cfg.gateway.state_dir / "audit" / "audit.log"
    [loaded] = records(path, "audit.config_loaded")
    [jump] = records(path, "audit.clock_jump")
    assert jump["actor"] == "agent" and jump["attrs"]["seconds"] == pytest.approx(3600, abs=0.05)
    assert WALL0 <= loaded["t"] <= started
    assert stepped <= jump["t"] <= after
    [loaded_ev] = events(db, "audit.config_loaded")
    [jump_ev] = events(db, "audit.clock_jump")
    assert_event_of(loaded_ev, loaded)
    assert_event_of(jump_ev, jump)
    assert (loaded_ev["tq"], jump_ev["tq"]) == (TQ_UNSYNCED, TQ_SYNCED)
    assert WALL0 <= loaded_ev["t"] <= started and stepped <= jump_ev["t"] <= after


async def test_corrupt_outbox_at_start_is_audited(tmp_path: Path) -> None:
    """An outbox whose pages are garbage at start: the runtime records `audit.integrity_failure`
    (reason outbox, what SQLite's check found) and `audit.store_reset` (the same reason, where
    the corrupt file went), locally and in the fresh outbox."""
    cfg = gateway_config(tmp_path)
    db = cfg.outbox_path
    db.parent.mkdir(parents=True)
    async with await Outbox.open(db) as ob:
        await ob.append_many([Event(src="x", type="y", v="z" * 200, t=time.time())
                              for _ in range(500)])
    with db.open("r+b") as f:  # garbage over the b-tree pages, past the header page
        rng = random.Random(7)
        for off in range(4096, db.stat().st_size, 4096):
            f.seek(off)
            f.write(rng.randbytes(512))
    async with running(cfg):
        pass
    path = cfg.gateway.state_dir / "audit" / "audit.log"
    [failure] = records(path, "audit.integrity_failure")
    [reset] = records(path, "audit.store_reset")
    quarantined = Path(reset["attrs"]["quarantined"])
    assert quarantined.name.startswith("outbox.db.corrupt-") and quarantined.exists()
    assert reset["attrs"]["reason"]  # what the check said
    assert failure["attrs"] == {"reason": "outbox", "problems": [reset["attrs"]["reason"]],
                                "quarantined": str(quarantined)}
    assert failure["actor"] == reset["actor"] == "agent"
    [failure_ev] = events(db, "audit.integrity_failure")
    [reset_ev] = events(db, "audit.store_reset")
    assert_event_of(failure_ev, failure)
    assert_event_of(reset_ev, reset)


# --------------------------------------------------------------------------- the real agent


def delivered(agent: AgentProcess, platform: Receiver, more_than: int) -> int:
    """Run the agent until the platform holds more than `more_than` of its batches and its
    outbox is empty (nothing in flight); stop it; return the platform's batch count."""
    agent.start()
    try:
        wait_until(lambda: platform.batch_count(agent.gw) > more_than
                   and agent.outbox_count() == 0, 30, "batches delivered", agent)
    finally:
        assert agent.stop() == 0
    return platform.batch_count(agent.gw)


def restore_old_state(agent: AgentProcess, platform: Receiver) -> None:
    """The gateway's state directory restored from a copy older than what the platform holds:
    its chain goes on from a batch the platform has already had other bytes for."""
    first = delivered(agent, platform, 0)
    backup = agent.dir / "state-backup"
    shutil.copytree(agent.state, backup)
    delivered(agent, platform, first)
    agent.state = backup
    agent.doc["gateway"]["state_dir"] = str(backup)


def damage_platform_key(platform_db: Path, gw: str) -> None:
    """The platform's key record for the gateway damaged: the kid the gateway signs with still
    finds it, but it holds another key, so every signature fails to verify."""
    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    with contextlib.closing(sqlite3.connect(platform_db)) as c, c:
        assert c.execute("UPDATE gateways SET pubkey = ? WHERE gw = ?", (other, gw)).rowcount == 1


@pytest.mark.parametrize(("refusal", "action"), [("fork", "new_chain"),
                                                  ("bad-signature", "held")])
def test_platform_refusal_is_audited(tmp_path: Path, broker: Mosquitto, platform: Receiver,
                                     refusal: str, action: str) -> None:
    """The reference platform refuses the gateway's batches (`fork`: the gateway's state was
    restored from an old copy and its chain goes on where the platform has other batches;
    `bad-signature`: the platform's key record is damaged). At the third refusal of the same
    bytes the forwarder takes it as final (docs/PROTOCOL.md 4.3) and the agent records one
    `audit.batch_refused` (never the audit log's `audit.integrity_failure`) with the platform's
    reason and what it did (a new chain for a fork, hold for a key), locally and as the event
    in its outbox; a fork's new chain is then accepted."""
    agent = AgentProcess(tmp_path / "gw", uplink={
        "order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, None)},
        forwarder={"ack_timeout_s": 0.5, "status_interval_s": 1.0})
    platform.register(agent.gw, agent.pubkey.read_bytes())
    if refusal == "fork":
        restore_old_state(agent, platform)
    else:
        damage_platform_key(tmp_path / "platform.db", agent.gw)
    path = agent.state / "audit" / "audit.log"
    agent.start()
    try:
        wait_until(lambda: path.exists() and bool(records(path, "audit.batch_refused")),
                   30, f"audit.batch_refused after {refusal}", agent)
        if refusal == "fork":  # the new chain is accepted, and carries the record
            wait_until(lambda: any(e["type"] == "audit.batch_refused"
                                   for e in platform.events(agent.gw)), 30,
                       "audit.batch_refused delivered in the new chain", agent)
    finally:
        assert agent.stop() == 0
    assert platform.counters().get((agent.gw, refusal), 0) >= 3, platform.counters()
    [rec] = records(path, "audit.batch_refused")
    assert rec["actor"] == "agent"
    assert (rec["attrs"]["err"], rec["attrs"]["action"]) == (refusal, action)
    assert not records(path, "audit.integrity_failure")
    if refusal == "fork":
        [ev] = [e for e in platform.events(agent.gw) if e["type"] == "audit.batch_refused"]
        assert len(platform.epochs(agent.gw)) == 2
    else:  # held: still in the outbox, with everything else
        [ev] = events(agent.state / "outbox.db", "audit.batch_refused")
    assert_event_of(ev, rec)


def config_show(config: Path) -> dict[str, Any]:
    """`branch-agent config show --json`: the effective config as the operator sees it."""
    res = subprocess.run([*AGENT, "config", "show", "--json", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, check=True,
                         stdin=subprocess.DEVNULL)
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_config_loaded_holds_the_effective_configs_digest(tmp_path: Path) -> None:
    """Each start of `branch-agent run` records `audit.config_loaded` with the config file's
    path and the `config_digest` of the effective config: the digest of what `config show
    --json` prints, defaults filled in; a changed setting gives another digest."""
    agent = AgentProcess(tmp_path / "gw", uplink={
        "order": ["mqtt"], "mqtt": mqtt_uplink(get_free_port(), None)})
    path = agent.state / "audit" / "audit.log"
    digests = []
    for batch_max_events in (500, 100):
        agent.doc["forwarder"]["batch_max_events"] = batch_max_events
        cfg = agent.write_config()
        shown = config_show(cfg)
        assert shown["forwarder"]["batch_max_events"] == batch_max_events
        assert shown["outbox"]["quota_bytes"] > 0  # a default, not in the file: effective
        at = len(agent.log_text())
        agent.start()
        try:
            agent.wait_log('"agent.ready"', after=at)
        finally:
            assert agent.stop() == 0
        loaded = records(path, "audit.config_loaded")[-1]
        assert loaded["attrs"] == {"sha256": config_digest(shown), "path": str(cfg)}
        assert loaded["attrs"]["sha256"] == config_digest(load_config(cfg))
        assert_event_of(events(agent.state / "outbox.db", "audit.config_loaded")[-1], loaded)
        digests.append(loaded["attrs"]["sha256"])
    assert digests[0] != digests[1]


BINDKEYS = ("00112233445566778899aabbccddeeff", "ffeeddccbbaa99887766554433221100")


def test_a_changed_secret_changes_the_config_digest(tmp_path: Path) -> None:
    """A BTHome bindkey changed between two starts (a secret: `config show` masks it) gives
    another `audit.config_loaded` digest, and neither the log nor the outbox holds the key."""
    agent = AgentProcess(tmp_path / "gw", uplink={
        "order": ["mqtt"], "mqtt": mqtt_uplink(get_free_port(), None)})
    path = agent.state / "audit" / "audit.log"
    digests = []

    def start_until_loaded(starts: int) -> None:
        def loaded() -> bool:
            return path.exists() and len(records(path, "audit.config_loaded")) == starts

        agent.start()
        try:
            # Recorded before the sources start. No BlueZ here: a BLE scanner retrying its
            # start was seen to outlive the runtime's stop, so SIGKILL (the record is fsync'd).
            wait_until(loaded, 20, "audit.config_loaded", agent)
        finally:
            agent.kill()

    for starts, key in enumerate(BINDKEYS, 1):
        agent.doc["sources"] = {"ble": {"sensors": [
            {"name": "thermo", "address": "AA:BB:CC:DD:EE:FF", "decoder": "bthome",
             "bindkey": key}]}}
        start_until_loaded(starts)
        loaded = records(path, "audit.config_loaded")[-1]
        assert loaded["attrs"]["sha256"] == config_digest(load_config(agent.config_path))
        digests.append(loaded["attrs"]["sha256"])
    assert digests[0] != digests[1]
    [sensor] = config_show(agent.config_path)["sources"]["ble"]["sensors"]
    assert sensor["bindkey"] == "**********"  # what an operator sees: the same for both keys
    stores = [path, *agent.state.glob("outbox.db*")]
    assert not [(p.name, k) for p in stores for k in BINDKEYS if k.encode() in p.read_bytes()]
