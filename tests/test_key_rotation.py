"""Key rotation end to end: a signed rotate-key command through a real mosquitto makes the agent
announce its next key in a batch signed by the current one; once that batch is acked the agent
signs with the new key, the platform accepts it (and retires the old), and the key files are
replaced on disk. Also: ping and status through the real agent process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import protocol
from agent.security.keys import load_public_key
from branchsim.broker import Mosquitto
from branchsim.platform.commands import make_command, send_command
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until


def kids(rx: Receiver, gw: str) -> list[bytes]:
    with rx._lock:  # the reference platform's own table; read-only here
        return [bytes(r[0]) for r in rx._db.execute("SELECT kid FROM gateways WHERE gw=?",
                                                    (gw,))]


def test_rotate_key_command_switches_the_signing_key(tmp_path: Path, broker: Mosquitto,
                                                     platform: Receiver) -> None:
    """ping and status answer; rotate-key announces the new key (signed by the old), the
    agent switches after the ack, later batches verify under the new kid, the old kid is
    retired at the platform, and keys/signing.key holds the new key (mode 0600)."""
    cmd_key = Ed25519PrivateKey.generate()
    cmd_pub = tmp_path / "platform-cmd.pub"
    cmd_pub.write_bytes(cmd_key.public_key().public_bytes(Encoding.PEM,
                                                          PublicFormat.SubjectPublicKeyInfo))
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, None)},
        sources={"synthetic": [{"name": "load", "rate_hz": 50.0, "waveform": "counter"}]},
        commands={"platform_key": str(cmd_pub)},
    )
    platform.register(agent.gw, agent.pubkey.read_bytes())
    old_kid = protocol.kid_for(load_public_key(agent.pubkey))
    agent.start()
    try:
        wait_until(lambda: len(platform.events(agent.gw)) >= 20, 30, "first events", agent)
        gw_pub = load_public_key(agent.pubkey)
        seq = 1

        def command(cmd: str) -> dict:  # type: ignore[type-arg]
            nonlocal seq
            seq += 1
            ack = send_command("127.0.0.1", broker.port, agent.gw,
                               make_command(cmd_key, agent.gw, cmd, seq=seq),
                               gateway_key=gw_pub, timeout=15)
            assert ack.ok, (cmd, ack)
            return dict(ack.result or {})

        command("ping")
        status = command("status")
        assert status.get("gateway") == agent.gw
        rotated = command("rotate-key")
        new_kid = bytes.fromhex(rotated["kid"])
        assert new_kid != old_kid

        def signed_by_new_key() -> bool:
            return new_kid in kids(platform, agent.gw) and old_kid not in kids(platform,
                                                                                agent.gw)

        wait_until(signed_by_new_key, 30, "old kid retired after a batch signed by the new", agent)
        n = len(platform.events(agent.gw))
        wait_until(lambda: len(platform.events(agent.gw)) >= n + 50, 30,
                   "events keep arriving under the new key", agent)
    finally:
        assert agent.stop() == 0
    announce = [e for e in platform.events(agent.gw) if e["type"] == "gateway.key_rotated"]
    assert len(announce) == 1 and announce[0]["attrs"]["kid"] == new_kid.hex()
    assert protocol.kid_for(load_public_key(agent.pubkey)) == new_kid
    assert (agent.keys / "signing.key").stat().st_mode & 0o777 == 0o600
    assert not [r for r in platform.counters() if r[1] not in ("replay",)], platform.counters()
    audit = (agent.state / "audit" / "audit.log").read_text()
    assert "audit.key_rotated" in audit


async def test_pulse_command_drives_a_configured_output(tmp_path: Path, broker: Mosquitto,
                                                        platform: Receiver) -> None:
    """A signed pulse command switches a configured GPIO output on for the asked time and off
    again (seen on the pin's recorded states); an output the config does not allow is refused
    and the pin never moves."""
    import asyncio

    from gpiozero.pins.mock import MockFactory

    from agent.config import parse_config
    from agent.runtime.root import Runtime
    from agent.security.keys import generate_keypair

    cmd_key = Ed25519PrivateKey.generate()
    cmd_pub = tmp_path / "platform-cmd.pub"
    cmd_pub.write_bytes(cmd_key.public_key().public_bytes(Encoding.PEM,
                                                          PublicFormat.SubjectPublicKeyInfo))
    info = generate_keypair(tmp_path / "keys")
    gw = "gw-pulse"
    platform.register(gw, info.public_pem)
    cfg = parse_config({
        "gateway": {"id": gw, "state_dir": str(tmp_path / "state"),
                    "runtime_dir": str(tmp_path / "run"),
                    "key_file": str(tmp_path / "keys" / "signing.key"), "time_sync": "synced"},
        "uplink": {"order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, None)},
        "sources": {"gpio": {"pin_factory": "mock", "outputs": {
            "pulse": {"door_strike": 17, "siren": 18}}}},
        "commands": {"platform_key": str(cmd_pub), "allow_outputs": {"door_strike": 1.0}},
    })
    factory = MockFactory()
    rt = Runtime(cfg, pin_factory=factory)
    stop = asyncio.Event()
    task = asyncio.create_task(rt.run(stop))
    try:
        async with asyncio.timeout(20):
            await rt.ready.wait()
            while not rt.uplinks[0].connected:
                await asyncio.sleep(0.02)  # polling interval of a condition wait
        gw_pub = info.public_pem
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        pub = load_pem_public_key(gw_pub)

        def send(seq: int, output: str) -> Any:
            return send_command("127.0.0.1", broker.port, gw,
                                make_command(cmd_key, gw, "pulse",
                                             {"output": output, "seconds": 0.3}, seq=seq),
                                gateway_key=pub, timeout=15)  # type: ignore[arg-type]

        ack = await asyncio.to_thread(send, 1, "door_strike")
        assert ack.ok, ack
        refused = await asyncio.to_thread(send, 2, "siren")
        assert not refused.ok and refused.err == "not-allowed"
    finally:
        stop.set()
        await task
    strike = [s.state for s in factory.pin(17).states]
    assert strike[-2:] == [True, False] and strike.count(True) == 1
    assert all(not s.state for s in factory.pin(18).states)
