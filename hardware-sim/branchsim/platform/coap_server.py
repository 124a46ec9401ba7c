"""The reference platform's CoAP endpoint: the CoAP twin of its MQTT batch topic.

``POST /b/{gw}`` (content-format 18, COSE_Sign1, block-wise reassembled by aiocoap) is handed to
`Receiver.handle_batch` and answered 2.04 with the CBOR ack (content-format 60) as payload, ok or
with the reason, exactly as the MQTT ack topic would carry it. ``POST /s/{gw}`` (JSON) keeps the
gateway's latest status document. With `supervision`, ``POST /h/{gw}`` (content-format 18) takes
the gateway's CoAP path heartbeat and answers 2.04 with the heartbeat answer (content-format 60,
docs/PROTOCOL.md 7).

With `oscore` contexts (gateway id -> the platform's half from ``branch-platform oscore-pair``),
requests are OSCORE-protected (RFC 8613) and ``/b/{gw}`` and ``/s/{gw}`` take only requests
protected with the context of that same gateway (4.01 otherwise). Without, plain CoAP: batches
are still signed end to end, but not confidential.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import aiocoap
import aiocoap.credentials
import aiocoap.resource
import structlog

from agent.protocol import Ack, encode_ack
from agent.uplink.coap import oscore_credentials, release_oscore_contexts

__all__ = ["BatchHandler", "HeartbeatHandler", "serve_coap", "shutdown_coap"]

log = structlog.get_logger(__name__)

CF_COSE = 18
CF_JSON = 50
CF_CBOR = 60
MAX_BATCH = 1 << 20  # a batch is at most a few hundred kB; refuse to reassemble more


class BatchHandler(Protocol):
    """What the endpoint needs from `branchsim.platform.receiver.Receiver`."""

    def handle_batch(self, data: bytes, topic_gw: str | None = None) -> Ack: ...


class HeartbeatHandler(Protocol):
    """What the endpoint needs of `branchsim.platform.supervision.Supervision`."""

    def handle_heartbeat(self, data: bytes, via: str, topic_gw: str | None = None
                         ) -> bytes: ...


def _text(code: Any, text: str) -> aiocoap.Message:
    return aiocoap.Message(code=code, payload=text.encode())


class _PerGateway(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]  # aiocoap is untyped
    """Base for ``/x/{gw}``: the remaining path is exactly one gateway id, and with OSCORE the
    request was protected with that gateway's context."""

    def __init__(self, oscore_required: bool) -> None:
        super().__init__()
        self._oscore_required = oscore_required

    def get_resources_as_linkheader(self) -> Any:
        from aiocoap.util.linkformat import LinkFormat

        return LinkFormat([])

    async def render_to_pipe(self, pipe: Any) -> None:
        req = pipe.request
        b1 = req.opt.block1
        end = len(req.payload) if b1 is None else b1.start + len(req.payload)
        if len(req.opt.uri_path) != 1:
            pipe.add_response(_text(aiocoap.NOT_FOUND, "path is /x/{gateway}"), is_last=True)
        elif self._oscore_required and f":{req.opt.uri_path[0]}" not in getattr(
            req.remote, "authenticated_claims", ()
        ):
            log.warning("platform.coap_unauthenticated", gw=req.opt.uri_path[0],
                        remote=str(req.remote))
            pipe.add_response(
                _text(aiocoap.UNAUTHORIZED, "OSCORE with this gateway's context required"),
                is_last=True,
            )
        elif end > MAX_BATCH or (req.opt.size1 or 0) > MAX_BATCH:
            # checked per block, before aiocoap spools the blocks in memory
            msg = _text(aiocoap.REQUEST_ENTITY_TOO_LARGE, "batch too large")
            msg.opt.size1 = MAX_BATCH
            pipe.add_response(msg, is_last=True)
        else:
            await super().render_to_pipe(pipe)


class _Batches(_PerGateway):
    def __init__(self, receiver: BatchHandler, oscore_required: bool) -> None:
        super().__init__(oscore_required)
        self._receiver = receiver

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.content_format != CF_COSE:
            return _text(aiocoap.UNSUPPORTED_CONTENT_FORMAT, "application/cose (18) only")
        gw = request.opt.uri_path[0]
        ack = self._receiver.handle_batch(request.payload, topic_gw=gw)
        log.info("platform.coap_batch", gw=gw, seq=ack.seq, ok=ack.ok, err=ack.err)
        return aiocoap.Message(
            code=aiocoap.CHANGED, payload=encode_ack(ack), content_format=CF_CBOR
        )


class _Heartbeats(_PerGateway):
    def __init__(self, supervision: HeartbeatHandler, oscore_required: bool) -> None:
        super().__init__(oscore_required)
        self._supervision = supervision

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.content_format != CF_COSE:
            return _text(aiocoap.UNSUPPORTED_CONTENT_FORMAT, "application/cose (18) only")
        answer = self._supervision.handle_heartbeat(request.payload, "coap",
                                                    request.opt.uri_path[0])
        return aiocoap.Message(code=aiocoap.CHANGED, payload=answer, content_format=CF_CBOR)


class _Status(_PerGateway):
    def __init__(self, statuses: dict[str, Any], oscore_required: bool) -> None:
        super().__init__(oscore_required)
        self._statuses = statuses

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.content_format != CF_JSON:
            return _text(aiocoap.UNSUPPORTED_CONTENT_FORMAT, "application/json (50) only")
        try:
            doc = json.loads(request.payload)
        except ValueError:
            return _text(aiocoap.BAD_REQUEST, "not JSON")
        self._statuses[request.opt.uri_path[0]] = doc
        return aiocoap.Message(code=aiocoap.CHANGED)


async def serve_coap(
    receiver: BatchHandler,
    host: str,
    port: int,
    statuses: dict[str, Any] | None = None,
    oscore: Mapping[str, Path] | None = None,
    supervision: HeartbeatHandler | None = None,
) -> aiocoap.Context:
    """Serve ``/b/{gw}``, ``/s/{gw}`` and ``/.well-known/core`` on host:port (UDP).

    `statuses`, when given, receives each gateway's latest status document. `oscore` maps
    gateway ids to their OSCORE context directories (the platform's halves) and makes OSCORE
    mandatory for them. `supervision` answers the path heartbeats on ``/h/{gw}`` (without it,
    4.04). The caller owns the returned context and ends it with
    `shutdown_coap` (which also releases the OSCORE contexts).
    """
    required = oscore is not None
    site = aiocoap.resource.Site()
    site.add_resource(
        (".well-known", "core"), aiocoap.resource.WKCResource(site.get_resources_as_linkheader)
    )
    site.add_resource(("b",), _Batches(receiver, required))
    site.add_resource(("s",), _Status(statuses if statuses is not None else {}, required))
    if supervision is not None:
        site.add_resource(("h",), _Heartbeats(supervision, required))
    root: Any = site
    credentials = aiocoap.credentials.CredentialsMap()
    if oscore is not None:
        from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

        for gw, path in oscore.items():
            oscore_credentials(credentials, f":{gw}", path)
        root = OscoreSiteWrapper(site, credentials)
    try:
        ctx = await aiocoap.Context.create_server_context(
            root, bind=(host, port), transports=["udp6"], server_credentials=credentials
        )
    except BaseException:
        release_oscore_contexts(credentials)
        raise
    log.info("platform.coap_listening", host=host, port=port, oscore=sorted(oscore or ()))
    return ctx


async def shutdown_coap(ctx: aiocoap.Context) -> None:
    """Stop serving and release the OSCORE contexts (their sequence numbers are persisted)."""
    await ctx.shutdown()
    release_oscore_contexts(ctx.server_credentials)
