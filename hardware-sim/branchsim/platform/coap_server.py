"""The reference platform's CoAP endpoint: the CoAP twin of its MQTT batch topic.

``POST /b/{gw}`` (content-format 18, COSE_Sign1, block-wise reassembled by aiocoap) is handed to
`Receiver.handle_batch` and answered 2.04 with the CBOR ack (content-format 60) as payload, ok or
with the reason, exactly as the MQTT ack topic would carry it. ``POST /s/{gw}`` (JSON) keeps the
gateway's latest status document. Plain CoAP: batches are signed end to end, not confidential.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import aiocoap
import aiocoap.resource
import structlog

from agent.protocol import Ack, encode_ack

__all__ = ["BatchHandler", "serve_coap"]

log = structlog.get_logger(__name__)

CF_COSE = 18
CF_JSON = 50
CF_CBOR = 60
MAX_BATCH = 1 << 20  # a batch is at most a few hundred kB; refuse to reassemble more


class BatchHandler(Protocol):
    """What the endpoint needs from `branchsim.platform.receiver.Receiver`."""

    def handle_batch(self, data: bytes, topic_gw: str | None = None) -> Ack: ...


def _text(code: Any, text: str) -> aiocoap.Message:
    return aiocoap.Message(code=code, payload=text.encode())


class _PerGateway(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]  # aiocoap is untyped
    """Base for ``/x/{gw}``: the remaining path is exactly one gateway id."""

    def get_resources_as_linkheader(self) -> Any:
        from aiocoap.util.linkformat import LinkFormat

        return LinkFormat([])

    async def render_to_pipe(self, pipe: Any) -> None:
        req = pipe.request
        b1 = req.opt.block1
        end = len(req.payload) if b1 is None else b1.start + len(req.payload)
        if len(req.opt.uri_path) != 1:
            pipe.add_response(_text(aiocoap.NOT_FOUND, "path is /x/{gateway}"), is_last=True)
        elif end > MAX_BATCH or (req.opt.size1 or 0) > MAX_BATCH:
            # checked per block, before aiocoap spools the blocks in memory
            msg = _text(aiocoap.REQUEST_ENTITY_TOO_LARGE, "batch too large")
            msg.opt.size1 = MAX_BATCH
            pipe.add_response(msg, is_last=True)
        else:
            await super().render_to_pipe(pipe)


class _Batches(_PerGateway):
    def __init__(self, receiver: BatchHandler) -> None:
        super().__init__()
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


class _Status(_PerGateway):
    def __init__(self, statuses: dict[str, Any]) -> None:
        super().__init__()
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
) -> aiocoap.Context:
    """Serve ``/b/{gw}``, ``/s/{gw}`` and ``/.well-known/core`` on host:port (UDP).

    `statuses`, when given, receives each gateway's latest status document. The caller owns the
    returned context and ends it with ``await ctx.shutdown()``.
    """
    site = aiocoap.resource.Site()
    site.add_resource(
        (".well-known", "core"), aiocoap.resource.WKCResource(site.get_resources_as_linkheader)
    )
    site.add_resource(("b",), _Batches(receiver))
    site.add_resource(("s",), _Status(statuses if statuses is not None else {}))
    ctx = await aiocoap.Context.create_server_context(site, bind=(host, port), transports=["udp6"])
    log.info("platform.coap_listening", host=host, port=port)
    return ctx
