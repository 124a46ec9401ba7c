"""Signed downlink commands: vectors, every refusal, persistence, and each command end to end
through a real mosquitto (mutual TLS) with the real MQTT uplink and the platform's sender."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from gpiozero import DigitalOutputDevice
from gpiozero.pins.mock import MockFactory

from agent.core.types import Event
from agent.ops.doctor import check_config
from agent.outbox import Outbox
from agent.protocol import kid_for, verify_batch
from agent.protocol.commands import CommandAck, CommandError, decode_ack, encode_ack
from agent.runtime.forwarder import Signer
from agent.security.audit import AuditLog, AuditTrail, verify
from agent.security.commands import CommandHooks, CommandProcessor, SeqStore, make_rotate_hook
from agent.security.config import CommandsConfig
from agent.security.keys import load_private_key, load_public_key
from agent.uplink.mqtt import MqttUplink, MqttUplinkConfig
from branchsim.platform.commands import main_command, make_command, send_command
from branchsim.platform.mqtt_server import PlatformTls
from tests.support import broker as _broker
from tests.support.broker import Mosquitto
from tests.support.pki import Pki
from tests.vectors.commands import make_vectors

pki = _broker.pki
mosquitto_factory = _broker.mosquitto_factory
mosquitto_tls = _broker.mosquitto_tls

VECTORS = Path(make_vectors.__file__).parent
EXPECTED: dict[str, Any] = json.loads((VECTORS / "expected.json").read_text())
# A test vector, not a secret: a git checkout gives it mode 0644, which load_private_key rightly
# refuses for a real key, so it is read with cryptography directly.
_PK = serialization.load_pem_private_key((VECTORS / "platform-test.key").read_bytes(), None)
assert isinstance(_PK, Ed25519PrivateKey)
PLATFORM_KEY: Ed25519PrivateKey = _PK
PLATFORM_PUB = load_public_key(VECTORS / "platform-test.pub")
GW = "gw-cmd-1"


class FixedClock:
    """A wall clock the test sets (the Clock seam every component takes)."""

    def __init__(self, now: float, synced: bool = True) -> None:
        self.now, self.synced = now, synced

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def synchronized(self) -> bool:
        return self.synced


class RealClock(FixedClock):
    def __init__(self) -> None:
        super().__init__(0.0)

    def time(self) -> float:
        return time.time()


def processor(tmp_path: Path, *, gw: str = GW, clock: FixedClock | None = None,
              hooks: CommandHooks | None = None, audit: AuditTrail | None = None,
              **cfg: Any) -> tuple[CommandProcessor, Ed25519PrivateKey]:
    gateway_key = Ed25519PrivateKey.generate()
    config = CommandsConfig(platform_key=VECTORS / "platform-test.pub", **cfg)
    proc = CommandProcessor(config, gw=gw, platform_key=PLATFORM_PUB, gateway_key=gateway_key,
                            state_dir=tmp_path, clock=clock or RealClock(),
                            hooks=hooks or CommandHooks(), audit=audit)
    return proc, gateway_key


def test_vectors_are_what_the_encoder_makes() -> None:
    """The published command vectors are byte for byte what make_vectors.py produces."""
    for name, data in make_vectors.make().items():
        assert (VECTORS / name).read_bytes() == data, name
    assert (VECTORS / "platform-test.pub").read_bytes() == make_vectors.pem_pair(
        make_vectors.PLATFORM)[1]


async def test_vectors_replayed_in_order(tmp_path: Path) -> None:
    """Each vector gets its documented answer: accepted ones run, every refusal has its reason,
    and each ack is signed by the gateway and names the exact command bytes."""
    pulses: list[tuple[str, float]] = []
    levels: list[str] = []

    async def pulse(name: str, seconds: float) -> None:
        pulses.append((name, seconds))

    hooks = CommandHooks(status=lambda: {"state": "online"}, pulse=pulse,
                         set_log_level=levels.append)
    proc, gkey = processor(tmp_path, gw=EXPECTED["gw"], clock=FixedClock(EXPECTED["now"]),
                           hooks=hooks, allow_outputs=EXPECTED["allow_outputs"])
    got = []
    for case in EXPECTED["cases"]:
        ack = await proc.handle((VECTORS / case["file"]).read_bytes())
        got.append({"file": case["file"], "ok": ack.ok, "err": ack.err, "seq": ack.seq,
                    "h": ack.h.hex()})
        signed = decode_ack(encode_ack(gkey, ack), gkey.public_key())
        assert signed == ack
    assert got == EXPECTED["cases"]
    assert pulses == [("door_strike", 1.5)]
    assert levels == ["debug"]
    assert proc.stats.accepted == 3 and sum(proc.stats.rejected.values()) == 9


async def test_seq_survives_restart(tmp_path: Path) -> None:
    """The accepted seq is on disk before the command runs: after a restart the same command is
    a replay and an older one is out of order."""
    proc, _ = processor(tmp_path)
    first = make_command(PLATFORM_KEY, GW, "ping", seq=50)
    assert (await proc.handle(first)).ok
    assert stat.S_IMODE((tmp_path / "commands.json").stat().st_mode) == 0o600
    again, _ = processor(tmp_path)
    assert (await again.handle(first)).err == "replay"
    assert (await again.handle(make_command(PLATFORM_KEY, GW, "ping", seq=49))).err == (
        "out-of-order")
    assert (await again.handle(make_command(PLATFORM_KEY, GW, "ping", seq=51))).ok


def test_corrupt_seq_state_is_refused(tmp_path: Path) -> None:
    """A damaged sequence file stops the processor instead of reopening old commands."""
    (tmp_path / "commands.json").write_text("{not json")
    with pytest.raises(CommandError, match="unreadable"):
        SeqStore(tmp_path / "commands.json")


async def test_unsynced_clock_allows_only_read_only(tmp_path: Path) -> None:
    """Without a synchronised clock expiry cannot be judged: ping runs, pulse is refused."""
    clock = FixedClock(1.0, synced=False)  # a Pi just booted without RTC: 1970
    proc, _ = processor(tmp_path, clock=clock, allow_outputs={"door_strike": 2.0})
    assert (await proc.handle(make_command(PLATFORM_KEY, GW, "ping", seq=1))).ok
    ack = await proc.handle(make_command(PLATFORM_KEY, GW, "pulse",
                                         {"output": "door_strike", "seconds": 1}, seq=2))
    assert (ack.ok, ack.err) == (False, "clock-unsynced")


@pytest.mark.parametrize(("args", "reason"), [
    ({"output": "door_strike", "seconds": 5}, "not-allowed"),  # longer than allowed
    ({"output": "door_strike"}, "bad-args"),
    ({"output": "vault_lock", "seconds": 1}, "not-allowed"),
])
async def test_pulse_limits(tmp_path: Path, args: dict[str, Any], reason: str) -> None:
    """pulse drives only outputs the config allows, never longer than allowed."""
    proc, _ = processor(tmp_path, allow_outputs={"door_strike": 2.0})
    ack = await proc.handle(make_command(PLATFORM_KEY, GW, "pulse", args, seq=1))
    assert (ack.ok, ack.err) == (False, reason)


async def test_missing_hook_and_unknown_command(tmp_path: Path) -> None:
    """A command whose hook is not wired is `unavailable`; an unknown name is refused."""
    proc, _ = processor(tmp_path)
    assert (await proc.handle(make_command(PLATFORM_KEY, GW, "doctor", seq=1))).err == (
        "unavailable")
    assert (await proc.handle(make_command(PLATFORM_KEY, GW, "reboot", seq=2))).err == (
        "unknown-command")
    assert (await proc.handle(b"\xff" * 100)).err == "malformed"


async def test_log_level_reverts(tmp_path: Path) -> None:
    """log-level applies a level for the given time, then restores the configured one."""
    levels: list[str] = []
    proc, _ = processor(tmp_path, hooks=CommandHooks(set_log_level=levels.append,
                                                     default_log_level="warning"))
    ack = await proc.handle(make_command(PLATFORM_KEY, GW, "log-level",
                                         {"level": "debug", "seconds": 0.05}, seq=1))
    assert ack.ok and levels == ["debug"]
    async with asyncio.timeout(5):
        while levels != ["debug", "warning"]:
            await asyncio.sleep(0.01)


async def test_refusals_are_audited(tmp_path: Path) -> None:
    """A refused command lands in the local audit log and as an audit event; verify passes."""
    events: list[Event] = []

    async def emit(ev: Event) -> None:
        events.append(ev)

    trail = AuditTrail(AuditLog(tmp_path / "audit" / "audit.log"), emit, RealClock())
    proc, _ = processor(tmp_path, audit=trail)
    await proc.handle((VECTORS / "09-wrong-key.cose").read_bytes())
    await proc.handle(make_command(PLATFORM_KEY, GW, "ping", seq=1))
    assert [e.type for e in events] == ["audit.command_rejected", "audit.command_accepted"]
    assert events[0].attrs is not None and events[0].attrs["reason"] == "unknown-key"
    assert events[0].prio == 1 and events[0].v == "platform"
    assert verify(tmp_path / "audit" / "audit.log").records == 2


async def test_every_refusal_is_audited_with_its_reason(tmp_path: Path) -> None:
    """Expired, replayed, out-of-order, wrong-gateway, forged and unknown-key commands are each
    audited as audit.command_rejected with their reason code (the vectors, in order)."""
    events: list[Event] = []

    async def emit(ev: Event) -> None:
        events.append(ev)

    async def pulse(name: str, seconds: float) -> None:
        del name, seconds

    trail = AuditTrail(AuditLog(tmp_path / "audit" / "audit.log"), emit,
                       FixedClock(EXPECTED["now"]))
    proc, _ = processor(tmp_path, gw=EXPECTED["gw"], clock=FixedClock(EXPECTED["now"]),
                        hooks=CommandHooks(status=lambda: {"state": "online"}, pulse=pulse,
                                           set_log_level=lambda _level: None),
                        allow_outputs=EXPECTED["allow_outputs"], audit=trail)
    for case in EXPECTED["cases"]:
        await proc.handle((VECTORS / case["file"]).read_bytes())
    refused = [c["err"] for c in EXPECTED["cases"] if not c["ok"]]
    audited = [e.attrs["reason"] for e in events
               if e.type == "audit.command_rejected" and e.attrs is not None]
    assert audited == refused
    assert {"expired", "replay", "bad-signature", "unknown-key", "wrong-gateway"} <= set(refused)
    assert verify(tmp_path / "audit" / "audit.log").ok


async def test_a_hook_that_raises_fails_the_command_not_the_agent(tmp_path: Path) -> None:
    """A hook's exception is the command's failure: the ack says `failed` and carries no
    exception text or traceback; the processor goes on with the next command."""
    def broken() -> Mapping[str, Any]:
        raise RuntimeError("secret internals /etc/branch-agent/keys/signing.key")

    proc, gkey = processor(tmp_path, hooks=CommandHooks(status=broken))
    ack = await proc.handle(make_command(PLATFORM_KEY, GW, "status", seq=1))
    assert (ack.ok, ack.err, ack.result) == (False, "failed", None)
    wire = encode_ack(gkey, ack)
    assert b"secret" not in wire and b"Traceback" not in wire and b"RuntimeError" not in wire
    assert (await proc.handle(make_command(PLATFORM_KEY, GW, "ping", seq=2))).ok


async def test_queue_is_bounded(tmp_path: Path) -> None:
    """A flood of commands is dropped beyond the queue, counted, and never waited for."""
    proc, _ = processor(tmp_path, queue=4)

    async def reply(_b: bytes) -> None:
        return None

    for _ in range(100):
        proc.submit(b"x", reply)
    assert (proc.stats.received, proc.stats.dropped) == (100, 96)


async def test_rotate_key_announces_with_old_key(tmp_path: Path) -> None:
    """rotate-key writes the next key (0600), puts its public key in a priority-1
    gateway.key_rotated event in the outbox, and hands the key to the forwarder's hook."""
    key_file = tmp_path / "keys" / "signing.key"
    key_file.parent.mkdir()
    announced: list[tuple[Ed25519PrivateKey, int]] = []
    async with await Outbox.open(tmp_path / "outbox.db") as outbox:
        hook = make_rotate_hook(key_file, outbox.append, RealClock(),
                                lambda k, i: announced.append((k, i)))
        proc, _ = processor(tmp_path, hooks=CommandHooks(rotate_key=hook))
        ack = await proc.handle(make_command(PLATFORM_KEY, GW, "rotate-key", seq=1))
        assert ack.ok and ack.result is not None
        new = load_private_key(tmp_path / "keys" / "next" / "signing.key")
        assert stat.S_IMODE((tmp_path / "keys" / "next" / "signing.key").stat().st_mode) == 0o600
        assert ack.result["kid"] == kid_for(new.public_key()).hex()
        assert len(announced) == 1 and announced[0][1] == ack.result["event"]
        old = Ed25519PrivateKey.generate()
        batch = await outbox.claim_batch(10, 1 << 20, Signer(old, GW, lambda: 1.0).build)
        assert batch is not None
        decoded = verify_batch(batch.data, {kid_for(old.public_key()): old.public_key()}.get)
        (event,) = decoded.events
        raw = new.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert (event["type"], event["prio"], event["attrs"]["pub"]) == (
            "gateway.key_rotated", 1, raw.hex())


# --- end to end through a real mosquitto --------------------------------------------------------


class Gateway:
    """The agent's side: a real MqttUplink feeding a CommandProcessor."""

    def __init__(self, broker: Mosquitto, pki: Pki, proc: CommandProcessor) -> None:
        cfg = MqttUplinkConfig.model_validate({
            "host": "127.0.0.1", "port": broker.port, "backoff_base": 0.05,
            "backoff_max": 0.5, "connect_timeout": 5.0,
            "tls": {"ca": pki.ca_cert, "cert": pki.client_cert, "key": pki.client_key}})
        self.uplink = MqttUplink(cfg, GW)
        self.proc = proc
        self.uplink.set_command_handler(
            lambda raw: proc.submit(raw, self.uplink.publish_command_ack))
        self.tasks = [asyncio.create_task(self.uplink.run(lambda _a: None, lambda _s: None)),
                      asyncio.create_task(proc.run())]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def gateway_factory(
    mosquitto_tls: Mosquitto, pki: Pki,
) -> AsyncIterator[Callable[[CommandProcessor], Gateway]]:
    started: list[Gateway] = []

    def start(proc: CommandProcessor) -> Gateway:
        gw = Gateway(mosquitto_tls, pki, proc)
        started.append(gw)
        return gw

    try:
        yield start
    finally:
        for gw in started:
            await gw.stop()


async def platform_send(broker: Mosquitto, pki: Pki, gkey: Ed25519PrivateKey, cmd: str,
                        args: Mapping[str, Any] | None = None, seq: int | None = None,
                        data: bytes | None = None) -> CommandAck:
    data = data or make_command(PLATFORM_KEY, GW, cmd, args, seq=seq)
    return await asyncio.to_thread(
        send_command, "127.0.0.1", broker.port, GW, data,
        tls=PlatformTls(pki.ca_cert, pki.platform_cert, pki.platform_key),
        gateway_key=gkey.public_key(), timeout=10.0)


async def connected(gw: Gateway) -> None:
    async with asyncio.timeout(10):
        while not gw.uplink.connected:
            await asyncio.sleep(0.02)


async def test_e2e_each_command(tmp_path: Path, mosquitto_tls: Mosquitto, pki: Pki,
                                gateway_factory: Callable[[CommandProcessor], Gateway]) -> None:
    """ping, status, doctor, log-level, rotate-key and pulse each go platform -> broker -> agent
    and come back as a verified, accepted cmd-ack with their result; the door strike pin pulses."""
    factory = MockFactory()
    strike = DigitalOutputDevice(17, pin_factory=factory)
    levels: list[str] = []
    config_file = tmp_path / "agent.toml"
    config_file.write_text('[gateway]\nid = "gw-cmd-1"\n[uplink.mqtt]\nhost = "h"\n'
                           'insecure = true\n')

    async def pulse(name: str, seconds: float) -> None:
        strike.on()
        await asyncio.sleep(seconds)
        strike.off()

    async def doctor() -> Mapping[str, Any]:
        check, _cfg = await asyncio.to_thread(check_config, config_file)
        return {"checks": [check.as_dict()]}

    key_file = tmp_path / "keys" / "signing.key"
    key_file.parent.mkdir()
    try:
        async with await Outbox.open(tmp_path / "outbox.db") as outbox:
            hooks = CommandHooks(
                status=lambda: {"state": "online", "path": tmp_path}, doctor=doctor,
                set_log_level=levels.append, pulse=pulse,
                rotate_key=make_rotate_hook(key_file, outbox.append, RealClock(),
                                            lambda _k, _i: None))
            proc, gkey = processor(tmp_path, hooks=hooks, allow_outputs={"door_strike": 1.0})
            gw = gateway_factory(proc)
            await connected(gw)
            cases: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
                ("ping", {}, lambda r: r == {"pong": True}),
                ("status", {}, lambda r: r["state"] == "online"),
                ("doctor", {}, lambda r: r["checks"][0]["status"] == "pass"),
                ("log-level", {"level": "debug", "seconds": 60}, lambda r: r["level"] == "debug"),
                ("rotate-key", {}, lambda r: len(r["kid"]) == 32),
                ("pulse", {"output": "door_strike", "seconds": 0.05},
                 lambda r: r["output"] == "door_strike"),
            ]
            for seq, (cmd, args, check) in enumerate(cases, start=1):
                ack = await platform_send(mosquitto_tls, pki, gkey, cmd, args, seq=seq)
                assert (ack.ok, ack.err, ack.seq, ack.gw) == (True, None, seq, GW), cmd
                assert ack.result is not None and check(ack.result), (cmd, ack.result)
            assert levels == ["debug"]
            states = [s.state for s in factory.pin(17).states]
            assert states[-3:] == [False, True, False]
    finally:
        strike.close()
        factory.close()


async def test_e2e_refusals(tmp_path: Path, mosquitto_tls: Mosquitto, pki: Pki,
                            gateway_factory: Callable[[CommandProcessor], Gateway]) -> None:
    """Through the broker: a replayed, an out-of-order, a forged and an unsigned command are each
    answered with their reason and none of them runs."""
    ran: list[str] = []
    proc, gkey = processor(tmp_path, hooks=CommandHooks(status=lambda: ran.append("s") or {}))
    gw = gateway_factory(proc)
    await connected(gw)
    good = make_command(PLATFORM_KEY, GW, "status", seq=10)
    assert (await platform_send(mosquitto_tls, pki, gkey, "", data=good)).ok
    forged = make_command(Ed25519PrivateKey.generate(), GW, "status", seq=20)
    unsigned = cbor2.dumps(cbor2.loads(good).value[2])
    for data, reason in [(good, "replay"),
                         (make_command(PLATFORM_KEY, GW, "status", seq=9), "out-of-order"),
                         (forged, "unknown-key"), (unsigned, "malformed")]:
        ack = await platform_send(mosquitto_tls, pki, gkey, "", data=data)
        assert (ack.ok, ack.err) == (False, reason)
    assert ran == ["s"]


async def test_platform_cli_command(tmp_path: Path, mosquitto_tls: Mosquitto, pki: Pki,
                                    gateway_factory: Callable[[CommandProcessor], Gateway]
                                    ) -> None:
    """`branch-platform command GW ping` signs, sends, verifies the ack and exits 0."""
    proc, gkey = processor(tmp_path)
    gw = gateway_factory(proc)
    await connected(gw)
    pub = tmp_path / "gw.pub"
    pub.write_bytes(gkey.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    key = tmp_path / "platform.key"
    key.write_bytes((VECTORS / "platform-test.key").read_bytes())
    os.chmod(key, 0o600)
    rc = await asyncio.to_thread(main_command, [
        GW, "ping", "--key", str(key), "--gateway-pub", str(pub), "--port",
        str(mosquitto_tls.port), "--ca", str(pki.ca_cert), "--cert", str(pki.platform_cert),
        "--tls-key", str(pki.platform_key)])
    assert rc == 0
    assert proc.stats.accepted == 1


def test_platform_matches_an_ack_without_the_gateway_key() -> None:
    """`branch-platform command` without --gateway-pub still recognises the ack of its command
    (read unverified through the one COSE_Sign1 parser) and ignores others and garbage."""
    from branchsim.platform.commands import _match

    gkey = Ed25519PrivateKey.generate()
    h = b"\x01" * 32
    ack = CommandAck(gw=GW, seq=3, h=h, ok=True, t=1.0, result={"pong": True})
    raw = encode_ack(gkey, ack)
    assert _match(raw, h, None) == ack
    assert _match(raw, b"\x02" * 32, None) is None
    assert _match(b"\xff\x00garbage", h, None) is None
    assert _match(raw, h, gkey.public_key()) == ack
