"""The platform at fleet scale under faults (issue 17, docs/SCALE.md): 200 simulated gateways
(branchsim.fleet, the product's protocol code) on a 3-node NATS cluster's MQTT listeners with
mutual TLS, two `branch-platform serve --bus --store postgresql://` receivers as subprocesses,
one PostgreSQL. For a minute: a tenth of the gateways lose their WAN and come back, one NATS
node is killed (SIGKILL) and started again, one receiver is killed and started again. Then:

- every event of every gateway is stored exactly once, counted at the wire: from the raw
  batches the platform stored (its evidence), not from an events table;
- every gateway's chain is unbroken: the stored batches are seq 1..n, each `prev` the hash of
  the one before, and the last is where the gateway's acknowledged batches end;
- nothing was acknowledged that was not committed: every batch a gateway saw acknowledged is
  in the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agent.protocol import ZERO_HASH, batch_hash, decode_batch
from branchsim.fleet import Fleet, FleetConfig, FleetTls
from branchsim.fleetplatform import FleetPlatform

GATEWAYS = 200
RATE = 2.0  # events/s per gateway: 400 events/s and ~130 batches/s for the 2-core CI machine
RUN_S = 60.0


@pytest.fixture
def fleet_platform(tmp_path: Path) -> Iterator[FleetPlatform]:
    with FleetPlatform(tmp_path / "fleet", nodes=3, receivers=2, workers=3) as platform:
        yield platform


def _stored(dsn: str) -> dict[str, list[tuple[int, bytes, bytes]]]:
    """{gw: [(seq, hash, raw)]} of the bulk lane, in seq order, read straight from the store."""
    out: dict[str, list[tuple[int, bytes, bytes]]] = {}
    with psycopg.connect(dsn) as conn:
        for gw, seq, h, raw in conn.execute(
                "SELECT gw, seq, hash, raw FROM batches WHERE lane = 0 ORDER BY gw, seq"):
            out.setdefault(gw, []).append((int(seq), bytes(h), bytes(raw)))
    return out


@pytest.mark.timeout(420)
def test_fleet_survives_a_node_and_a_receiver_killed(fleet_platform: FleetPlatform) -> None:
    platform = fleet_platform
    pki = platform.pki
    assert pki is not None
    cfg = FleetConfig(gateways=GATEWAYS, rate=RATE, brokers=platform.nats.mqtt,
                      tls=FleetTls(pki.ca_cert, pki.client_cert, pki.client_key),
                      flush_s=1.5, ack_timeout_s=15.0, seed=17, record_acked=True)
    fleet = Fleet(cfg)
    platform.register(fleet.registry())

    async def run() -> None:
        async with fleet:
            await fleet.wait_connected(60)
            start = time.monotonic()

            async def at(offset_s: float) -> None:
                await asyncio.sleep(max(0.0, start + offset_s - time.monotonic()))

            await at(10)
            cut = fleet.cut(0.1, seed=3)
            await at(15)
            platform.nats.kill_node(1)
            await at(22)
            platform.receivers[0].kill()
            await at(30)
            await asyncio.to_thread(platform.nats.start_node, 1)
            await at(35)
            fleet.restore()
            await asyncio.to_thread(platform.receivers[0].start)
            await at(RUN_S)
            fleet.stop_producing()
            # a killed receiver's unacked messages come back after the stream's ack wait (30 s),
            # a gateway's unanswered batches after its ack timeout (15 s)
            await fleet.wait_drained(150)
            stats = fleet.stats()
            assert stats.events_acked == stats.events_produced > GATEWAYS * RATE * RUN_S * 0.8
            assert cut and all(fleet.gateway(gw).produced for gw in cut)

    asyncio.run(run())

    stored = _stored(platform.dsn)
    for gw in fleet.gateways:
        st = fleet.gateway(gw)
        batches = stored.get(gw, [])
        # the chain: seq 1..n, each batch's prev the hash of the one before
        assert [seq for seq, _, _ in batches] == list(range(1, len(batches) + 1)), gw
        prev = ZERO_HASH
        ids: list[int] = []
        for seq, h, raw in batches:
            batch, _, _ = decode_batch(raw)
            assert (batch.seq, batch.prev, batch_hash(raw)) == (seq, prev, h), (gw, seq)
            prev = h
            ids += [int(e["id"]) for e in batch.events]
        # exactly once, counted in the stored batches
        assert ids == list(range(1, st.produced + 1)), gw
        # where the gateway's acknowledged batches end, and nothing acked that is not stored
        assert st.head == (len(batches), prev), gw
        hashes = {h for _, h, _ in batches}
        assert all(b.hash in hashes for b in st.acked), gw
    with psycopg.connect(platform.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    assert row is not None and row[0] == sum(fleet.gateway(gw).produced for gw in fleet.gateways)
