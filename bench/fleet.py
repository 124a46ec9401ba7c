"""The platform at fleet scale (issue 17, docs/SCALE.md): events/s verified and stored, and p99
batch latency, of 1,000 simulated gateways on a 3-node NATS cluster (replicas 3, mutual TLS)
with PostgreSQL, for 1 and for 2 receivers, all on this machine; beside the same run's raw
ceilings: COPY into the same events table alone, and publishing the same batch bytes into the
same stream alone.

    .venv/bin/python bench/fleet.py [--gateways 1000] [--rate 60] [--duration 300] [--quick]

The fleet offers more than the platform takes (`--rate` events/s per gateway: 60,000/s), so
each gateway's outbox grows and its batches fill up to 500 events, as in a regional drain; what
is measured is what the platform acknowledged (an ack goes out only after the commit) over
`--duration` seconds after a warm-up, and the stored rows are counted in PostgreSQL at both ends
of the window as a check.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import psycopg
from _common import Row, add_common_args, machine, print_table, summarise, write_json
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.log import configure_logging
from agent.protocol import ZERO_HASH, build_batch, decode_batch, encode_event, kid_for
from branchsim.fleet import Fleet, FleetConfig, FleetTls
from branchsim.fleetplatform import FleetPlatform

TARGET = 50_000.0


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


def fleet_run(dir: Path, receivers: int, args: argparse.Namespace, rate: float,
              duration: float) -> dict[str, float]:
    with FleetPlatform(dir, nodes=3, receivers=receivers, workers=args.workers) as platform:
        pki = platform.pki
        assert pki is not None
        # The ack timeout is long: saturated, 1,000 gateways x 4 batches x 500 events in flight
        # take longer than the agent's 15 s to get through, and every gateway would send its
        # window again (docs/SCALE.md, "where it breaks first").
        cfg = FleetConfig(gateways=args.gateways, rate=rate, brokers=platform.nats.mqtt,
                          tls=FleetTls(pki.ca_cert, pki.client_cert, pki.client_key),
                          flush_s=1.0, batch_max=500, window=4, ack_timeout_s=300.0, seed=5)
        fleet = Fleet(cfg)
        platform.register(fleet.registry())
        out: dict[str, float] = {}

        async def go() -> None:
            async with fleet:
                await fleet.wait_connected(300)
                await asyncio.sleep(args.warmup)  # the measured window starts after a warm-up
                s0, n0, t0 = fleet.stats(), _count(platform.dsn), time.monotonic()
                await asyncio.sleep(duration)  # the measured window
                s1, n1, t1 = fleet.stats(), _count(platform.dsn), time.monotonic()
                out.update(
                    acked_per_s=(s1.events_acked - s0.events_acked) / (t1 - t0),
                    stored_per_s=(n1 - n0) / (t1 - t0),
                    offered_per_s=(s1.events_produced - s0.events_produced) / (t1 - t0),
                    p99_ms=(s1.latency_p99_s or 0.0) * 1000,
                    p50_ms=(s1.latency_p50_s or 0.0) * 1000,
                    fleet_cpu=(s1.cpu_s - s0.cpu_s) / (t1 - t0),
                    resent=s1.batches_resent - s0.batches_resent,
                    refusals=sum(s1.refusals.values()),
                )

        asyncio.run(go())
        return out


def _signed(n: int, gw: str = "gw-ceiling") -> bytes:
    """One signed batch of `n` telemetry events, as a gateway sends them."""
    key = Ed25519PrivateKey.generate()
    t = time.time()
    return build_batch(key=key, kid=kid_for(key.public_key()), gw=gw, seq=1, prev=ZERO_HASH,
                       created=t, epoch=os.urandom(16),
                       encoded_events=[encode_event(id=i + 1, t=t + i / 1000, tq=1,
                                                    src="ble:t1", type="temperature", v=21.5,
                                                    u="Cel", prio=3) for i in range(n)])


def copy_ceiling(dir: Path, seconds: float) -> float:
    """Rows/s of COPY alone into the platform's events table: the receiver's own COPY
    (`PgReceiver.copy_events`), rows of the same shape, 500 rows a transaction (one batch),
    one connection; the rows are made before the clock starts."""
    from branchsim.platform.pgstore import event_rows

    batch, _, _ = decode_batch(_signed(500))
    with FleetPlatform(dir, nodes=1, receivers=0, tls=False) as platform:
        store = platform.store()
        conn = psycopg.connect(platform.dsn)
        try:
            rows, copy_s = 0, 0.0
            while copy_s < seconds:
                loads = [(b, event_rows(b)) for b in  # new epochs: new keys, not timed
                         (dataclasses.replace(batch, epoch=os.urandom(16)) for _ in range(100))]
                start = time.monotonic()
                for b, r in loads:
                    with conn.transaction():
                        store.copy_events(conn, b, r)
                    rows += len(r)
                copy_s += time.monotonic() - start
        finally:
            conn.close()
            store.close()
        return rows / copy_s


def publish_ceiling(dir: Path, seconds: float, clients: int = 8) -> float:
    """Events/s of the same batch bytes (500 events, signed) published over MQTT with mutual
    TLS into the replicated stream, QoS 1, with no receiver: the bus alone."""
    import nats

    from branchsim.platform.bus import STREAM, ensure_stream

    with FleetPlatform(dir, nodes=3, receivers=0) as platform:
        pki = platform.pki
        assert pki is not None

        async def make_stream() -> None:
            import ssl
            ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
            ctx.load_cert_chain(str(pki.platform_cert), str(pki.platform_key))
            nc = await nats.connect(platform.nats.urls, tls=ctx, tls_hostname="localhost")
            js = nc.jetstream()
            await ensure_stream(js, "bank/v1", replicas=3, max_bytes=3 << 30)
            await nc.close()

        asyncio.run(make_stream())
        raw = _signed(500)
        acked = [0] * clients
        stop = threading.Event()

        def publisher(i: int) -> None:
            # a window of WINDOW batches in flight per client, as a gateway keeps its window
            window = threading.Semaphore(4)

            def on_publish(*_: object) -> None:
                acked[i] += 1
                window.release()

            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ceiling-{i}",
                            protocol=paho.MQTTv311, clean_session=True)
            c.tls_set(ca_certs=str(pki.ca_cert), certfile=str(pki.client_cert),
                      keyfile=str(pki.client_key))
            c.max_inflight_messages_set(4)
            c.on_publish = on_publish
            host, port = platform.nats.mqtt[i % 3]
            c.connect(host, port)
            c.loop_start()
            try:
                while not stop.is_set():
                    if window.acquire(timeout=1):
                        c.publish(f"bank/v1/ceiling-{i}/batch", raw, qos=1)
            finally:
                c.disconnect()
                c.loop_stop()

        threads = [threading.Thread(target=publisher, args=(i,)) for i in range(clients)]
        start = time.monotonic()
        for th in threads:
            th.start()
        stop.wait(seconds)  # the measured window
        stop.set()
        for th in threads:
            th.join(30)
        elapsed = time.monotonic() - start

        async def stored() -> int:
            import ssl
            ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
            ctx.load_cert_chain(str(pki.platform_cert), str(pki.platform_key))
            nc = await nats.connect(platform.nats.urls, tls=ctx, tls_hostname="localhost")
            info = await nc.jetstream().stream_info(STREAM)
            await nc.close()
            return int(info.state.messages)

        in_stream = asyncio.run(stored())
        return min(in_stream, sum(acked)) * 500 / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=60.0, help="events/s offered per gateway")
    ap.add_argument("--duration", type=float, default=300.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=3, help="bulk workers per receiver")
    ap.add_argument("--receivers", default="1,2")
    ap.add_argument("--steady-rate", type=float, default=20.0,
                    help="events/s per gateway of the latency run (a branch's real load)")
    ap.add_argument("--steady-duration", type=float, default=60.0)
    ap.add_argument("--keep", type=Path, help="keep the work dirs (logs) here")
    args = ap.parse_args()
    configure_logging("warning")  # the fleet's own log; the receivers log to their files
    if args.quick:
        args.gateways, args.rate, args.duration, args.warmup = 20, 20.0, 3.0, 2.0
        args.steady_duration = 3.0
    ceiling_s = 3.0 if args.quick else 20.0
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    print(f"Machine: {machine()}", flush=True)
    copy_rate = copy_ceiling(base / "copy", ceiling_s)
    print(f"COPY alone: {copy_rate:,.0f} rows/s", flush=True)
    pub_rate = publish_ceiling(base / "publish", ceiling_s)
    print(f"publish alone: {pub_rate:,.0f} events/s", flush=True)
    ceiling = min(copy_rate, pub_rate)
    rows: list[Row] = [
        Row("fleet ceiling, COPY into events alone", copy_rate, "rows/s"),
        Row("fleet ceiling, publish into the stream alone", pub_rate, "events/s",
            note="MQTT QoS 1 with mutual TLS, 8 clients, 500-event batches, replicas 3"),
    ]
    receivers = [int(x) for x in args.receivers.split(",") if x]
    for n in receivers:
        res = fleet_run(base / f"fleet-{n}", n, args, args.rate, args.duration)
        print(f"{n} receiver(s), saturated: {res}", flush=True)
        value, spread = summarise([res["acked_per_s"]])
        rows.append(Row(
            f"fleet, {args.gateways} gateways, {n} receiver(s), stored and acked", value,
            "events/s", spread, baseline=ceiling, baseline_what="slower raw ceiling",
            target=f">= {TARGET:,.0f} events/s", met=value >= TARGET,
            note=(f"offered {res['offered_per_s']:,.0f}/s, counted in PostgreSQL "
                  f"{res['stored_per_s']:,.0f}/s, fleet process {res['fleet_cpu']:.2f} cores, "
                  f"{res['resent']:.0f} batches resent, {res['refusals']:.0f} refusals")))
        rows.append(Row(f"fleet, {n} receiver(s), saturated, batch latency p99 (send to ack)",
                        res["p99_ms"], "ms", note=f"p50 {res['p50_ms']:,.0f} ms"))
    n = receivers[-1]
    res = fleet_run(base / "fleet-steady", n, args, args.steady_rate, args.steady_duration)
    print(f"{n} receiver(s), steady: {res}", flush=True)
    rows.append(Row(
        f"fleet, {n} receiver(s), {args.steady_rate:g} ev/s per gateway, batch latency p99",
        res["p99_ms"], "ms",
        note=(f"p50 {res['p50_ms']:,.0f} ms; offered {res['offered_per_s']:,.0f}/s, acked "
              f"{res['acked_per_s']:,.0f}/s")))
    print()
    print_table(rows)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
