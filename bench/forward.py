"""End-to-end delivery: events/s from outbox to platform-acked delete, beside raw paho QoS 1.

    .venv/bin/python bench/forward.py [--events 100000] [--runs 3] [--quick] [--json PATH]
    taskset -c 0 .venv/bin/python bench/forward.py         # everything on one core

What runs where (measured honestly, nothing stubbed):

* a real mosquitto (mutual TLS, persistence on, as in the tests) on a free port;
* the reference platform as its own process (``branch-platform serve``): it verifies each
  COSE_Sign1 batch, checks the hash chain, stores batch and events in its SQLite file (WAL,
  FULL) and publishes the ack;
* the agent's pieces in this process, on one event loop: `Outbox` (pre-filled before the
  clock starts), `Forwarder` + `Signer` (claim 500 events, sign, store, send) and `MqttUplink`
  (paho on the asyncio loop). The clock runs from the forwarder's start (it includes the TLS
  connect) until every event was acknowledged and deleted from the outbox.

Baseline in the same run: the same number of signed batches of the same size, published with
a bare paho client (its own network thread, QoS 1, 8 in flight, same TLS) to a topic nobody
reads; the clock stops at the last PUBACK. No signing, no SQLite, no platform.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import ssl
import tempfile
import threading
import time
import zlib
from pathlib import Path

import paho.mqtt.client as paho
from _common import Row, add_common_args, machine, print_table, summarise, write_json
from _rig import Platform, cpu_seconds
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
)
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.config import OutboxConfig
from agent.core.log import configure_logging
from agent.core.types import TELEMETRY, Event
from agent.outbox import Outbox
from agent.runtime.forwarder import Forwarder, Signer
from agent.uplink.mqtt import MqttTlsConfig, MqttUplink, MqttUplinkConfig
from branchsim.platform.receiver import Receiver
from tests.support.broker import Mosquitto
from tests.support.pki import Pki, make_pki

TARGET = 30_000.0
BATCH = 500
GW = "bench-gw"


def events_for(n: int, now: float) -> list[Event]:
    return [Event(src=f"bench.s{i % 20}", type="temperature", v=20.0 + (i % 100) / 10, t=now,
                  u="Cel", prio=TELEMETRY) for i in range(n)]


async def agent_drain(work: Path, n: int, broker: Mosquitto, pki: Pki,
                      key: Ed25519PrivateKey, ack_mode: str = "platform",
                      fill_cpu: list[float] | None = None) -> float:
    """Pre-fill a fresh outbox with n events, then forward them all: delivered events/s.
    `ack_mode="broker"` is the agent alone: claim, sign, publish, delete on PUBACK; nobody
    verifies (run it with no platform subscribed). `fill_cpu` gets the CPU seconds of the
    pre-fill."""
    t0 = cpu_seconds(os.getpid())
    # The production default window: acks are written with the next claim, not on their own.
    ob = await Outbox.open(work / "outbox.db", quota_bytes=1 << 40,
                           telemetry_window=OutboxConfig().telemetry_window_ms / 1000)
    try:
        evs = events_for(n, time.time())
        for i in range(0, n, 5000):
            await ob.append_many(evs[i:i + 5000])
        if fill_cpu is not None:
            fill_cpu.append(cpu_seconds(os.getpid()) - t0)
        cfg = MqttUplinkConfig(host="127.0.0.1", port=broker.port,
                               client_id=f"bench-agent-{os.getpid()}-{work.name}",
                               tls=MqttTlsConfig(ca=pki.ca_cert, cert=pki.client_cert,
                                                 key=pki.client_key))
        fwd = Forwarder(ob, [MqttUplink(cfg, GW)], Signer(key, GW, time.time),
                        batch_max_events=BATCH, drain_rate_bytes_per_s=0, ack_mode=ack_mode)
        start = time.perf_counter()
        task = asyncio.create_task(fwd.run())
        try:
            while fwd.stats.events_acked < n:
                if task.done():
                    task.result()
                    raise RuntimeError("forwarder stopped")
                await asyncio.sleep(0.005)  # polling interval of a condition wait
            took = time.perf_counter() - start
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stats = await ob.stats()
        assert stats.unclaimed == 0 and stats.in_flight_batches == 0, stats
        assert not fwd.stats.rejections, fwd.stats.rejections
        return n / took
    finally:
        await ob.close()


def sample_batches(n: int, key: Ed25519PrivateKey) -> list[bytes]:
    """Signed batches of BATCH events each, as the signer makes them (same sizes)."""
    signer = Signer(key, GW, time.time)
    now = time.time()
    out = []
    prev = protocol.ZERO_HASH
    for b in range(max(1, n // BATCH)):
        bodies = [protocol.encode_event(id=b * BATCH + i + 1, t=now, tq=0, src=f"bench.s{i % 20}",
                                        type="temperature", v=20.0 + (i % 100) / 10,
                                        prio=TELEMETRY, u="Cel") for i in range(BATCH)]
        data = signer.build(b + 1, prev, bodies)
        prev = protocol.batch_hash(data)
        out.append(data)
    return out


def platform_alone(batches: list[bytes], db: Path, pem: bytes) -> float:
    """The reference platform's batch handling alone: verify and store pre-made batches (one
    chain) with `Receiver.handle_batch`, no transport: events/s."""
    rx = Receiver(db)
    try:
        rx.register(GW, pem)
        start = time.perf_counter()
        for data in batches:
            ack = rx.handle_batch(data, GW)
            if not ack.ok:
                raise RuntimeError(f"platform refused a bench batch: {ack.err}")
        took = time.perf_counter() - start
    finally:
        rx.close()
    return len(batches) * BATCH / took


def raw_publish(batches: list[bytes], broker: Mosquitto, pki: Pki) -> float:
    """Bare paho, QoS 1, same TLS: events/s until the last PUBACK."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{os.getpid()}",
                         protocol=paho.MQTTv5)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    client.tls_set_context(ctx)
    client.max_inflight_messages_set(8)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("raw paho client did not connect")
        start = time.perf_counter()
        infos = [client.publish("bench/raw", data, qos=1) for data in batches]
        for info in infos:
            info.wait_for_publish(30)
        took = time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()
    return len(batches) * BATCH / took


def measure(n: int, runs: int, tmp: Path) -> list[Row]:
    pki = make_pki(tmp / "pki")
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    batches = sample_batches(n, key)
    agent_rates: list[float] = []
    raw_rates: list[float] = []
    alone_rates: list[float] = []
    platform_rates: list[float] = []
    for r in range(runs):
        work = tmp / f"run{r}"
        work.mkdir()
        broker = Mosquitto(work / "broker", tls=pki).start()
        try:
            rx = Receiver(work / "platform.db")
            rx.register(GW, pem)
            rx.close()
            platform = Platform(work / "platform.db", broker.port, pki, work / "platform.log")
            assert broker.proc is not None
            try:
                platform.wait_ready()
                raw_rates.append(raw_publish(batches, broker, pki))
                # CPU seconds per stage (agent: this process; the pre-fill is in it, so it is
                # measured apart), beside the wall time: on a 2-core machine, whether the
                # pipeline is short of CPU or waits (bench/README.md, pipeline efficiency)
                procs = (os.getpid(), platform.proc.pid, broker.proc.pid)
                before = [cpu_seconds(pid) for pid in procs]
                fill: list[float] = []
                agent_rates.append(asyncio.run(agent_drain(work, n, broker, pki, key,
                                                           fill_cpu=fill)))
                e2e = [cpu_seconds(pid) - b for pid, b in zip(procs, before, strict=True)]
                e2e[0] -= fill[0]
            finally:
                platform.stop()
            (work / "alone").mkdir()
            fill = []
            t0 = cpu_seconds(os.getpid())
            alone_rates.append(asyncio.run(agent_drain(work / "alone", n, broker, pki, key,
                                                       ack_mode="broker", fill_cpu=fill)))
            alone_cpu = cpu_seconds(os.getpid()) - t0 - fill[0]
            t0 = cpu_seconds(os.getpid())
            platform_rates.append(platform_alone(batches, work / "platform-alone.db", pem))
            plat_cpu = cpu_seconds(os.getpid()) - t0
            wall = n / agent_rates[-1]
            print(f"run {r + 1}: agent {agent_rates[-1]:,.0f} ev/s, raw paho "
                  f"{raw_rates[-1]:,.0f} ev/s; agent alone {alone_rates[-1]:,.0f} ev/s, "
                  f"platform alone {platform_rates[-1]:,.0f} ev/s", flush=True)
            print(f"  CPU s per {n:,} events: end to end {wall:.2f} s wall: agent {e2e[0]:.2f}, "
                  f"platform process {e2e[1]:.2f}, broker {e2e[2]:.2f}, sum {sum(e2e):.2f} = "
                  f"{sum(e2e) / wall:.2f} of {os.cpu_count()} cores; alone: agent "
                  f"{alone_cpu:.2f} (+ broker), platform {plat_cpu:.2f} (no transport)",
                  flush=True)
            delivered = Receiver(work / "platform.db")
            try:
                got = len(delivered.events(GW))
            finally:
                delivered.close()
            assert got == n, f"platform holds {got} of {n} events"
        finally:
            broker.stop()
    med, spread = summarise(agent_rates)
    raw_med, raw_spread = summarise(raw_rates)
    alone_med, alone_spread = summarise(alone_rates)
    plat_med, plat_spread = summarise(platform_rates)
    slower = min(alone_med, plat_med)
    return [Row(figure=f"end-to-end delivery ({BATCH}/batch, mTLS)", value=med, unit="ev/s",
                spread=spread, baseline=raw_med, baseline_what="raw paho",
                target=f">= {TARGET:,.0f} ev/s", met=med >= TARGET,
                note=f"{n} events per run; raw paho spread {raw_spread or '-'}"),
            Row(figure="agent alone (claim, sign, publish; PUBACK deletes)", value=alone_med,
                unit="ev/s", spread=alone_spread, baseline=raw_med, baseline_what="raw paho"),
            Row(figure="platform alone (verify and store pre-made batches)", value=plat_med,
                unit="ev/s", spread=plat_spread),
            Row(figure="pipeline efficiency: end to end / the slower alone", value=med / slower,
                unit="x", target=">= 0.7x", met=med / slower >= 0.7,
                note="the slower alone: "
                + ("the agent" if alone_med <= plat_med else "the platform")
                + f" ({slower:,.0f} ev/s)")]


def wire_rows(key: Ed25519PrivateKey) -> list[Row]:
    """Bytes per event on the wire (the whole signed batch / its events) for telemetry batches
    of a branch's mix: 20 sensors, temperature and humidity at 0.1 resolution with jitter, an
    RSSI attribute, seconds apart. Compressed (`[forwarder] compression = "zstd"`) beside the
    same batch uncompressed; zlib level 9 of the payload as a second baseline."""
    rnd = random.Random(19)
    rows = []
    for n in (20, 100, 500):
        t0 = 1767225600.0
        bodies = [protocol.encode_event(
            id=1000 + i, t=t0 + i * 0.05 + rnd.random() * 0.01, tq=0, src=f"ble.room{i % 20}",
            type="temperature" if i % 2 else "humidity", v=round(20 + rnd.random() * 30, 1),
            prio=TELEMETRY, u="Cel" if i % 2 else "%RH", attrs={"rssi": -60 - rnd.randint(0, 20)})
            for i in range(n)]
        plain, packed = (protocol.build_batch(key=key, kid=protocol.kid_for(key.public_key()),
                                              gw=GW, seq=1, prev=protocol.ZERO_HASH, created=t0,
                                              encoded_events=bodies, compress=c)
                         for c in (False, True))
        zlib9 = len(zlib.compress(b"".join(bodies), 9)) / n
        rows.append(Row(figure=f"bytes per event on the wire, {n}-event telemetry batch, zstd",
                        value=len(packed) / n, unit="B/event", baseline=len(plain) / n,
                        baseline_what="uncompressed",
                        target="<= 25 B/event" if n >= 100 else "",
                        met=(len(packed) / n <= 25) if n >= 100 else None,
                        note=f"payload alone with zlib -9: {zlib9:.1f} B/event"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    n = 2 * BATCH if args.quick else max(BATCH, args.events // BATCH * BATCH)
    runs = args.runs or (1 if args.quick else 3)
    configure_logging("warning")  # as in production: no per-batch lines
    print(f"# bench/forward.py: {n} events per run, {runs} run(s); {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as d:
        rows = measure(n, runs, Path(d))
    rows += wire_rows(Ed25519PrivateKey.generate())
    print_table(rows)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
