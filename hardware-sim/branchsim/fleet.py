"""A fleet of simulated gateways in one process (`branch-sim fleet`): load and failover tests
of a platform and its brokers.

Each gateway has its own Ed25519 key, a random epoch, one bulk-lane hash chain, an in-memory
outbox and its own MQTT 3.1.1 connection (persistent session, `clean_session` off, QoS 1). Its
events and batches are made by the product's protocol code (`agent.protocol.encode_event`,
`build_batch`), so a platform cannot tell them from an agent's. A share of the gateways can lose
their WAN (`Fleet.cut`) and get it back (`Fleet.restore`); their events keep accumulating
meanwhile and drain in full batches afterwards.

Invariants, per gateway:

- event ids are 1, 2, 3 ... in its epoch; ids up to `produced` exist, those above `batched` are
  pending in the outbox, the rest are in signed batches, in flight or acknowledged;
- a batch holds consecutive ids, is signed once (seq from 1, `prev` = the previous batch's
  hash, `ZERO_HASH` at seq 1) and re-sent byte for byte until the platform acknowledges it;
- a batch is signed only while the gateway is connected and subscribed to its acks and its
  window (`window` batches in flight) has room, as the agent's forwarder claims batches only for
  an uplink that is up: a gateway back from a WAN cut drains its backlog in `batch_max` batches.

Forwarding, simplified from agent.runtime.forwarder: acks are matched by `h`; `ok`, or
`replay` (the platform already holds those bytes), deletes the batch; `gap` sends every
unacknowledged batch again; any other refusal is counted and the batch goes again after the ack
timeout, as do batches unanswered for `ack_timeout_s`, and all of them after every reconnect.
No refusal is final here (no new chain, no parking): a fleet that keeps refusals is a platform
set up wrong, which the counters show. As in the agent, a gateway keeps its paho client across
reconnects, so paho re-sends its unacknowledged PUBLISHes too: the platform answers such copies
`replay`, or once more for bytes already acknowledged (`late_acks`). Unlike the agent, a fleet
gateway publishes no status document and sets no will.

Cost: no thread per gateway. One event loop drives every paho client through paho's socket
callbacks (`loop.add_reader/add_writer` calling `loop_read/loop_write`, as agent.uplink.mqtt
does); one task makes every gateway's events each `TICK_S` (a slice of them at a time), one
runs keepalives and ack timeouts each second, and each gateway has a connection task, idle while
it is connected. Measured on two cores with mosquitto: 1,000 gateways at 20 events/s (20,000
events and 1,000 batches a second, acked at once) take 40-47% of one core and connect in about a
second; 200 gateways, 17%. Only
paho's blocking `connect()` (TCP connect, TLS handshake) runs in a small thread pool; the socket
callbacks paho makes from that thread are recorded and replayed on the loop when `connect()`
returns (`Fleet._on_loop`, the one place threads are crossed), so a client is never used by two
threads at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import resource
import signal
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.core.backoff import Backoff
from agent.core.thirdparty import close_unconnected_socket
from agent.core.types import TELEMETRY
from agent.protocol import (
    EPOCH_LEN,
    ZERO_HASH,
    ProtocolError,
    batch_hash,
    build_batch,
    decode_ack,
    encode_event,
    kid_for,
)
from agent.uplink.mqtt import read_available, set_nodelay

__all__ = [
    "HELP",
    "AckedBatch",
    "Fleet",
    "FleetConfig",
    "FleetError",
    "FleetStats",
    "FleetTls",
    "GatewayState",
    "add_arguments",
    "main",
    "read_registry",
    "run_fleet",
    "write_registry",
]

log = structlog.get_logger(__name__)

HELP = "many simulated gateways in one process, with WAN cuts (load and failover tests)"

TICK_S = 0.1  # how often the producer makes each gateway's due events and flushes its batches
# ... a slice of the gateways at a time, every TICK_S / TICK_SLICES: 1,000 gateways at 20 events/s
# in one go held the loop for 60 ms (acks waiting behind it), and flushed in bursts.
TICK_SLICES = 5
HOUSEKEEPING_S = 1.0  # keepalives (paho's loop_misc) and ack timeouts
RECONNECT_BASE_S, RECONNECT_CAP_S = 1.0, 2.0  # jittered: the first retry after 0.5-1 s, then 1-2 s
GAP_RESEND_MIN_S = 1.0  # every copy in flight draws a `gap` of its own: resend once for them all
DISCONNECT_WAIT_S = 5.0
LATENCY_SAMPLES = 20_000  # the latest acks (20 s of 1,000 gateways), for the percentiles
# What each event says: a BLE thermometer's reading, not synchronised to NTP (tq 1: a Pi
# without RTC); source ids are `<kind>.<name>` (docs/PROTOCOL.md 3.3).
SRC, TYPE, UNIT, TQ = "ble.t1", "temperature", "Cel", 1
_NAME = re.compile(r"[A-Za-z0-9-]+")  # no '.': NATS maps '.' in an MQTT topic to '/'


class FleetError(ValueError):
    """A fleet that cannot be set up as asked (the message says what to change)."""


@dataclass(frozen=True)
class FleetTls:
    """Mutual TLS: every gateway of the fleet presents the same client certificate."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class FleetConfig:
    """`rate`: events per second of each gateway. `brokers`: gateway i starts on
    brokers[i % len] and moves to the next one whenever its connection drops. `seed`: the same
    keys (and values) on every run; epochs are random all the same, so a rerun against the same
    platform starts new chains instead of forking the old ones. `record_acked`: keep every
    acknowledged batch (`GatewayState.acked`, for tests; grows with the run)."""

    gateways: int
    rate: float
    brokers: Sequence[tuple[str, int]]
    prefix: str = "bank/v1"
    tls: FleetTls | None = None
    batch_max: int = 500
    window: int = 4
    flush_s: float = 1.0
    ack_timeout_s: float = 15.0
    seed: int | None = None
    name: str = "fleet"
    keepalive: int = 30
    connect_timeout_s: float = 10.0
    connect_workers: int = 8
    record_acked: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.gateways < 1:
            problems.append("gateways must be at least 1")
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            problems.append("rate must be a number >= 0")
        if not self.brokers:
            problems.append("at least one broker is needed")
        if self.batch_max < 1 or self.window < 1 or self.connect_workers < 1:
            problems.append("batch_max, window and connect_workers must be at least 1")
        if self.flush_s < 0 or self.ack_timeout_s <= 0 or self.connect_timeout_s <= 0:
            problems.append("flush_s must be >= 0, ack_timeout_s and connect_timeout_s > 0")
        if not _NAME.fullmatch(self.name):
            problems.append(f"name {self.name!r}: letters, digits and '-' only (no '.': NATS "
                            "maps it in MQTT topics)")
        if problems:
            raise FleetError("; ".join(problems))


@dataclass(frozen=True)
class AckedBatch:
    """One batch the platform acknowledged: `ids` its events' ids, `acked_at` when
    (time.monotonic)."""

    seq: int
    hash: bytes
    ids: range
    acked_at: float


@dataclass(frozen=True)
class GatewayState:
    """A snapshot of one gateway. `produced`: its highest event id; `last_signed_seq`: the
    seq of its newest batch; `head`: (seq, hash) of its newest acknowledged batch ((0,
    ZERO_HASH) before the first); `connections`: (time.monotonic, connected) at each change;
    `acked`: every acknowledged batch, with `record_acked` (else empty)."""

    gw: str
    epoch: bytes
    broker: tuple[str, int]
    connected: bool
    ready: bool
    cut: bool
    produced: int
    acked_events: int
    pending: int
    in_flight: int
    last_signed_seq: int
    head: tuple[int, bytes]
    connections: tuple[tuple[float, bool], ...]
    acked: tuple[AckedBatch, ...]


@dataclass(frozen=True)
class FleetStats:
    """The fleet's counters. `events_pending`: produced and not yet acknowledged (in the
    outboxes or in flight). `late_acks`: answers to copies of batches already acknowledged (a
    batch sent twice is answered twice). Latency: first send to ack, over the most recent
    `LATENCY_SAMPLES` acks. `cpu_s`: the process's CPU time so far."""

    elapsed_s: float
    gateways: int
    connected: int
    cut: int
    events_produced: int
    events_acked: int
    events_pending: int
    batches_signed: int
    batches_sent: int
    batches_resent: int
    batches_acked: int
    replays: int
    late_acks: int
    malformed_acks: int
    ack_timeouts: int
    refusals: dict[str, int]
    connects: int
    connect_failures: int
    disconnects: int
    latency_samples: int
    latency_p50_s: float | None
    latency_p99_s: float | None
    cpu_s: float
    max_rss_mb: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False, slots=True)
class _Flight:
    seq: int
    hash: bytes
    data: bytes
    ids: range
    first_sent: float | None = None
    sent_at: float = 0.0


@dataclass(eq=False, slots=True)
class _Gateway:
    index: int
    gw: str
    key: Ed25519PrivateKey
    kid: bytes
    pubkey_pem: bytes
    epoch: bytes
    batch_topic: str
    ack_topic: str
    broker: int
    log: Any
    made_at: float = 0.0  # when its events were last made (time.monotonic)
    carry: float = 0.0  # events due but not yet made (fractions of one)
    # Fleets start at once, branches do not: the first batch waits a random part of flush_s
    # less, or every gateway would flush in the same tick, all their batches in one burst.
    phase: float = 0.0
    temp: float = 21.0
    produced: int = 0  # the highest event id
    batched: int = 0  # the highest event id in a signed batch
    pending: list[bytes] = field(default_factory=list)  # encoded events batched+1 .. produced
    pending_since: float = 0.0  # when the oldest pending event was made (time.monotonic)
    seq: int = 0  # of the newest signed batch
    prev: bytes = ZERO_HASH  # its hash
    in_flight: dict[bytes, _Flight] = field(default_factory=dict)  # by hash, in seq order
    acked_events: int = 0
    head: tuple[int, bytes] = (0, ZERO_HASH)
    acked: list[AckedBatch] = field(default_factory=list)
    gap_resent_at: float = -math.inf
    refused: set[str] = field(default_factory=set)  # reasons already logged
    client: paho.Client | None = None
    fd: int | None = None
    connecting: bool = False  # a worker thread is in client.connect()
    deferred: list[tuple[Callable[[_Gateway, int], None], int]] = field(default_factory=list)
    connack: asyncio.Future[str | None] | None = None  # None: accepted, else why not
    disconnected: asyncio.Future[None] | None = None
    connected: bool = False
    ready: bool = False  # subscribed to its acks: batches may go
    cut: bool = False
    restored: asyncio.Event = field(default_factory=asyncio.Event)
    connections: list[tuple[float, bool]] = field(default_factory=list)


def _key(seed: int | None, gw: str) -> Ed25519PrivateKey:
    if seed is None:
        return Ed25519PrivateKey.generate()
    material = hashlib.sha256(f"branch-sim fleet {seed} {gw}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(material)


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Fleet:
    """N simulated gateways (see the module doc). An async context manager: entering starts
    connecting and producing; leaving disconnects every gateway cleanly and stops its tasks.

        async with Fleet(cfg) as fleet:
            await fleet.wait_connected(30)
            cut = fleet.cut(0.25, seed=1)
            ...
            fleet.restore()
            fleet.stop_producing()
            await fleet.wait_drained(60)
    """

    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self._rng = random.Random(cfg.seed)
        self._brokers = [(str(h), int(p)) for h, p in cfg.brokers]
        self._gws: list[_Gateway] = []
        self._by_id: dict[str, _Gateway] = {}
        for i in range(cfg.gateways):
            gw = f"{cfg.name}-{i + 1:05d}"
            key = _key(cfg.seed, gw)
            pub = key.public_key()
            g = _Gateway(
                index=i, gw=gw, key=key, kid=kid_for(pub),
                pubkey_pem=pub.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
                epoch=os.urandom(EPOCH_LEN), batch_topic=f"{cfg.prefix}/{gw}/batch",
                ack_topic=f"{cfg.prefix}/{gw}/ack", broker=i % len(self._brokers),
                log=log.bind(gw=gw), carry=self._rng.random(),
                phase=self._rng.uniform(0, cfg.flush_s),
            )
            g.restored.set()
            self._gws.append(g)
            self._by_id[gw] = g
        self._ssl = self._tls_context(cfg.tls) if cfg.tls is not None else None
        self._producing = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._runner: asyncio.Task[None] | None = None
        self._change: asyncio.Event | None = None
        self._closed = False
        self._started = time.monotonic()
        self._latency: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._refusals: dict[str, int] = {}
        self._n: dict[str, int] = dict.fromkeys((
            "events_produced", "events_acked", "batches_signed", "batches_sent",
            "batches_resent", "batches_acked", "replays", "late_acks", "malformed_acks",
            "ack_timeouts", "connects", "connect_failures", "disconnects", "latency_samples",
        ), 0)

    @staticmethod
    def _tls_context(tls: FleetTls) -> ssl.SSLContext:
        # One context for the whole fleet: loading the certificate once, not a thousand times.
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        except (OSError, ssl.SSLError) as exc:
            raise FleetError(f"cannot load the TLS files: {exc} (check --ca, --cert, --key)"
                             ) from None
        return ctx

    # --- what a test or the CLI asks ------------------------------------------------------

    @property
    def gateways(self) -> list[str]:
        return [g.gw for g in self._gws]

    def registry(self) -> list[tuple[str, bytes]]:
        """(gateway id, Ed25519 public key as SubjectPublicKeyInfo PEM) of every gateway: what
        the platform registers (`Receiver.register(gw, pem)`)."""
        return [(g.gw, g.pubkey_pem) for g in self._gws]

    def gateway(self, gw: str) -> GatewayState:
        g = self._by_id[gw]
        return GatewayState(
            gw=g.gw, epoch=g.epoch, broker=self._brokers[g.broker % len(self._brokers)],
            connected=g.connected, ready=g.ready, cut=g.cut, produced=g.produced,
            acked_events=g.acked_events, pending=len(g.pending), in_flight=len(g.in_flight),
            last_signed_seq=g.seq, head=g.head, connections=tuple(g.connections),
            acked=tuple(g.acked),
        )

    def stats(self) -> FleetStats:
        n = self._n
        ordered = sorted(self._latency)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return FleetStats(
            elapsed_s=round(time.monotonic() - self._started, 3),
            gateways=len(self._gws),
            connected=sum(g.connected for g in self._gws),
            cut=sum(g.cut for g in self._gws),
            events_produced=n["events_produced"],
            events_acked=n["events_acked"],
            events_pending=n["events_produced"] - n["events_acked"],
            batches_signed=n["batches_signed"],
            batches_sent=n["batches_sent"],
            batches_resent=n["batches_resent"],
            batches_acked=n["batches_acked"],
            replays=n["replays"],
            late_acks=n["late_acks"],
            malformed_acks=n["malformed_acks"],
            ack_timeouts=n["ack_timeouts"],
            refusals=dict(self._refusals),
            connects=n["connects"],
            connect_failures=n["connect_failures"],
            disconnects=n["disconnects"],
            latency_samples=n["latency_samples"],
            latency_p50_s=_percentile(ordered, 0.50),
            latency_p99_s=_percentile(ordered, 0.99),
            cpu_s=round(time.process_time(), 3),
            max_rss_mb=round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        )

    def stop_producing(self) -> None:
        """No new events from now on (what is pending still goes)."""
        self._producing = False

    def cut(self, share: float, seed: int | None = None) -> list[str]:
        """Cut the WAN of `share` (0..1) of the fleet, chosen at random among the gateways not
        cut yet: their connections drop (the broker sees the TCP connection close, without an
        MQTT DISCONNECT) and they stay offline until `restore()`, their events accumulating."""
        if not 0 <= share <= 1:
            raise FleetError("the share to cut is between 0 and 1")
        candidates = [g for g in self._gws if not g.cut]
        k = min(len(candidates), round(share * len(self._gws)))
        chosen = sorted(random.Random(seed).sample(candidates, k), key=lambda g: g.index)
        for g in chosen:
            g.cut = True
            g.restored.clear()
            self._drop(g)
        log.info("fleet.cut", gateways=len(chosen), share=share)
        self._changed()
        return [g.gw for g in chosen]

    def restore(self) -> list[str]:
        """Give every cut gateway its WAN back: each reconnects after a jittered 0.5-1 s."""
        back = [g for g in self._gws if g.cut]
        for g in back:
            g.cut = False
            g.restored.set()
        log.info("fleet.restored", gateways=len(back))
        return [g.gw for g in back]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109 - a bound for a test's condition, as asyncio.wait_for takes
        """Until `predicate()` holds, checked on every change (an ack, a connection, a tick of
        the producer); TimeoutError after `timeout` s, or the error that stopped the fleet."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._check_running()
                if self._change is None:
                    self._change = asyncio.Event()
                await self._change.wait()

    async def wait_connected(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound for a test's condition, as asyncio.wait_for takes
        """Until every gateway not cut is connected and subscribed to its acks."""
        await self.wait_until(lambda: all(g.ready or g.cut for g in self._gws), timeout)

    async def wait_drained(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound for a test's condition, as asyncio.wait_for takes
        """Until every event produced is acknowledged (call `stop_producing` first, or this
        waits for a moment when nothing is pending)."""
        n = self._n
        await self.wait_until(lambda: n["events_acked"] == n["events_produced"], timeout)

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._executor = ThreadPoolExecutor(self.cfg.connect_workers,
                                            thread_name_prefix="fleet-connect")
        self._started = time.monotonic()
        self._runner = asyncio.create_task(self._run(), name="fleet")
        self._runner.add_done_callback(lambda _t: self._changed())
        log.info("fleet.started", gateways=len(self._gws), rate=self.cfg.rate,
                 brokers=[f"{h}:{p}" for h, p in self._brokers])
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the tasks, disconnect every gateway (a clean DISCONNECT: their sessions stay
        with the broker) and close their sockets. Idempotent; raises what stopped the fleet,
        if something did."""
        if self._closed:
            return
        self._closed = True
        failure: BaseException | None = None
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                failure = exc
        leaving = []
        for g in self._gws:
            if g.client is not None and g.connected and g.disconnected is not None:
                g.client.disconnect()
                leaving.append(g.disconnected)
        if leaving:
            await asyncio.wait(leaving, timeout=DISCONNECT_WAIT_S)
        for g in self._gws:
            if g.client is not None:
                close_unconnected_socket(g.client)  # what did not leave in time
            g.connected = g.ready = False
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # idle: every connect job was awaited
        stats = self.stats()
        log.info("fleet.stopped", produced=stats.events_produced, acked=stats.events_acked)
        if failure is not None:
            raise failure

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._produce(), name="fleet:produce")
            tg.create_task(self._housekeeping(), name="fleet:housekeeping")
            for g in self._gws:
                tg.create_task(self._connection(g), name=f"fleet:{g.gw}")

    def _check_running(self) -> None:
        runner = self._runner
        if runner is None or self._closed:
            raise FleetError("the fleet is not running (use it as `async with Fleet(...)`)")
        if runner.done():
            exc = None if runner.cancelled() else runner.exception()
            raise exc or FleetError("the fleet stopped")

    def _changed(self) -> None:
        if self._change is not None:
            self._change.set()
            self._change = None

    # --- events and batches -----------------------------------------------------------------

    async def _produce(self) -> None:
        slices = [self._gws[k::TICK_SLICES] for k in range(TICK_SLICES)]
        start = time.monotonic()
        for g in self._gws:
            g.made_at = start
        for k in itertools.cycle(range(TICK_SLICES)):
            await asyncio.sleep(TICK_S / TICK_SLICES)  # the rate holds whatever the drift
            now, wall = time.monotonic(), time.time()
            for g in slices[k]:
                if self._producing and self.cfg.rate > 0:
                    self._make_events(g, now, wall)
                self._flush(g, now)
            self._changed()

    def _make_events(self, g: _Gateway, now: float, wall: float) -> None:
        rate = self.cfg.rate
        g.carry += rate * (now - g.made_at)
        g.made_at = now
        n = int(g.carry)
        if n == 0:
            return
        g.carry -= n
        if not g.pending:
            g.pending_since = now - g.phase
            g.phase = 0.0
        step, uniform = 1.0 / rate, self._rng.uniform
        for i in range(n):
            g.produced += 1
            g.temp += uniform(-0.05, 0.05)
            g.pending.append(encode_event(id=g.produced, t=wall - (n - 1 - i) * step, tq=TQ,
                                          src=SRC, type=TYPE, v=round(g.temp, 2),
                                          prio=TELEMETRY, u=UNIT))
        self._n["events_produced"] += n

    def _flush(self, g: _Gateway, now: float) -> None:
        """Sign and send what is due while the window has room: `batch_max` events, or
        whatever is pending once the oldest waited `flush_s` (the rest of a backlog counts as
        old as its head, so a drain goes in full batches back to back)."""
        cfg = self.cfg
        while g.ready and g.pending and len(g.in_flight) < cfg.window:
            if len(g.pending) < cfg.batch_max and now - g.pending_since < cfg.flush_s:
                return
            events = g.pending[:cfg.batch_max]
            del g.pending[:cfg.batch_max]
            first = g.batched + 1
            g.batched += len(events)
            g.seq += 1
            data = build_batch(key=g.key, kid=g.kid, gw=g.gw, seq=g.seq, prev=g.prev,
                               created=time.time(), encoded_events=events, epoch=g.epoch)
            h = batch_hash(data)
            g.prev = h
            flight = g.in_flight[h] = _Flight(g.seq, h, data, range(first, g.batched + 1))
            self._n["batches_signed"] += 1
            self._send(g, flight, now)

    def _send(self, g: _Gateway, flight: _Flight, now: float) -> None:
        assert g.client is not None
        info = g.client.publish(g.batch_topic, flight.data, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return  # the connection is going: the batch goes again after the reconnect
        if flight.first_sent is None:
            flight.first_sent = now
            self._n["batches_sent"] += 1
        else:
            self._n["batches_resent"] += 1
        flight.sent_at = now

    def _resend_all(self, g: _Gateway, now: float) -> None:
        for flight in list(g.in_flight.values()):  # in seq order: the platform takes no other
            self._send(g, flight, now)

    def _on_ack(self, g: _Gateway, raw: bytes) -> None:
        try:
            ack = decode_ack(raw)
        except ProtocolError as exc:
            self._n["malformed_acks"] += 1
            g.log.warning("fleet.bad_ack", error=str(exc), size=len(raw))
            return
        flight = g.in_flight.get(ack.h)
        if flight is None:
            self._n["late_acks"] += 1
            return
        now = time.monotonic()
        if ack.ok or ack.err == "replay":
            del g.in_flight[ack.h]
            n = self._n
            n["batches_acked"] += 1
            n["events_acked"] += len(flight.ids)
            n["replays"] += not ack.ok
            g.acked_events += len(flight.ids)
            if flight.seq > g.head[0]:
                g.head = (flight.seq, flight.hash)
            if flight.first_sent is not None:
                self._latency.append(now - flight.first_sent)
                n["latency_samples"] += 1
            if self.cfg.record_acked:
                g.acked.append(AckedBatch(flight.seq, flight.hash, flight.ids, now))
            self._flush(g, now)
            self._changed()
            return
        err = ack.err or "unspecified"
        self._refusals[err] = self._refusals.get(err, 0) + 1
        if err == "gap":
            # The platform missed an earlier batch: everything unacknowledged goes again.
            if now - g.gap_resent_at >= GAP_RESEND_MIN_S:
                g.gap_resent_at = now
                self._resend_all(g, now)
        elif err not in g.refused:  # once per gateway and reason; the counters say the rest
            g.refused.add(err)
            g.log.warning("fleet.batch_refused", seq=flight.seq, reason=err,
                          advice="is the gateway's key registered with the platform? "
                          "(`branch-sim fleet --registry-out`)")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            now = time.monotonic()
            for g in self._gws:
                if g.client is None or g.connecting or g.fd is None:
                    continue
                g.client.loop_misc()  # keepalive pings; drops a connection gone silent
                if g.ready and g.in_flight and now - min(
                        f.sent_at for f in g.in_flight.values()) >= self.cfg.ack_timeout_s:
                    self._n["ack_timeouts"] += 1
                    self._resend_all(g, now)

    # --- connections ------------------------------------------------------------------------

    async def _connection(self, g: _Gateway) -> None:
        """Keep `g` connected, to the next broker after each drop, while it is not cut."""
        backoff = Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S, rng=self._rng)
        retry = False
        while True:
            await g.restored.wait()
            if retry:
                await backoff.wait()  # jittered: a restored share does not reconnect at once
                if g.cut:
                    continue
            retry = True
            host, port = self._brokers[g.broker % len(self._brokers)]
            try:
                await self._connect(g, host, port)
            except Exception as exc:  # any failure to connect: next broker, after the backoff
                self._n["connect_failures"] += 1
                g.log.debug("fleet.connect_failed", broker=f"{host}:{port}",
                            error=f"{type(exc).__name__}: {exc}")
                g.broker += 1
                continue
            backoff.reset()
            assert g.disconnected is not None
            await asyncio.shield(g.disconnected)
            g.broker += 1

    async def _connect(self, g: _Gateway, host: str, port: int) -> None:
        loop, executor = self._loop, self._executor
        assert loop is not None and executor is not None
        client = g.client
        if client is None:
            client = g.client = self._make_client(g)
        g.connack, g.disconnected = loop.create_future(), loop.create_future()
        g.connecting = True
        job = loop.run_in_executor(
            executor, functools.partial(client.connect, host, port, self.cfg.keepalive))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            # connect() cannot be interrupted (connect_timeout bounds it): the worker must be
            # done with the client before the loop touches it again.
            with contextlib.suppress(Exception):
                await job
            raise
        finally:
            g.connecting = False
            deferred, g.deferred = g.deferred, []
            for fn, fd in deferred:
                fn(g, fd)
        try:
            async with asyncio.timeout(self.cfg.connect_timeout_s):
                refused = await asyncio.shield(g.connack)
        except BaseException:
            close_unconnected_socket(client)
            raise
        if refused is not None:
            raise ConnectionRefusedError(refused)

    def _make_client(self, g: _Gateway) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"branch-agent-{g.gw}",
                             protocol=paho.MQTTv311, clean_session=False, userdata=g)
        client.connect_timeout = self.cfg.connect_timeout_s
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def _drop(self, g: _Gateway) -> None:
        """Drop the connection as a WAN cut would, without an MQTT DISCONNECT: the reader then
        sees the end of the stream and paho reports the connection lost. A gateway still in
        connect() is dropped when its CONNACK arrives (`_on_connect`)."""
        sock = g.client.socket() if g.client is not None and not g.connecting else None
        if isinstance(sock, socket.socket):
            # socket.socket's own shutdown: SSLSocket.shutdown would also forget its TLS state
            # and hand paho the raw TLS bytes still buffered.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    # --- paho's socket callbacks: on a worker thread during connect(), else on the loop ----

    def _on_loop(self, g: _Gateway, fn: Callable[[_Gateway, int], None], fd: int) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(g, fd)
        else:  # a worker in connect(): replayed on the loop when it returns (`_connect`)
            g.deferred.append((fn, fd))

    def _on_socket_open(self, client: paho.Client, g: _Gateway, sock: Any) -> None:
        set_nodelay(sock)
        self._on_loop(g, self._watch, sock.fileno())

    def _on_socket_close(self, client: paho.Client, g: _Gateway, sock: Any) -> None:
        self._on_loop(g, self._unwatch, sock.fileno())

    def _on_socket_register_write(self, client: paho.Client, g: _Gateway, sock: Any) -> None:
        self._on_loop(g, self._want_write, sock.fileno())

    def _on_socket_unregister_write(self, client: paho.Client, g: _Gateway, sock: Any) -> None:
        self._on_loop(g, self._no_write, sock.fileno())

    def _watch(self, g: _Gateway, fd: int) -> None:
        assert self._loop is not None
        g.fd = fd
        self._loop.add_reader(fd, self._readable, g)

    def _unwatch(self, g: _Gateway, fd: int) -> None:
        assert self._loop is not None
        if g.fd == fd:
            g.fd = None
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)

    def _want_write(self, g: _Gateway, fd: int) -> None:
        assert self._loop is not None and g.client is not None
        if g.fd == fd:  # not for a socket closed before this call came
            self._loop.add_writer(fd, g.client.loop_write)

    def _no_write(self, g: _Gateway, fd: int) -> None:
        assert self._loop is not None
        if g.fd == fd:
            self._loop.remove_writer(fd)

    @staticmethod
    def _readable(g: _Gateway) -> None:
        assert g.client is not None
        read_available(g.client)

    # --- paho's protocol callbacks: on the loop (they come from loop_read/loop_misc) -------

    def _on_connect(self, client: paho.Client, g: _Gateway, _flags: Any, rc: ReasonCode,
                    _p: Any) -> None:
        fut = g.connack
        if rc.is_failure:
            if fut is not None and not fut.done():
                fut.set_result(f"the broker refused the connection: {rc.getName()}")
            return
        if fut is not None and not fut.done():
            fut.set_result(None)
        if g.cut:  # cut while connecting: it never comes online
            self._drop(g)
            return
        g.connected = True
        g.connections.append((time.monotonic(), True))
        self._n["connects"] += 1
        client.subscribe(g.ack_topic, qos=1)
        g.log.debug("fleet.connected", broker=self._brokers[g.broker % len(self._brokers)])
        self._changed()

    def _on_subscribe(self, client: paho.Client, g: _Gateway, _mid: int,
                      rcs: list[ReasonCode], _p: Any) -> None:
        if any(rc.is_failure for rc in rcs):
            # An ACL, or a broker that cannot make the session's subscription right now (NATS
            # while JetStream elects a leader, or under a connection storm): without it no ack
            # would come, so connect again (to the next broker, after the backoff).
            self._n["connect_failures"] += 1
            g.log.warning("fleet.subscribe_refused", topic=g.ack_topic,
                          advice="if it lasts, the broker refuses the ack topic: check its ACLs")
            client.disconnect()
            return
        if not g.connected:
            return
        g.ready = True
        now = time.monotonic()
        self._resend_all(g, now)  # whatever was in flight when the last connection went
        self._flush(g, now)
        self._changed()

    def _on_disconnect(self, client: paho.Client, g: _Gateway, _flags: Any, rc: ReasonCode,
                       _p: Any) -> None:
        if g.connected:
            g.connections.append((time.monotonic(), False))
            self._n["disconnects"] += 1
            if not (g.cut or self._closed):
                g.log.info("fleet.disconnected", reason=rc.getName())
        g.connected = g.ready = False
        if g.connack is not None and not g.connack.done():
            g.connack.set_result(f"the connection closed before CONNACK: {rc.getName()}")
        if g.disconnected is not None and not g.disconnected.done():
            g.disconnected.set_result(None)
        self._changed()

    def _on_message(self, client: paho.Client, g: _Gateway, msg: paho.MQTTMessage) -> None:
        if msg.topic != g.ack_topic:
            return
        try:
            self._on_ack(g, bytes(msg.payload))
        except Exception:  # a bug here must not stop the network loop of the whole fleet
            g.log.exception("fleet.on_ack_failed")


# --- registry files -------------------------------------------------------------------------


def write_registry(path: Path, registry: Sequence[tuple[str, bytes]]) -> None:
    """JSON lines {"gw": ..., "pubkey_pem": ...}: what the platform must register."""
    with path.open("w") as f:
        for gw, pem in registry:
            f.write(json.dumps({"gw": gw, "pubkey_pem": pem.decode()}) + "\n")


def read_registry(path: Path) -> list[tuple[str, bytes]]:
    """The (gw, SPKI PEM) pairs of a file `write_registry` made."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            out.append((str(doc["gw"]), str(doc["pubkey_pem"]).encode()))
    return out


# --- a run, and the CLI ---------------------------------------------------------------------


async def run_fleet(
    cfg: FleetConfig,
    duration: float | None,
    *,
    cut_share: float = 0.0,
    cut_at: float | None = None,
    restore_at: float | None = None,
    cut_seed: int | None = None,
    stats_every: float = 5.0,
    drain_s: float = 20.0,
    emit: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
    registry_out: Path | None = None,
) -> tuple[FleetStats, bool]:
    """Run a fleet for `duration` s (None: until `stop` is set), cutting `cut_share` of it at
    `cut_at` s and restoring at `restore_at` s; then stop producing and wait up to `drain_s`
    for every event to be acknowledged. `emit`s one JSON stats line every `stats_every` s and
    a final one (`"final": true, "drained": ...`); `registry_out`: the fleet's keys are written
    there (`write_registry`) before it connects. Returns the final stats and whether it
    drained."""
    stop = stop or asyncio.Event()
    fleet = Fleet(cfg)
    if registry_out is not None:
        write_registry(registry_out, fleet.registry())
    async with fleet:
        start = time.monotonic()
        actions: list[tuple[float, str]] = []
        if cut_share > 0 and cut_at is not None:
            actions.append((cut_at, "cut"))
            if restore_at is not None:
                actions.append((restore_at, "restore"))
        actions.sort()
        next_stats, last = stats_every, (0.0, 0)

        def line(stats: FleetStats, **extra: object) -> None:
            nonlocal last
            dt = stats.elapsed_s - last[0]
            rate = (stats.events_acked - last[1]) / dt if dt > 0 else 0.0
            last = (stats.elapsed_s, stats.events_acked)
            emit(json.dumps({**stats.as_dict(), "acked_per_s": round(rate, 1), **extra}))

        while not stop.is_set():
            t = time.monotonic() - start
            if duration is not None and t >= duration:
                break
            while actions and actions[0][0] <= t:
                _, what = actions.pop(0)
                if what == "cut":
                    fleet.cut(cut_share, seed=cut_seed)
                else:
                    fleet.restore()
            if t >= next_stats:
                line(fleet.stats())
                next_stats += stats_every
            wake = min([next_stats, *(a for a, _ in actions[:1]),
                        *([duration] if duration is not None else [])])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake - t)):
                    await stop.wait()
        fleet.stop_producing()
        drained = False
        if drain_s > 0:
            with contextlib.suppress(TimeoutError):
                await fleet.wait_drained(drain_s)
                drained = True
        final = fleet.stats()
        line(final, final=True, drained=drained)
    return final, drained


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _brokers(text: str) -> list[tuple[str, int]]:
    return [_broker(part) for part in text.split(",") if part.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`branch-sim fleet`'s options."""
    p.add_argument("--gateways", type=int, required=True, metavar="N")
    p.add_argument("--rate", type=float, required=True, metavar="R",
                   help="events per second of each gateway")
    p.add_argument("--broker", type=_brokers, required=True, metavar="HOST:PORT[,HOST:PORT...]",
                   help="gateway i starts on broker i mod n and moves to the next on each drop")
    p.add_argument("--prefix", default="bank/v1", help="topic prefix (default: bank/v1)")
    p.add_argument("--ca", type=Path, help="TLS: the CA of the brokers' certificates")
    p.add_argument("--cert", type=Path, help="TLS: the client certificate (shared by all)")
    p.add_argument("--key", type=Path, help="TLS: its private key")
    p.add_argument("--duration", type=float, metavar="S",
                   help="seconds to produce (default: until SIGINT/SIGTERM)")
    p.add_argument("--batch-max", type=int, default=500, metavar="N")
    p.add_argument("--window", type=int, default=4, metavar="N", help="batches in flight")
    p.add_argument("--flush", type=float, default=1.0, metavar="S",
                   help="the longest an event waits for its batch to fill")
    p.add_argument("--ack-timeout", type=float, default=15.0, metavar="S")
    p.add_argument("--cut", type=float, default=0.0, metavar="SHARE",
                   help="the share of gateways whose WAN is cut at --cut-at")
    p.add_argument("--cut-at", type=float, metavar="S")
    p.add_argument("--restore-at", type=float, metavar="S")
    p.add_argument("--drain", type=float, default=20.0, metavar="S",
                   help="after the run, wait up to S s for every event to be acked (0: no)")
    p.add_argument("--stats-every", type=float, default=5.0, metavar="S")
    p.add_argument("--registry-out", type=Path, metavar="FILE",
                   help="write JSON lines {gw, pubkey_pem} for the platform to register")
    p.add_argument("--registry-only", action="store_true",
                   help="write --registry-out and exit (with --seed, the keys of a later run)")
    p.add_argument("--seed", type=int, help="the same keys on every run")
    p.add_argument("--name", default="fleet", help="gateway ids are NAME-00001 ...")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default="info")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """`branch-sim fleet`: JSON stats lines on stdout, logs on stderr. Exit 0 when every event
    was acknowledged in the drain (or no drain was asked), 1 when not, 2 for bad options."""
    from agent.core.log import configure_logging

    configure_logging(args.log_level)
    tls_files = (args.ca, args.cert, args.key)
    try:
        if any(tls_files) and not all(tls_files):
            raise FleetError("TLS needs all three of --ca, --cert and --key")
        if args.registry_only and args.registry_out is None:
            raise FleetError("--registry-only needs --registry-out")
        cfg = FleetConfig(
            gateways=args.gateways, rate=args.rate, brokers=args.broker, prefix=args.prefix,
            tls=FleetTls(args.ca, args.cert, args.key) if all(tls_files) else None,
            batch_max=args.batch_max, window=args.window, flush_s=args.flush,
            ack_timeout_s=args.ack_timeout, seed=args.seed, name=args.name,
        )
        if args.registry_only:
            write_registry(args.registry_out, Fleet(cfg).registry())
            return 0
    except FleetError as exc:
        print(f"branch-sim fleet: {exc}", file=sys.stderr)
        return 2

    async def run() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        _, drained = await run_fleet(
            cfg, args.duration, cut_share=args.cut, cut_at=args.cut_at,
            restore_at=args.restore_at, cut_seed=args.seed, stats_every=args.stats_every,
            drain_s=args.drain, emit=lambda s: print(s, flush=True), stop=stop,
            registry_out=args.registry_out)
        return drained

    drained = asyncio.run(run())
    return 0 if drained or args.drain <= 0 else 1
