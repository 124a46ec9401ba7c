"""The CoAP uplink: the same signed COSE_Sign1 batches as over MQTT, POSTed to the platform.

``POST {base}/b/{gw}`` with content-format 18 (application/cose; cose-type="cose-sign1"),
block-wise (RFC 7959, done by aiocoap) when a batch is larger than one block. The platform
answers 2.04 with the CBOR ack (the same bytes as over MQTT) as payload; `send` hands that payload
to ``on_ack`` before it returns. Status documents go to ``POST {base}/s/{gw}`` as JSON, best
effort. "Connected" means the last exchange with the platform succeeded; when idle the uplink
probes ``GET {base}/.well-known/core`` every ``probe_interval`` seconds.

Transport security: only plain CoAP (``coap://``) is implemented. Batches are still signed end to
end (Ed25519 COSE_Sign1, hash chain), so the platform detects any change, loss, reordering or
replay, but they are **not confidential** on the wire. The config therefore refuses ``coap://``
unless ``insecure = true`` says the operator accepts that (e.g. a private APN on the cellular
backup). OSCORE (aiocoap's ``oscore`` extra installs cleanly from PyPI) is the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiocoap
import aiocoap.error
import structlog
from pydantic import Field, field_validator, model_validator

from agent.uplink.base import UplinkDownError
from drivers.configbase import StrictModel

__all__ = ["CF_COSE", "CoapUplink", "CoapUplinkConfig"]

log = structlog.get_logger(__name__)

CF_COSE = 18  # application/cose; cose-type="cose-sign1"
CF_JSON = 50


class CoapUplinkConfig(StrictModel):
    """TOML::

    [uplink.coap]
    base = "coap://platform.bank.example:5683"
    insecure = true        # required for coap://: signed but not confidential
    timeout = 20.0         # seconds for one batch exchange (all blocks) before "down"
    probe_interval = 15.0  # idle liveness probe (GET /.well-known/core)
    """

    base: str
    insecure: bool = False
    timeout: float = Field(default=20.0, gt=0, le=300)
    probe_interval: float = Field(default=15.0, gt=0, le=3600)

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("coap", "coaps") or not parts.hostname:
            raise ValueError("base must look like coap://host[:port][/path]")
        if parts.query or parts.fragment:
            raise ValueError("base takes no query or fragment")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _security(self) -> CoapUplinkConfig:
        if self.base.startswith("coaps:"):
            raise ValueError(
                "coaps:// (DTLS) is not supported on this platform yet: use coap:// with "
                "insecure = true (batches stay signed end to end) or the MQTT uplink"
            )
        if not self.insecure:
            raise ValueError(
                "plain coap:// carries signed but not confidential batches: set insecure = true "
                "to accept that"
            )
        return self


class CoapUplink:
    """An `agent.uplink.base.Uplink` over CoAP. One aiocoap client context, made in `run`."""

    name = "coap"

    def __init__(self, cfg: CoapUplinkConfig, gateway_id: str) -> None:
        self.cfg = cfg
        self.gateway_id = gateway_id
        self._batch_uri = f"{cfg.base}/b/{gateway_id}"
        self._status_uri = f"{cfg.base}/s/{gateway_id}"
        self._probe_uri = f"{cfg.base}/.well-known/core"
        self._ctx: aiocoap.Context | None = None
        self._connected = False
        self._on_ack: Callable[[bytes], None] = lambda _: None
        self._on_state: Callable[[bool], None] = lambda _: None
        self._activity = asyncio.Event()
        self._running = False
        self._ready = asyncio.Event()
        self._log = log.bind(uplink=self.name, base=cfg.base)

    @property
    def connected(self) -> bool:
        return self._connected

    def _set_state(self, up: bool) -> None:
        if up != self._connected:
            self._connected = up
            self._log.info("uplink.state", connected=up)
            self._on_state(up)

    async def run(self, on_ack: Callable[[bytes], None], on_state: Callable[[bool], None]) -> None:
        self._on_ack, self._on_state = on_ack, on_state
        self._running = True
        try:
            self._ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        except BaseException:
            self._running = False
            raise
        self._ready.set()
        try:
            while True:
                # a failed probe has already cleared the state; probe again after the interval
                with contextlib.suppress(UplinkDownError):
                    await self._exchange(
                        aiocoap.Message(code=aiocoap.GET, uri=self._probe_uri), self.cfg.timeout
                    )
                self._activity.clear()
                # any send in between proves liveness; wait for the interval without one
                while await self._activity_within(self.cfg.probe_interval):
                    self._activity.clear()
        finally:
            self._running = False
            self._ready.clear()
            ctx, self._ctx = self._ctx, None
            self._set_state(False)
            await ctx.shutdown()

    async def _activity_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._activity.wait()
        except TimeoutError:
            return False
        return True

    async def _exchange(self, msg: aiocoap.Message, limit: float) -> aiocoap.Message:
        """One request/response; success sets connected, failure clears it and raises."""
        if not self._running:
            raise UplinkDownError("CoAP uplink not running")
        try:
            async with asyncio.timeout(limit):
                await self._ready.wait()  # run() is creating the client context
                assert self._ctx is not None
                resp: aiocoap.Message = await self._ctx.request(msg).response
        except (TimeoutError, aiocoap.error.Error, OSError) as exc:
            self._set_state(False)
            raise UplinkDownError(f"CoAP {msg.code} {msg.get_request_uri()}: {exc!r}") from exc
        if resp.code.class_ == 5:  # 5.xx: the platform is there but cannot take it now
            self._set_state(False)
            raise UplinkDownError(f"platform answered {resp.code}: {resp.payload[:200]!r}")
        self._set_state(True)
        self._activity.set()
        return resp

    async def send(self, seq: int, data: bytes) -> None:
        msg = aiocoap.Message(
            code=aiocoap.POST, uri=self._batch_uri, payload=data, content_format=CF_COSE
        )
        resp = await self._exchange(msg, self.cfg.timeout)
        if resp.code != aiocoap.CHANGED:
            # 4.xx: the platform will not take these bytes as sent; keep the batch and retry
            # later (the identical bytes) rather than lose it, and say so loudly.
            self._log.error(
                "uplink.batch_rejected",
                seq=seq,
                code=str(resp.code),
                detail=resp.payload[:200].decode("utf-8", "replace"),
            )
            raise UplinkDownError(f"platform answered {resp.code} to batch {seq}")
        self._log.debug("uplink.batch_sent", seq=seq, size=len(data))
        self._on_ack(resp.payload)

    async def publish_status(self, doc: Mapping[str, Any]) -> None:
        msg = aiocoap.Message(
            code=aiocoap.POST,
            uri=self._status_uri,
            payload=json.dumps(doc, separators=(",", ":"), default=str).encode(),
            content_format=CF_JSON,
        )
        try:
            await self._exchange(msg, min(self.cfg.timeout, 5.0))
        except UplinkDownError as exc:
            self._log.debug("uplink.status_not_sent", error=str(exc))
