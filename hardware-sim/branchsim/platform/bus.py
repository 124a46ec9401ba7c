"""The platform at fleet scale (docs/SCALE.md): batches from a NATS JetStream stream, acks over
MQTT.

Gateways publish their batches over MQTT, unchanged, to any node of a NATS cluster (its MQTT
listener); the stream `BRANCH_BATCHES` (replicated, file storage, work-queue retention) keeps
every `{prefix}/+/batch` and `{prefix}/+/alarm` message. N receivers, in any number of
processes and hosts, share two durable pull consumers of it (one per lane, so that an alarm's
batch is never behind a bulk backlog in the stream), each message to one of them.

For each message a receiver:
1. verifies and stores the batch in its store (`branchsim.platform.pgstore.PgReceiver`, or the
   SQLite `Receiver` on one host), in one transaction that holds the gateway's row lock, so that
   a gateway's batches are stored in chain order whichever receiver has them;
2. publishes the answer to `{prefix}/{gw}/ack` over MQTT (QoS 1), so that a gateway offline at
   that moment finds it in its persistent session;
3. then acks the message on the stream; neither step waits for the broker's confirmation.

Nothing is answered or acked before the commit. A receiver that dies between 1 and 3 leaves the
message unacked: it is delivered again (to a receiver) after `ACK_WAIT_S`, found stored
(`replay`) and answered again, which the gateway takes as delivered. An answer lost after 3 (the
receiver dies with it in paho's buffer) is made good by the gateway, which sends the batch again
after its ack timeout and gets `replay`. (Waiting for each PUBACK and stream ack cost a fifth of
the throughput: docs/SCALE.md.)

A batch ahead of its chain (`gap`: its predecessor is in another receiver's hands right now, or
waiting for redelivery) is never waited for on a thread: it is handed back to the stream (NAK)
to be delivered again `GAP_RETRY_S` later, then later each time; one still ahead of its chain at
its `GAP_GIVE_UP`-th delivery (about 8 s) is answered `gap` (its predecessor is lost: the
gateway sends its window again) and removed from the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import paho.mqtt.client as paho
import structlog
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol import encode_ack
from branchsim.platform.mqtt_server import PlatformTls
from branchsim.platform.rules import BatchStore

__all__ = ["STREAM", "AckPublisher", "BusReceiver", "BusStats", "ensure_stream",
           "subjects"]

log = structlog.get_logger(__name__)

DRAIN_TIMEOUT_S = 2.0  # at stop: the subscriptions' drain, bounded (see `run`)

STREAM = "BRANCH_BATCHES"
CONSUMERS = {"batch": "platform-bulk", "alarm": "platform-alarm"}  # durable, shared by receivers
ACK_WAIT_S = 30.0  # a receiver gone quiet for this long: its messages go to another one
GAP_RETRY_S = 0.05  # a batch ahead of its chain comes back after this (3 times), then twice
GAP_RETRY_MAX_S = 1.0  # as late each time, up to this
GAP_GIVE_UP = 14  # deliveries (about 8 s) after which it is answered `gap`
STORE_RETRY_S = 1.0  # a batch the store failed on (its connection lost) comes back after this
FETCH = 32  # messages a worker takes from the stream at once


def subjects(prefix: str) -> dict[str, str]:
    """{topic kind: NATS subject filter} of the gateways' MQTT topics (`/` becomes `.`)."""
    base = prefix.replace("/", ".")
    return {kind: f"{base}.*.{kind}" for kind in CONSUMERS}


async def ensure_stream(js: Any, prefix: str, *, replicas: int = 3,
                        max_bytes: int = 1 << 30) -> None:
    """Create the stream and the two consumers if missing (idempotent; every receiver calls it).
    `max_bytes`: what the stream may hold while no receiver runs (a regional drain of a day's
    backlog is ~150 MB a branch); beyond it new batches are refused and the gateways keep them."""
    filters = subjects(prefix)
    config = StreamConfig(
        name=STREAM, subjects=list(filters.values()), retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE, num_replicas=replicas, max_bytes=max_bytes,
        duplicate_window=0)
    try:
        await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(config)
    for kind, durable in CONSUMERS.items():
        try:
            await js.consumer_info(STREAM, durable)
        except NotFoundError:
            await js.add_consumer(STREAM, ConsumerConfig(
                durable_name=durable, filter_subject=filters[kind],
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_S, max_deliver=-1, max_ack_pending=4096,
                num_replicas=replicas))


def _tls_context(tls: PlatformTls) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


class AckPublisher:
    """One MQTT 3.1.1 connection (paho's own thread) that publishes the answers at QoS 1; on a
    lost connection it moves to the next broker of the list (a NATS node killed: the others
    carry on)."""

    def __init__(self, brokers: Sequence[tuple[str, int]], tls: PlatformTls | None,
                 client_id: str) -> None:
        self.brokers = list(brokers)
        self._next = 0
        self.connected = threading.Event()
        c = self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=paho.MQTTv311, clean_session=True)
        if tls is not None:
            c.tls_set_context(_tls_context(tls))
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(1, 2)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_socket_open = _nodelay

    def start(self) -> None:
        host, port = self.brokers[0]
        self.client.connect_async(host, port, keepalive=15)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode,
                    _p: object) -> None:
        if rc.is_failure:
            log.error("platform.bus.ack_refused", reason=rc.getName(), broker=self.client.host)
            return
        log.info("platform.bus.ack_connected", broker=f"{self.client.host}:{self.client.port}")
        self.connected.set()

    def _on_disconnect(self, client: paho.Client, _u: object, _f: object, rc: ReasonCode,
                       _p: object) -> None:
        self.connected.clear()
        self._next = (self._next + 1) % len(self.brokers)
        host, port = self.brokers[self._next]
        with contextlib.suppress(RuntimeError, ValueError):
            client.host, client.port = host, port  # paho's own reconnect goes there
        log.warning("platform.bus.ack_disconnected", reason=str(rc), next=f"{host}:{port}")

    def send(self, topic: str, payload: bytes) -> bool:
        """Hand an answer to paho (QoS 1) without waiting for its PUBACK; False if it cannot
        go now (no connection). An answer lost with this process is made good by the gateway,
        which sends the batch again after its ack timeout and gets `replay`."""
        return self.client.publish(topic, payload, qos=1).rc == paho.MQTT_ERR_SUCCESS


def _gw_of(msg: Msg) -> str:
    """The gateway of the topic a batch came on (`{prefix}/{gw}/batch`)."""
    parts = msg.subject.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def _nodelay(_c: paho.Client, _u: object, sock: Any) -> None:
    # acks are small: not held back by Nagle's algorithm behind unacknowledged data
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class BusStats:
    stored: int = 0  # batches stored by this receiver
    answered: int = 0  # acks published (ok, replay, refusals)
    redelivered: int = 0  # messages seen more than once
    gap_retries: int = 0  # handed back, ahead of their chain
    gaps_answered: int = 0
    ack_failures: int = 0  # an answer that could not be sent: the message comes back
    store_failures: int = 0  # the store raised: the message is handed back
    by_reason: dict[str, int] = field(default_factory=dict)


class BusReceiver:
    """One receiver process's consumers: `workers` bulk workers and one alarm worker, each with
    its own store connection (`store_factory()`), sharing one NATS connection and one MQTT
    connection for the acks."""

    def __init__(self, store_factory: Callable[[], BatchStore], nats_urls: Sequence[str],
                 brokers: Sequence[tuple[str, int]], *, tls: PlatformTls | None = None,
                 prefix: str = "bank/v1", workers: int = 4, replicas: int = 3,
                 name: str | None = None) -> None:
        self.store_factory = store_factory
        self.nats_urls = list(nats_urls)
        self.prefix = prefix
        self.tls = tls
        self.workers = workers
        self.replicas = replicas
        self.name = name or f"receiver-{uuid.uuid4().hex[:8]}"
        self.acks = AckPublisher(brokers, tls, f"branch-platform-{self.name}")
        self.stats = BusStats()
        self.ready = asyncio.Event()
        self._all_stores: list[BatchStore] = []

    async def run(self, stop: asyncio.Event) -> None:
        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            kwargs.update(tls=_tls_context(self.tls), tls_hostname="localhost")
        # drain_timeout: at stop, what was fetched and not acked is simply redelivered (to
        # another receiver, or to this one when it is back); nats.py's default of 30 s made
        # every stop wait that long for a pull subscription that never drains.
        nc = await nats.connect(self.nats_urls, name=self.name, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.5, drain_timeout=DRAIN_TIMEOUT_S,
                                **kwargs)
        self.acks.start()
        try:
            js = nc.jetstream(timeout=10)
            await self._retry(lambda: ensure_stream(js, self.prefix, replicas=self.replicas))
            for _ in range(self.workers + 1):
                store = await asyncio.to_thread(self.store_factory)
                self._all_stores.append(store)
            filters = subjects(self.prefix)
            async with asyncio.TaskGroup() as tg:
                tasks = []
                for kind, durable in CONSUMERS.items():
                    sub = await self._retry(functools.partial(
                        js.pull_subscribe, filters[kind], durable=durable, stream=STREAM))
                    stores = self._all_stores[:1] if kind == "alarm" else self._all_stores[1:]
                    queues: list[asyncio.Queue[Msg]] = [asyncio.Queue(FETCH) for _ in stores]
                    tasks.append(tg.create_task(self._fetch(sub, queues), name=f"bus-{kind}"))
                    tasks += [tg.create_task(self._work(q, store), name=f"bus-{kind}-{i}")
                              for i, (q, store) in enumerate(zip(queues, stores, strict=True))]
                self.ready.set()
                log.info("platform.bus.consuming", stream=STREAM, receiver=self.name,
                         workers=self.workers)
                await stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
            await asyncio.to_thread(self.acks.stop)
            for store in self._all_stores:
                await asyncio.to_thread(store.close)

    @staticmethod
    async def _retry(make: Callable[[], Any], within_s: float = 60.0) -> Any:
        """JetStream calls while the cluster elects a leader (a node just killed) time out:
        try again for `within_s`."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                return await make()
            except (TimeoutError, nats.errors.Error) as exc:
                if time.monotonic() > deadline:
                    raise
                if isinstance(exc, nats.js.errors.BadRequestError):
                    raise  # a request the server will never take: no point trying again
                log.warning("platform.bus.retry", error=repr(exc))
                await asyncio.sleep(0.5)  # backoff before the next attempt

    async def _fetch(self, sub: Any, queues: list[asyncio.Queue[Msg]]) -> None:
        """Take messages from the stream in its order and hand each to the worker of its
        gateway (`_gw_of`): within this receiver a gateway's batches are stored in order."""
        while True:
            try:
                # One message, as soon as there is one (a fetch of several waits until it has
                # them all or it expires), then what else is there right now.
                msgs = await sub.fetch(1, timeout=5.0)
            except TimeoutError:
                continue  # nothing to do right now
            except nats.errors.Error as exc:  # a node lost: the client reconnects to another
                log.warning("platform.bus.fetch_failed", error=repr(exc))
                await asyncio.sleep(0.2)  # backoff while the client reconnects
                continue
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                msgs += await sub.fetch(FETCH - 1, timeout=0.01)
            for msg in msgs:
                await queues[zlib.crc32(_gw_of(msg).encode()) % len(queues)].put(msg)

    async def _work(self, q: asyncio.Queue[Msg], store: BatchStore) -> None:
        while True:
            await self._one(await q.get(), store)

    async def _one(self, msg: Msg, store: BatchStore) -> None:
        topic_gw = _gw_of(msg)
        meta = msg.metadata
        if meta.num_delivered > 1:
            self.stats.redelivered += 1
        try:
            ack = await asyncio.to_thread(store.handle_batch, msg.data, topic_gw)
        except Exception:  # the store failed (a lost connection, a duplicate event: logged):
            # nothing answered, the message comes back later and the receiver goes on
            self.stats.store_failures += 1
            log.exception("platform.bus.store_failed", gw=topic_gw)
            with contextlib.suppress(Exception):
                await msg.nak(delay=STORE_RETRY_S)
            return
        if not ack.ok and ack.err == "gap":
            n = meta.num_delivered
            if n < GAP_GIVE_UP:
                self.stats.gap_retries += 1
                await msg.nak(delay=min(GAP_RETRY_S * 2 ** max(0, n - 4), GAP_RETRY_MAX_S))
                return
            self.stats.gaps_answered += 1
        if ack.ok:
            self.stats.stored += 1
        else:
            reason = ack.err or "unspecified"
            self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
        topic = f"{self.prefix}/{topic_gw}/ack"
        if not self.acks.send(topic, encode_ack(ack)):
            self.stats.ack_failures += 1
            log.warning("platform.bus.ack_not_sent", gw=topic_gw, seq=ack.seq)
            with contextlib.suppress(Exception):
                await msg.nak(delay=STORE_RETRY_S)  # it comes back, and is answered again
            return
        self.stats.answered += 1
        try:
            await msg.ack()
        except (TimeoutError, nats.errors.Error) as exc:
            # stored and answered: a redelivery will be a replay, answered again
            log.warning("platform.bus.stream_ack_failed", gw=topic_gw, error=repr(exc))
