"""The reference platform's MQTT side: take batches from `{prefix}/+/batch` (the bulk lane) and
`{prefix}/+/alarm` (the alarm lane), ack both on `{prefix}/{gw}/ack` (QoS 1).

One paho client per topic, each with its own connection and network thread (`loop_start`):
an alarm's batch reaches the Receiver while the bulk client is still working through the bulk
batches queued ahead of it (in the broker, in its socket), and its ack does not queue behind
theirs (docs/PROTOCOL.md 5). The Receiver is thread-safe and lets the alarm handler in before
the next bulk one; this is the simulator, not the gateway, so paho's own threads are fine. A
batch's lane is what its signed payload says, whichever topic it came on. With
`shared_group`, several platform instances share both subscriptions (`$share/{group}/...`).
They must share one store file too (`--db`, on one host: SQLite's WAL needs shared memory): the
hash chains are per gateway and lane, and the broker hands a gateway's in-flight batches to the
instances in turn.

With `supervision` (branchsim.platform.supervision), the last client (the alarm lane's, or the
only one) also reads the gateways' path heartbeats on `{prefix}/+/heartbeat` and answers each
on `{prefix}/{gw}/hb-ack`, QoS 0 both ways (docs/PROTOCOL.md 7): a liveness signal kept in a
session and delivered late would report a dead path as alive. Not with `shared_group`: one
instance's supervision would see only its share of the heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol import encode_ack
from branchsim.platform.rules import BatchStore

__all__ = ["HeartbeatHandler", "MqttPlatformServer", "PlatformTls", "serve_mqtt"]

log = structlog.get_logger(__name__)

# With a shared subscription, a batch may overtake its predecessor, which another instance is
# storing: wait for it rather than answer `gap` (the gateway would resend its whole window).
# Well under the gateway's ack timeout (15 s by default); a predecessor really lost still ends
# in a `gap` ack.
SHARED_GAP_WAIT_S = 5.0


class HeartbeatHandler(Protocol):
    """What the MQTT side needs of `branchsim.platform.supervision.Supervision`."""

    def handle_heartbeat(self, data: bytes, via: str, topic_gw: str | None = None
                         ) -> bytes: ...


@dataclass(frozen=True)
class PlatformTls:
    ca: Path
    cert: Path
    key: Path


class MqttPlatformServer:
    """Subscribe to every gateway's batches of both lanes, verify them with `receiver`, publish
    the acks."""

    def __init__(
        self,
        receiver: BatchStore,
        host: str,
        port: int,
        *,
        tls: PlatformTls | None = None,
        prefix: str = "bank/v1",
        shared_group: str | None = None,
        client_id: str | None = None,
        supervision: HeartbeatHandler | None = None,
    ) -> None:
        if supervision is not None and shared_group:
            raise ValueError("path supervision needs every heartbeat: not with a shared group")
        self.receiver = receiver
        self.supervision = supervision
        self.host, self.port, self.prefix = host, port, prefix
        self.batch_filter = f"{prefix}/+/batch"
        self.alarm_filter = f"{prefix}/+/alarm"
        self.gap_wait_s = 0.0
        if shared_group:
            self.batch_filter = f"$share/{shared_group}/{self.batch_filter}"
            self.alarm_filter = f"$share/{shared_group}/{self.alarm_filter}"
            self.gap_wait_s = SHARED_GAP_WAIT_S
        self.ready = threading.Event()  # set once both subscriptions are granted
        self.handled = 0
        self.handled_on = {"batch": 0, "alarm": 0}  # by the topic they came on
        self._granted: set[str] = set()
        self._state_lock = threading.Lock()  # `handled` and `_granted`: two paho threads
        client_id = client_id or f"branch-platform-{uuid.uuid4().hex[:8]}"
        filters = [(self.batch_filter, 1)]
        if receiver.lanes:  # a platform from before lanes does not read the alarm topic
            filters.append((self.alarm_filter, 1))
        self._clients = [self._client(client_id if i == 0 else f"{client_id}-alarm", [f], tls)
                         for i, f in enumerate(filters)]
        if supervision is not None:  # on the last client: apart from the bulk batches
            heartbeats = (f"{prefix}/+/heartbeat", 0)
            self._clients[-1].user_data_set([*self._clients[-1].user_data_get(), heartbeats])

    def _client(self, client_id: str, filters: list[tuple[str, int]], tls: PlatformTls | None
                ) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5, userdata=filters)
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
            client.tls_set_context(ctx)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.reconnect_delay_set(1, 10)
        return client

    @staticmethod
    def _on_socket_open(client: paho.Client, _u: object, sock: Any) -> None:
        # Acks are small: without TCP_NODELAY each waits for the delayed-ACK timer (~40 ms).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: paho.Client, filters: list[tuple[str, int]], _f: object,
                    rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            log.error("platform.mqtt.refused", reason=rc.getName(), filters=filters)
            return
        client.subscribe(filters)

    def _on_subscribe(self, client: paho.Client, filters: list[tuple[str, int]], _mid: int,
                      rcs: list[ReasonCode], _p: object) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("platform.mqtt.subscribe_refused", filters=filters)
            return
        with self._state_lock:
            self._granted.add(filters[0][0])
            granted = sorted(self._granted)
        if len(granted) == len(self._clients):
            log.info("platform.mqtt.subscribed", filters=granted)
            self.ready.set()

    def _on_message(self, client: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        topic_gw = parts[-2] if len(parts) >= 2 else ""
        if parts[-1] == "heartbeat" and self.supervision is not None:
            try:
                answer = self.supervision.handle_heartbeat(bytes(msg.payload), "mqtt", topic_gw)
            except Exception:  # a bug here must not stop the platform; it goes unanswered
                log.exception("platform.mqtt.heartbeat_failed", topic=msg.topic)
                return
            client.publish(f"{self.prefix}/{topic_gw}/hb-ack", answer, qos=0)
            return
        try:
            ack = self.receiver.handle_batch(bytes(msg.payload), topic_gw=topic_gw,
                                             gap_wait_s=self.gap_wait_s,
                                             urgent=parts[-1] == "alarm")
        except Exception:  # a bug here must not stop the platform; the batch stays unacked
            log.exception("platform.mqtt.handle_failed", topic=msg.topic)
            return
        with self._state_lock:
            self.handled += 1
            self.handled_on[parts[-1]] = self.handled_on.get(parts[-1], 0) + 1
        # From the client the batch came on: an alarm's ack does not wait behind bulk acks.
        client.publish(f"{self.prefix}/{topic_gw}/ack", encode_ack(ack), qos=1)

    def start(self) -> MqttPlatformServer:
        # A persistent session: batches published while the platform is reconnecting wait in
        # the broker instead of being dropped for lack of a subscriber.
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
        props.SessionExpiryInterval = 3600
        try:
            for client in self._clients:
                client.connect(self.host, self.port, keepalive=30, clean_start=False,
                               properties=props)
                client.loop_start()
        except BaseException:
            self.stop()  # the client that did connect: no half-started server
            raise
        return self

    def stop(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> MqttPlatformServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


async def serve_mqtt(
    receiver: BatchStore,
    host: str,
    port: int,
    tls: PlatformTls | None = None,
    prefix: str = "bank/v1",
    shared_group: str | None = None,
    supervision: HeartbeatHandler | None = None,
) -> None:
    """Run the MQTT side of the platform until cancelled."""
    server = MqttPlatformServer(receiver, host, port, tls=tls, prefix=prefix,
                                shared_group=shared_group, supervision=supervision)
    await asyncio.to_thread(server.start)  # blocking connect + TLS handshake
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.to_thread(server.stop)
