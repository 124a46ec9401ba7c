"""CoAP ingest: IP sensors on the branch LAN POST SenML (RFC 8428) to the gateway.

One aiocoap server per configured endpoint serves ``/.well-known/core`` and
``POST /ingest/{sensor}`` with SenML as JSON (content-format 110) or CBOR (112). A request is
answered 2.04 only after `Sink.submit_many` returned, i.e. after every reading of the request is
durably committed by the outbox: a sensor that got 2.04 may forget its readings. Errors:

=====  ==================================================================================
4.00   malformed SenML (the payload says why, in our words); nothing of the request is kept
4.03   the sensor is not configured, or the source address is not in its allowlist
4.13   payload larger than ``max_payload`` (also checked per block before reassembly) or
       more than ``max_records`` records; Size1 tells the limit
4.15   any other content format
4.29   Too Many Requests (RFC 8516): over the sensor's ``rate_limit_hz`` (checked after the
       allowlist, before any decoding; each block of a block-wise post counts); Max-Age =
       seconds until the sensor has a token again
--     over the endpoint's ``global_rate_hz`` (every datagram, any peer): dropped unanswered
       before aiocoap parses it (counted as ``flooded``): a flooder ignores Max-Age anyway, and
       an answer would cost what the limit is there to save (see `_GatedUDP6`)
5.03   ``max_concurrent`` requests already wait for the outbox (Max-Age 1), or the outbox
       refused that priority (quota; Max-Age = the outbox's retry hint)
5.00   an unexpected fault in the agent (logged with its traceback; the peer gets two words)
=====  ==================================================================================

Flood resistance: the ingest shares the event loop with the GPIO alarms, so a flood must cost
O(1) per datagram. The token buckets are checked before any parsing of the payload, refused
requests are answered from a constant, the requests waiting for the outbox are bounded, and
rejections are logged at most once per `REJECT_LOG_INTERVAL` per kind (with how many were held
back) so a flood is not turned into a log flood. Every rejection is counted in `health.errors`.
Answers to peers are short fixed texts: never an exception text or a traceback.

Transport security: this is plain CoAP on the branch LAN; sensors are identified by their
source address only (the border router / VLAN is the trust boundary). OSCORE for ingest is not
implemented yet.

The SenML resolver is drivers.coap.senml (pure); the config models are drivers.coap.config.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import math
from collections.abc import Callable
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.resource
import structlog
from aiocoap.transports.udp6 import MessageInterfaceUDP6

from agent.core.backoff import Backoff
from agent.core.errors import RefusedError
from agent.core.thirdparty import add_transport
from agent.core.types import ALERT, Reading, Value
from drivers.base import Sink, Source, SourceContext, SourceHealth, SourceState
from drivers.coap.config import CoapIngestConfig
from drivers.coap.senml import CF_SENML_CBOR, CF_SENML_JSON, SenMLRecord, decode_senml
from drivers.ratelimit import REJECT_LOG_INTERVAL, LogGates, TokenBucket

__all__ = ["REJECT_LOG_INTERVAL", "CoapIngestSource", "build_sources"]

log = structlog.get_logger(__name__)

def _remote_ip(remote: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    sockaddr = getattr(remote, "sockaddr", None)
    if not sockaddr:
        return None
    try:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # udp6 transport: IPv4 peers arrive as ::ffff:a.b.c.d
    return ip


def _answer(code: aiocoap.numbers.codes.Code, text: str = "", **opts: Any) -> aiocoap.Message:
    return aiocoap.Message(code=code, payload=text.encode(), **opts)


class _IngestResource(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]  # aiocoap is untyped
    """``/ingest/{sensor}``: checks before block-wise reassembly, commits, then answers."""

    def __init__(self, source: CoapIngestSource) -> None:
        super().__init__()
        self._src = source

    def _precheck(self, request: aiocoap.Message) -> aiocoap.Message | None:
        """Access and size checks that must happen before any block is stored."""
        src = self._src
        path = request.opt.uri_path
        if len(path) != 1 or path[0] not in src.sensors:
            return src.reject("forbidden", aiocoap.FORBIDDEN, "unknown sensor", request)
        ip = _remote_ip(request.remote)
        if ip is None or not any(ip in net for net in src.sensors[path[0]].allow):
            return src.reject("forbidden", aiocoap.FORBIDDEN, "address not allowed", request)
        bucket = src.buckets[path[0]]
        if not bucket.take():
            return src.reject(
                "rate_limited",
                aiocoap.TOO_MANY_REQUESTS,
                "too many requests",
                request,
                max_age=bucket.retry_after_s(),
            )
        if request.code is not aiocoap.POST:
            return None  # the render method answers 4.05
        limit = src.cfg.max_payload
        b1 = request.opt.block1
        end = len(request.payload) if b1 is None else b1.start + len(request.payload)
        if end > limit or (request.opt.size1 or 0) > limit:
            return src.reject(
                "oversize",
                aiocoap.REQUEST_ENTITY_TOO_LARGE,
                "payload too large",
                request,
                size1=limit,
            )
        cf = request.opt.content_format
        if cf not in (CF_SENML_JSON, CF_SENML_CBOR):
            return src.reject(
                "unsupported_format",
                aiocoap.UNSUPPORTED_CONTENT_FORMAT,
                "SenML JSON (110) or CBOR (112) only",
                request,
            )
        return None

    async def render_to_pipe(self, pipe: Any) -> None:
        refusal = self._precheck(pipe.request)
        if refusal is not None:
            pipe.add_response(refusal, is_last=True)
            return
        await super().render_to_pipe(pipe)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._src.ingest(request.opt.uri_path[0], request)


class _WellKnownCore(aiocoap.resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    """``/.well-known/core`` (RFC 6690) for one asker: only the ingest resources its address may
    post to, and no implementation link (aiocoap's default names the library and its version
    to anyone who can reach the port)."""

    def __init__(self, source: CoapIngestSource) -> None:
        super().__init__()
        self._src = source

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        from aiocoap.numbers import ContentFormat
        from aiocoap.util.linkformat import Link, LinkFormat

        links = LinkFormat([Link(f"/ingest/{name}", ct=f"{CF_SENML_JSON} {CF_SENML_CBOR}")
                            for name in self._src.sensors_for(request.remote)])
        return aiocoap.Message(payload=str(links).encode(),
                               content_format=ContentFormat.LINKFORMAT)


class _GatedUDP6(MessageInterfaceUDP6):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's udp6 server transport with a gate in front of message parsing.

    aiocoap keeps every request's message id and its response for EXCHANGE_LIFETIME (247 s) to
    deduplicate retransmissions: measured here at ~3 KB per request, and with a few 10 000s of
    them the cyclic garbage collector pauses the event loop (and so the GPIO alarms) for 50 to
    100 ms at a time. A datagram over the endpoint-wide bucket is therefore dropped here, before
    aiocoap parses or remembers it. Relies on aiocoap 0.4's `datagram_msg_received` (listed in
    agent.core.thirdparty, whose test checks it is still there).
    """

    admit: Callable[[], bool] | None = None

    def datagram_msg_received(self, data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        if self.admit is not None and not self.admit():
            return
        super().datagram_msg_received(data, ancdata, flags, address)


def _request_key(sensor: str, request: aiocoap.Message) -> str:
    """The request's identity for the outbox's idempotency keys: a retransmission (same
    message id and token, same bytes, from the same peer) that reaches the agent after a crash
    and restart, when aiocoap's in-memory deduplication is gone, is not stored twice."""
    digest = hashlib.sha256(request.payload).hexdigest()[:16]
    token = request.token.hex() if request.token else "-"
    return f"coap:{sensor}:{_remote_ip(request.remote)}:{request.mid}:{token}:{digest}"


class CoapIngestSource:
    """The ingest endpoint as a `Source`: binds, serves until cancelled, re-binds with backoff."""

    def __init__(self, cfg: CoapIngestConfig, ctx: SourceContext) -> None:
        self.cfg = cfg
        self.name = f"coap.{cfg.name}"
        self.health = SourceHealth(name=self.name, kind="coap")
        self.sensors = {s.name: s for s in cfg.sensors}
        self.sensor_names = tuple(self.sensors)
        self.started = asyncio.Event()  # set while the socket is bound (tests and bench wait)
        self._clock = ctx.clock
        mono = ctx.clock.monotonic
        self.global_bucket = TokenBucket(cfg.global_rate_hz, cfg.global_burst, mono)
        self.buckets = {
            s.name: TokenBucket(
                s.rate_limit_hz or cfg.rate_limit_hz, s.rate_burst or cfg.rate_burst, mono
            )
            for s in cfg.sensors
        }
        self.inflight = 0  # requests waiting for the outbox (bounded by cfg.max_concurrent)
        self._gates = LogGates(self._clock.monotonic)
        self._sink: Sink | None = None
        self._log = log.bind(source=self.name)

    def _admit_datagram(self) -> bool:
        """The endpoint-wide bucket, per datagram, before aiocoap sees it."""
        if self.global_bucket.take():
            return True
        self.health.count("flooded")
        held = self._gate("flooded")
        if held is not None:
            self._log.warning(
                "coap.flooded",
                rate_hz=self.cfg.global_rate_hz,
                not_logged_since_last=held,
                total=self.health.errors["flooded"],
            )
        return False

    async def _serve(self) -> aiocoap.Context:
        """What `aiocoap.Context.create_server_context` does for udp6, with the gated transport."""
        loop = asyncio.get_running_loop()
        ctx = aiocoap.Context(loop=loop, serversite=self._site(), loggername="coap-server")

        async def transport(mman: Any) -> _GatedUDP6:
            proto: _GatedUDP6 = await _GatedUDP6.create_server_transport_endpoint(
                mman, log=ctx.log, loop=loop, bind=(self.cfg.bind, self.cfg.port), multicast=[]
            )
            proto.admit = self._admit_datagram
            return proto

        try:
            await add_transport(ctx, transport)  # a private aiocoap API: agent.core.thirdparty
        except BaseException:
            await ctx.shutdown()
            raise
        return ctx

    def _gate(self, what: str) -> int | None:
        return self._gates.open(what)

    def reject(
        self, what: str, code: Any, text: str, request: aiocoap.Message, **opts: Any
    ) -> aiocoap.Message:
        """Count the rejection, log it unless one of its kind was logged lately, answer."""
        self.health.count(what)
        held = self._gate(what)
        if held is not None:
            self._log.info(
                "coap.rejected",
                what=what,
                path=request.opt.uri_path,
                remote=str(request.remote),
                not_logged_since_last=held,
                total=self.health.errors[what],
            )
        return _answer(code, text, **opts)

    async def ingest(self, sensor: str, request: aiocoap.Message) -> aiocoap.Message:
        if self.inflight >= self.cfg.max_concurrent:
            return self.reject(
                "busy", aiocoap.SERVICE_UNAVAILABLE, "busy, retry later", request, max_age=1
            )
        self.inflight += 1
        try:
            return await self._ingest(sensor, request)
        except Exception:  # a bug must not reach the peer: it gets 5.00 only
            self.health.count("internal")
            if self._gate("internal") is not None:
                self._log.exception("coap.internal_error", sensor=sensor)
            return _answer(aiocoap.INTERNAL_SERVER_ERROR, "internal error")
        finally:
            self.inflight -= 1

    async def _ingest(self, sensor: str, request: aiocoap.Message) -> aiocoap.Message:
        cfg = self.sensors[sensor]
        result = decode_senml(
            request.payload,
            request.opt.content_format or 0,
            self._clock.time(),
            max_records=self.cfg.max_records,
        )
        if result.error is not None:
            if result.error.startswith("too many records"):
                return self.reject(
                    "oversize", aiocoap.REQUEST_ENTITY_TOO_LARGE, result.error, request
                )
            return self.reject("malformed", aiocoap.BAD_REQUEST, result.error, request)
        readings = [_reading(f"coap.{sensor}", r, cfg.priority) for r in result.records]
        assert self._sink is not None  # the site is only served inside run()
        try:
            await self._sink.submit_many(readings, key=_request_key(sensor, request))
        except RefusedError as exc:
            self.health.count("refused")
            if self._gate("refused") is not None:
                self._log.warning("coap.refused", sensor=sensor, priority=exc.priority)
            return _answer(
                aiocoap.SERVICE_UNAVAILABLE,
                "outbox full for this priority",
                max_age=max(1, math.ceil(exc.retry_after)),
            )
        self.health.readings += len(readings)
        self.health.last_reading = self._clock.time()
        return aiocoap.Message(code=aiocoap.CHANGED)

    def _site(self) -> aiocoap.resource.Site:
        site = aiocoap.resource.Site()
        site.add_resource((".well-known", "core"), _WellKnownCore(self))
        site.add_resource(("ingest",), _IngestResource(self))
        return site

    def sensors_for(self, remote: object) -> list[str]:
        """The sensors whose allowlist has the asker's address: all it may post to."""
        ip = _remote_ip(remote)
        if ip is None:
            return []
        return [name for name, s in self.sensors.items() if any(ip in net for net in s.allow)]

    async def run(self, sink: Sink) -> None:
        self._sink = sink
        backoff = Backoff()
        was_online = False
        try:
            while True:
                try:
                    ctx = await self._serve()
                except (OSError, aiocoap.error.Error) as exc:
                    # the LAN address may appear later (DHCP, interface still down)
                    self.health.count("bind")
                    self.health.detail = f"cannot bind {self.cfg.bind}:{self.cfg.port}: {exc}"
                    self._log.warning("coap.bind_failed", error=str(exc))
                    if was_online or self.health.state is SourceState.STARTING:
                        await self._status(sink, "source.offline")
                    self.health.state = SourceState.OFFLINE
                    was_online = False
                    await backoff.wait()
                    continue
                backoff.reset()
                try:
                    if self.health.state is SourceState.OFFLINE:
                        await self._status(sink, "source.online")
                    self.health.state = SourceState.ONLINE
                    self.health.detail = f"listening on {self.cfg.bind}:{self.cfg.port}"
                    was_online = True
                    self.started.set()
                    self._log.info("coap.listening", bind=self.cfg.bind, port=self.cfg.port)
                    await asyncio.Future()  # serve until cancelled
                finally:
                    self.started.clear()
                    await ctx.shutdown()
        finally:
            self.health.state = SourceState.STOPPED

    async def _status(self, sink: Sink, type_: str) -> None:
        try:
            await sink.submit(
                Reading(self.name, type_, self.health.detail, ts=self._clock.time(), priority=ALERT)
            )
        except RefusedError:
            self.health.count("refused")


def _reading(source: str, rec: SenMLRecord, priority: int) -> Reading:
    value: Value
    if isinstance(rec.value, bytes):
        value = rec.value.hex()
        attrs: dict[str, Any] | None = {"encoding": "hex"}
    else:
        value, attrs = rec.value, None
    if rec.sum is not None:
        attrs = {**(attrs or {}), "sum": rec.sum}
    return Reading(
        source, rec.name, value, unit=rec.unit, ts=rec.time, priority=priority, attrs=attrs
    )


def build_sources(cfg: CoapIngestConfig, ctx: SourceContext) -> list[Source]:
    """One source serving every configured sensor."""
    return [CoapIngestSource(cfg, ctx)]
