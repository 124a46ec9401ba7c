"""`branch-sim fleet` (branchsim.fleet) with real parts: a real mosquitto and the reference
platform (Receiver + MqttPlatformServer) in-process; the fleet's batches are verified, chained
and stored by the platform exactly as an agent's would be."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from branchsim.fleet import Fleet, FleetConfig, FleetTls, read_registry
from branchsim.platform.receiver import Receiver
from tests.support.broker import Mosquitto, get_free_port
from tests.support.pki import Pki

CLI = [sys.executable, "-m", "branchsim.cli", "fleet"]


def _register(rx: Receiver, fleet: Fleet) -> None:
    for gw, pem in fleet.registry():
        rx.register(gw, pem)


def _check_delivered(rx: Receiver, fleet: Fleet) -> None:
    """Every event each gateway produced is stored exactly once, and each platform chain ends
    where the gateway's acknowledged batches do."""
    for gw in fleet.gateways:
        st = fleet.gateway(gw)
        assert st.produced > 0, gw
        everything = list(range(1, st.produced + 1))
        assert rx.delivered_ids(gw) == everything, gw  # from the stored batch bytes
        assert len(rx.events(gw)) == st.produced, gw
        assert sorted(i for b in st.acked for i in b.ids) == everything, gw  # the fleet's view
        assert sorted(b.seq for b in st.acked) == list(range(1, len(st.acked) + 1)), gw
        assert rx.batch_count(gw) == len(st.acked) == st.last_signed_seq, gw
        assert rx.chain_head(gw) == st.head, gw


async def test_fleet_cut_restore_delivers_every_event_once(platform: Receiver,
                                                           broker: Mosquitto) -> None:
    """20 gateways; a quarter lose their WAN mid-run, stay offline (nothing of theirs reaches
    the platform) while their events pile up, come back and drain: every event of every
    gateway is stored exactly once and every chain ends at the gateway's last acked batch."""
    cfg = FleetConfig(gateways=20, rate=8.0, brokers=[("127.0.0.1", broker.port)],
                      flush_s=0.3, ack_timeout_s=5.0, seed=1, record_acked=True)
    fleet = Fleet(cfg)
    _register(platform, fleet)
    async with fleet:
        await fleet.wait_connected(10)
        await fleet.wait_until(lambda: all(fleet.gateway(gw).acked for gw in fleet.gateways), 10)

        cut = fleet.cut(0.25, seed=7)
        assert len(cut) == 5
        kept = [gw for gw in fleet.gateways if gw not in cut]
        await fleet.wait_until(lambda: not any(fleet.gateway(gw).connected for gw in cut), 5)
        offline_at = time.monotonic()
        at_cut = {gw: fleet.gateway(gw) for gw in fleet.gateways}
        # The cut gateways keep producing, the others keep delivering.
        await fleet.wait_until(lambda: all(
            fleet.gateway(gw).produced >= at_cut[gw].produced + 16 for gw in cut) and all(
            fleet.gateway(gw).head[0] >= at_cut[gw].head[0] + 2 for gw in kept), 10)
        for gw in cut:
            st = fleet.gateway(gw)
            assert not st.connected and st.cut
            assert st.last_signed_seq == at_cut[gw].last_signed_seq  # nothing signed offline
            assert rx_seq(platform, gw) <= at_cut[gw].last_signed_seq  # nor received
        restored_at = time.monotonic()
        assert sorted(fleet.restore()) == sorted(cut)

        await fleet.wait_connected(10)
        await fleet.wait_until(lambda: all(
            fleet.gateway(gw).head[0] > at_cut[gw].last_signed_seq for gw in cut), 10)
        fleet.stop_producing()
        await fleet.wait_drained(15)
        stats = fleet.stats()

    for gw in cut:
        st = fleet.gateway(gw)
        assert not [c for c in st.connections if offline_at <= c[0] < restored_at and c[1]]
        assert not [b for b in st.acked if offline_at <= b.acked_at < restored_at]
        # its backlog went in batches bigger than any a connected gateway makes
        assert max(len(b.ids) for b in st.acked) > max(len(b.ids) for b in at_cut[gw].acked)
    _check_delivered(platform, fleet)
    assert stats.events_acked == stats.events_produced == sum(
        fleet.gateway(gw).produced for gw in fleet.gateways)
    assert stats.refusals == {}
    assert stats.latency_samples == stats.batches_acked > 0
    assert stats.latency_p50_s is not None and stats.latency_p99_s is not None
    after = fleet.stats()  # leaving the context disconnected every gateway
    assert after.connected == 0 and after.disconnects == stats.disconnects + 20


def rx_seq(rx: Receiver, gw: str) -> int:
    return rx.chain_head(gw)[0]


async def test_a_gateway_moves_to_the_next_broker(platform: Receiver, broker: Mosquitto) -> None:
    """A gateway whose broker is down moves to the next one in the list and delivers there."""
    dead = get_free_port()
    cfg = FleetConfig(gateways=4, rate=10.0, flush_s=0.2, seed=2, record_acked=True,
                      brokers=[("127.0.0.1", dead), ("127.0.0.1", broker.port)])
    fleet = Fleet(cfg)
    _register(platform, fleet)
    async with fleet:
        await fleet.wait_connected(10)
        assert {fleet.gateway(gw).broker[1] for gw in fleet.gateways} == {broker.port}
        fleet.stop_producing()
        await fleet.wait_drained(10)
        stats = fleet.stats()
    assert stats.connect_failures >= 2  # the gateways that started on the dead one
    _check_delivered(platform, fleet)


async def test_fleet_over_mutual_tls(tls_platform: Receiver, mosquitto_tls: Mosquitto,
                                    pki: Pki) -> None:
    """Over mutual TLS (one client certificate for the whole fleet), a gateway cut and restored
    still delivers every event once: a cut drops its TLS connection like a plain one."""
    cfg = FleetConfig(gateways=3, rate=10.0, brokers=[("127.0.0.1", mosquitto_tls.port)],
                      tls=FleetTls(pki.ca_cert, pki.client_cert, pki.client_key),
                      flush_s=0.2, seed=3, record_acked=True)
    fleet = Fleet(cfg)
    _register(tls_platform, fleet)
    async with fleet:
        await fleet.wait_connected(10)
        (cut,) = fleet.cut(1 / 3, seed=1)
        await fleet.wait_until(lambda: not fleet.gateway(cut).connected, 5)
        produced = fleet.gateway(cut).produced
        await fleet.wait_until(lambda: fleet.gateway(cut).produced >= produced + 5, 5)
        fleet.restore()
        await fleet.wait_connected(10)
        fleet.stop_producing()
        await fleet.wait_drained(10)
        stats = fleet.stats()
    assert stats.disconnects == 1 and stats.refusals == {}
    _check_delivered(tls_platform, fleet)


async def _cli(*args: str) -> tuple[int, str]:
    """Run `branch-sim fleet ARGS` to its end (killed after 30 s): exit code, stdout."""
    proc = await asyncio.create_subprocess_exec(*CLI, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_cli_runs_a_fleet_and_prints_final_stats(tmp_path: Path, platform: Receiver,
                                                       broker: Mosquitto) -> None:
    """`branch-sim fleet` as a subprocess: with --seed, `--registry-only` writes the keys a
    later run signs with, and the run's last line is the final JSON stats of a drained run."""
    reg = tmp_path / "registry.jsonl"
    common = ["--gateways", "3", "--rate", "5", "--broker", f"127.0.0.1:{broker.port}",
              "--seed", "5", "--name", "cli", "--flush", "0.2"]
    assert await _cli(*common, "--registry-out", str(reg), "--registry-only") == (0, "")
    registry = read_registry(reg)
    assert [gw for gw, _ in registry] == ["cli-00001", "cli-00002", "cli-00003"]
    for gw, pem in registry:
        platform.register(gw, pem)

    rc, out = await _cli(*common, "--duration", "2", "--stats-every", "1")
    lines = [json.loads(x) for x in out.splitlines()]
    assert rc == 0
    final = lines[-1]
    assert final["final"] is True and final["drained"] is True
    assert final["gateways"] == 3
    assert final["events_produced"] == final["events_acked"] > 0
    assert len(lines) >= 2  # a periodic line before the final one
    assert sum(len(platform.delivered_ids(gw)) for gw, _ in registry) == final["events_acked"]
