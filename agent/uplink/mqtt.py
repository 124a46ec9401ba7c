"""MQTT uplink: paho-mqtt 2.x driven from the asyncio event loop, without paho's network thread.

The adapter follows aiomqtt 2.x (`aiomqtt/client.py`): paho's socket callbacks register the
socket with `loop.add_reader/add_writer`, `loop_misc` runs from a periodic task (keepalive
pings, dead-connection detection), and each QoS 1 publish is a Future keyed by its message id,
resolved on PUBACK, removed in `finally`, failed with `UplinkDownError` on disconnect.

Only `connect()` (TCP connect + TLS handshake, both blocking in paho) runs in an executor
thread; paho calls the socket callbacks from there, so they cross into the loop thread through
`call_soon_threadsafe` (the one place threads are crossed in this module).

The session is persistent (MQTT 5: clean_start=False + session expiry; 3.1.1: clean session
off) under a stable client id, so acks published while the gateway was offline are delivered
when it reconnects.

Downlink commands (docs/COMMANDS.md): with a handler set (`set_command_handler`), the uplink
also subscribes to `{prefix}/{gw}/cmd` (QoS 1) and hands each message's raw bytes to it; it does
not interpret them (agent.commands verifies them). Answers go to `{prefix}/{gw}/cmd-ack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.core.backoff import Backoff
from agent.core.thirdparty import close_unconnected_socket
from agent.protocol.commands import MAX_COMMAND_BYTES
from agent.uplink.base import FailureKind, UplinkDownError, UplinkFailure
from agent.uplink.config import MqttTlsConfig, MqttUplinkConfig, topics

__all__ = ["MqttTlsConfig", "MqttUplink", "MqttUplinkConfig", "read_available", "set_nodelay",
           "topics"]

log = structlog.get_logger(__name__)


class MqttConnectError(UplinkDownError):
    """A connection attempt failed; `hint` says what the operator should check."""

    def __init__(self, message: str, hint: str,
                 kind: FailureKind = "other") -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.hint = hint
        self.kind: FailureKind = kind

    def failure(self) -> UplinkFailure:
        return UplinkFailure(kind=self.kind, message=str(self))


def _classify(exc: BaseException, cfg: MqttUplinkConfig) -> MqttConnectError:
    """Turn a connect failure into an error with advice for the operator."""
    where = f"{cfg.host}:{cfg.port}"
    if isinstance(exc, MqttConnectError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = cfg.tls.ca if cfg.tls else "?"
        return MqttConnectError(
            f"TLS: the broker's certificate at {where} failed verification: "
            f"{exc.verify_message}",
            f"check that tls.ca ({ca}) is the CA that issued the broker's certificate and that "
            f"'{cfg.host}' is in its subjectAltName",
            kind="tls",
        )
    if isinstance(exc, ssl.SSLError):
        return MqttConnectError(
            f"TLS handshake with {where} failed: {exc.reason or exc}",
            "the broker may have rejected the gateway certificate: check tls.cert/tls.key are "
            "issued by the CA the broker trusts and not expired",
            kind="tls",
        )
    if isinstance(exc, ConnectionRefusedError):
        return MqttConnectError(f"connection to {where} refused",
                                "is the broker running and listening on that port?",
                                kind="network")
    if isinstance(exc, TimeoutError | socket.timeout):
        return MqttConnectError(f"connection to {where} timed out",
                                "check the WAN link and firewall", kind="network")
    if isinstance(exc, socket.gaierror):
        return MqttConnectError(f"cannot resolve {cfg.host}: {exc.strerror}", "check DNS",
                                kind="network")
    if isinstance(exc, OSError):
        return MqttConnectError(f"connection to {where} failed: {exc.strerror or exc}", "",
                                kind="network")
    return MqttConnectError(f"connection to {where} failed: {type(exc).__name__}: {exc}", "")


class MqttUplink:
    """One MQTT connection to the bank's broker (see module doc)."""

    def __init__(self, cfg: MqttUplinkConfig, gw: str) -> None:
        self.cfg = cfg
        self.gw = gw
        self.name = f"mqtt:{cfg.host}:{cfg.port}"
        self.client_id = cfg.client_id or f"branch-agent-{gw}"
        self.topics = topics(cfg.topic_prefix, gw)
        self.last_error: UplinkFailure | None = None
        self._log = log.bind(uplink=self.name, gw=gw)
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._connected = False
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._connack: asyncio.Future[None] | None = None
        self._disconnected: asyncio.Future[None] | None = None
        self._on_ack: Callable[[bytes], None] = lambda _b: None
        self._on_command: Callable[[bytes], None] | None = None
        self.counters: dict[str, int] = {
            "commands_dropped": 0,  # oversized, dropped unread
            "subscribe_refused": 0,  # SUBACKs refusing the ack (or command) topic
            "heartbeat_subscribe_refused": 0,  # SUBACKs refusing the heartbeat answers' topic
        }
        self.heartbeat_interval_s = cfg.heartbeat_interval_s
        self.heartbeat_timeout_s = cfg.heartbeat_timeout_s
        self._hb_answers: asyncio.Queue[bytes] | None = None  # while a heartbeat waits
        self._hb_sub_mid: int | None = None
        self._fds: set[int] = set()
        self._connecting = False

    @property
    def connected(self) -> bool:
        return self._connected

    # --- the paho client ------------------------------------------------------------------

    def _tls_context(self, tls: MqttTlsConfig) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        return ctx

    def _make_client(self) -> paho.Client:
        v5 = self.cfg.protocol == "v5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False,
        )
        client.max_inflight_messages_set(self.cfg.inflight)
        client.connect_timeout = self.cfg.connect_timeout
        client.will_set(
            self.topics["status"],
            json.dumps({"state": "offline", "gw": self.gw, "reason": "connection-lost"}),
            qos=1,
            retain=True,
        )
        if self.cfg.tls is not None:
            try:
                client.tls_set_context(self._tls_context(self.cfg.tls))
            except (OSError, ssl.SSLError) as exc:
                raise MqttConnectError(
                    f"cannot load the TLS files: {exc}",
                    "check uplink.mqtt.tls ca/cert/key paths and that the agent may read them",
                    kind="tls",
                ) from None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    # --- socket callbacks: may run on the executor thread during connect() ----------------

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        set_nodelay(sock)
        self._in_loop(self._add_reader, sock.fileno())

    def _on_socket_close(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self._in_loop(self._forget_fd, sock.fileno())

    def _on_socket_register_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self._in_loop(self._add_writer, sock.fileno())

    def _on_socket_unregister_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self._in_loop(self._remove_writer, sock.fileno())

    def _add_reader(self, fd: int) -> None:
        assert self._loop is not None
        self._fds.add(fd)
        self._loop.add_reader(fd, self._readable)

    def _add_writer(self, fd: int) -> None:
        assert self._loop is not None and self._client is not None
        if fd in self._fds:  # not for a socket that closed before this call arrived
            self._loop.add_writer(fd, self._client.loop_write)

    def _remove_writer(self, fd: int) -> None:
        assert self._loop is not None
        if fd >= 0:
            self._loop.remove_writer(fd)

    def _forget_fd(self, fd: int) -> None:
        assert self._loop is not None
        self._fds.discard(fd)
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)

    def _readable(self) -> None:
        assert self._client is not None
        read_available(self._client)

    async def _misc(self, client: paho.Client) -> None:
        while True:
            if not self._connecting:  # connect() on the executor thread owns paho's state
                client.loop_misc()  # keepalive pings; drops a connection gone silent
            await asyncio.sleep(1.0)

    # --- protocol callbacks (on the loop thread: they come from loop_read/loop_misc) -------

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, rc: ReasonCode,
                    _p: Any) -> None:
        fut = self._connack
        if rc.is_failure:
            hint = ("the broker does not speak this MQTT version: set [uplink.mqtt] protocol = "
                    '"v311" (a NATS broker speaks MQTT 3.1.1 only)'
                    if rc.getName() == "Unsupported protocol version"
                    else "check the gateway certificate is registered with the broker")
            if fut is not None and not fut.done():
                fut.set_exception(MqttConnectError(
                    f"broker refused the connection: {rc.getName()}", hint))
            return
        client.subscribe(self.topics["ack"], qos=1)
        # Heartbeat answers (QoS 0: a liveness answer is useless later) on a subscription of
        # their own: a broker ACL that refuses it must not cost the batch path its connection.
        self._hb_sub_mid = client.subscribe(self.topics["hb-ack"], qos=0)[1]
        if self._on_command is not None:
            client.subscribe(self.topics["cmd"], qos=1)
        client.publish(self.topics["status"], self._status_json({"state": "online"}), qos=1,
                       retain=True)
        self._log.info("mqtt.connected", session_present=bool(flags.session_present))
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_subscribe(self, client: paho.Client, _u: Any, mid: int, rcs: list[ReasonCode],
                      _p: Any) -> None:
        """A refused subscription would leave the gateway sending batches whose acks never
        come (a persistent session keeps what it has, so nothing else retries it): connect
        again, after the backoff. A broker refuses for good (an ACL), or for now: NATS refuses
        while its JetStream cannot make the session's consumer (a node lost, a connection
        storm after an outage)."""
        if not any(rc.is_failure for rc in rcs):
            return
        if mid == self._hb_sub_mid:
            self.counters["heartbeat_subscribe_refused"] += 1
            self._log.warning("mqtt.heartbeat_subscribe_refused",
                              hint=f"the broker's ACL refuses {self.topics['hb-ack']}: the "
                                   "path's heartbeats go unanswered (docs/PROTOCOL.md 7)")
            return
        self.counters["subscribe_refused"] += 1
        self._log.error("mqtt.subscribe_refused", reasons=[rc.getName() for rc in rcs],
                        hint="if it lasts, the broker's ACL refuses this gateway its "
                             f"{self.topics['ack']} or {self.topics['cmd']} topic")
        client.disconnect()

    def _on_disconnect(self, client: paho.Client, _u: Any, _flags: Any, rc: ReasonCode,
                       _p: Any) -> None:
        was = self._connected
        self._connected = False
        err = UplinkDownError(f"MQTT connection lost: {rc.getName()}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        if self._connack is not None and not self._connack.done():
            # Under mutual TLS, a close before CONNACK is the broker refusing our certificate
            # (mosquitto closes right after the handshake); without TLS it is the network.
            self._connack.set_exception(MqttConnectError(
                f"the broker closed the connection before accepting it: {rc.getName()}",
                "it may have rejected the gateway certificate: check tls.cert/tls.key are "
                "issued by the CA the broker trusts",
                kind="tls" if self.cfg.tls is not None else "network"))
        if self._disconnected is not None and not self._disconnected.done():
            self._disconnected.set_result(None)
        if was:
            self._log.warning("mqtt.disconnected", reason=rc.getName())

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.topics["cmd"] and self._on_command is not None:
            self._command(bytes(msg.payload))
            return
        if msg.topic == self.topics["hb-ack"]:
            if self._hb_answers is not None:
                with contextlib.suppress(asyncio.QueueFull):
                    self._hb_answers.put_nowait(bytes(msg.payload))
            return
        if msg.topic != self.topics["ack"]:
            return
        try:
            self._on_ack(bytes(msg.payload))
        except Exception:  # the forwarder's bug must not kill the network loop
            self._log.exception("mqtt.on_ack_failed")

    def _command(self, payload: bytes) -> None:
        if len(payload) > MAX_COMMAND_BYTES:
            self.counters["commands_dropped"] += 1
            self._log.warning("mqtt.command_too_large", size=len(payload))
            return
        assert self._on_command is not None
        try:
            self._on_command(payload)
        except Exception:  # the handler's bug must not kill the network loop
            self._log.exception("mqtt.on_command_failed")

    def _on_publish(self, client: paho.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Any) -> None:
        fut = self._pending.get(mid)
        if fut is None or fut.done():
            return  # e.g. a message paho re-sent from the session after a reconnect
        if rc.is_failure:
            fut.set_exception(UplinkDownError(f"broker refused the publish: {rc.getName()}"))
        else:
            fut.set_result(None)

    def _status_json(self, doc: Mapping[str, Any]) -> str:
        return json.dumps({"gw": self.gw, "ts": time.time(), **doc}, default=str)

    # --- the Uplink API -------------------------------------------------------------------

    def set_command_handler(self, on_command: Callable[[bytes], None]) -> None:
        """Receive downlink commands (raw bytes, on the loop thread). Call before `run()`; the
        subscription is made on every connect."""
        self._on_command = on_command

    async def publish_command_ack(self, data: bytes) -> None:
        """Publish one command acknowledgement (QoS 1); returns on PUBACK."""
        await self._publish(self.topics["cmd-ack"], data)

    async def run(self, on_ack: Callable[[bytes], None], on_state: Callable[[bool], None]) -> None:
        """Connect and stay connected until cancelled (see `agent.uplink.base.Uplink`)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._on_ack = on_ack
        backoff = Backoff(self.cfg.backoff_base, self.cfg.backoff_max)
        misc: asyncio.Task[None] | None = None
        connect_job: asyncio.Future[Any] | None = None
        try:
            while True:
                try:
                    if self._client is None:
                        self._client = self._make_client()
                        misc = asyncio.create_task(self._misc(self._client),
                                                   name=f"{self.name}:misc")
                    connect_job = self._start_connect(self._client)
                    self._connecting = True
                    try:
                        await connect_job
                    finally:
                        self._connecting = False
                    assert self._connack is not None
                    # Not asyncio.wait_for: on 3.11 it returns (or raises) a result that is
                    # ready when it is cancelled, and a CONNACK failing just as the agent stops
                    # made the loop go on forever, swallowing the stop.
                    async with asyncio.timeout(self.cfg.connect_timeout):
                        await asyncio.shield(self._connack)
                except Exception as exc:
                    if _cancelling():
                        raise asyncio.CancelledError from exc  # the stop wins over the retry
                    error = _classify(exc, self.cfg)
                    self.last_error = error.failure()
                    self._log.warning("mqtt.connect_failed", error=str(error).split(" (")[0],
                                      hint=error.hint, attempt=backoff.attempt + 1)
                    # A half-open socket (no CONNACK yet) is closed by the next connect().
                    await backoff.wait()
                    continue
                backoff.reset()
                self.last_error = None
                self._connected = True
                on_state(True)
                assert self._disconnected is not None
                await asyncio.shield(self._disconnected)  # cancelling run() must not cancel it
                on_state(False)
                await backoff.wait()
        finally:
            await self._shutdown(connect_job, misc, on_state)

    def _start_connect(self, client: paho.Client) -> asyncio.Future[Any]:
        assert self._loop is not None
        self._connack = self._loop.create_future()
        self._disconnected = self._loop.create_future()
        if self.cfg.protocol == "v5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
            props.SessionExpiryInterval = self.cfg.session_expiry
            call = functools.partial(client.connect, self.cfg.host, self.cfg.port,
                                     self.cfg.keepalive, clean_start=False, properties=props)
        else:
            call = functools.partial(client.connect, self.cfg.host, self.cfg.port,
                                     self.cfg.keepalive)
        return self._loop.run_in_executor(None, call)

    async def _shutdown(self, connect_job: asyncio.Future[Any] | None,
                        misc: asyncio.Task[None] | None, on_state: Callable[[bool], None]) -> None:
        client = self._client
        if connect_job is not None and not connect_job.done():
            # connect() cannot be interrupted; it is bounded by connect_timeout.
            with contextlib.suppress(Exception):
                await asyncio.shield(connect_job)
        if client is not None and self._connected:
            # A clean DISCONNECT suppresses the will, so say "offline" ourselves.
            client.publish(self.topics["status"],
                           self._status_json({"state": "offline", "reason": "stopped"}),
                           qos=1, retain=True)
            client.disconnect()
            if self._disconnected is not None and not self._disconnected.cancelled():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._disconnected), 2.0)
            on_state(False)
        self._connected = False
        if client is not None:
            # paho has no public close for a socket that never got a CONNACK
            close_unconnected_socket(client)
        for fd in list(self._fds):
            self._forget_fd(fd)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(UplinkDownError("uplink stopped"))
        if misc is not None:
            misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await misc
        self._client = None

    async def _publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        client = self._client
        if client is None or not self._connected or self._loop is None:
            raise UplinkDownError(f"{self.name} is not connected")
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise UplinkDownError(f"publish failed: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pending[info.mid] = fut
        try:
            await fut
        finally:
            if self._pending.get(info.mid) is fut:
                del self._pending[info.mid]

    async def send(self, seq: int, data: bytes, lane: int = 0) -> None:
        """Publish one batch (QoS 1), the alarm lane's on its own topic (the platform reads it
        apart: docs/PROTOCOL.md 5); returns on PUBACK. Raises UplinkDownError."""
        await self._publish(self.topics["alarm" if lane else "batch"], data)

    async def heartbeat(self, data: bytes, accept: Callable[[bytes], bool]) -> bytes:
        """Publish one heartbeat on `{prefix}/{gw}/heartbeat` and wait for its answer on
        `hb-ack` (see `agent.uplink.base.HeartbeatChannel`). QoS 0 both ways: a heartbeat held
        in a session and delivered late would report a dead path as alive."""
        client = self._client
        if client is None or not self._connected:
            raise UplinkDownError(f"{self.name} is not connected")
        answers: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self._hb_answers = answers
        try:
            info = client.publish(self.topics["heartbeat"], data, qos=0)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise UplinkDownError(f"heartbeat publish failed: {paho.error_string(info.rc)}")
            async with asyncio.timeout(self.heartbeat_timeout_s):
                while not accept(answer := await answers.get()):
                    pass
            return answer
        except TimeoutError:
            raise UplinkDownError(
                f"no heartbeat answer within {self.heartbeat_timeout_s} s") from None
        finally:
            if self._hb_answers is answers:
                self._hb_answers = None

    async def publish_status(self, doc: Mapping[str, Any]) -> None:
        """Publish a retained status document; returns on PUBACK. Raises UplinkDownError."""
        await self._publish(self.topics["status"], self._status_json(doc), retain=True)


def set_nodelay(sock: Any) -> None:
    """TCP_NODELAY on a paho client's new socket (`on_socket_open`): small packets (PUBACKs,
    acks) must not wait for the peer's delayed ACK; without it each batch waited ~40 ms in
    Nagle's algorithm (bench/README.md, docs/PROTOCOL.md 5)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def read_available(client: paho.Client) -> None:
    """`loop_read` for a paho client driven by an event loop's reader callback. TLS: one socket
    read may leave whole MQTT packets decrypted in the SSL buffer; the socket will not become
    readable for them, so they are read now (as paho's own `loop()` does)."""
    rc = client.loop_read()
    sock = client.socket()
    while rc == paho.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
        rc = client.loop_read()
        sock = client.socket()


def _cancelling() -> bool:
    """Whether the current task has been asked to stop (a cancellation an exception hid)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
