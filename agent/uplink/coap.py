"""The CoAP uplink: the same signed COSE_Sign1 batches as over MQTT, POSTed to the platform.

``POST {base}/b/{gw}`` with content-format 18 (application/cose; cose-type="cose-sign1"),
block-wise (RFC 7959, done by aiocoap) when a batch is larger than one block. The platform
answers 2.04 with the CBOR ack (the same bytes as over MQTT) as payload; `send` hands that payload
to ``on_ack`` before it returns. Status documents go to ``POST {base}/s/{gw}`` as JSON, best
effort. "Connected" means the last exchange with the platform succeeded; when idle the uplink
probes ``GET {base}/.well-known/core`` every ``probe_interval`` seconds.

Transport security: OSCORE (RFC 8613) with a pre-shared security context, made at provisioning by
`provision_oscore` (``branch-platform oscore-pair``): the gateway's half is a directory holding
``settings.json`` (ids, algorithm), ``secret.json`` (master secret and salt, 0600 like the signing
key; loading refuses a group- or world-readable one) and ``sequence.json`` (sender sequence number
and replay window, written by aiocoap ahead of use, so a SIGKILL never makes it reuse a nonce; a
restarted server recovers its replay window with the Echo option). Every request to ``base``,
the liveness probe included, is protected; the platform binds the context to the gateway id.
Batches are signed end to end anyway (Ed25519 COSE_Sign1, hash chain): OSCORE adds
confidentiality and hides the gateway's traffic from the path. Without ``[uplink.coap.oscore]``
plain ``coap://`` is refused unless ``insecure = true`` says the operator accepts signed but not
confidential batches (e.g. a private APN). ``coaps://`` (DTLS) is not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.error
import structlog

from agent.core.atomic import write_atomic  # the one atomic writer (secrets 0600)
from agent.core.errors import AgentError
from agent.uplink.base import UplinkDownError, UplinkFailure
from agent.uplink.config import CoapOscoreConfig, CoapUplinkConfig

__all__ = [
    "CF_COSE",
    "CoapOscoreConfig",
    "CoapUplink",
    "CoapUplinkConfig",
    "OscoreContextError",
    "check_oscore_context",
    "oscore_credentials",
    "provision_oscore",
    "release_oscore_contexts",
    "shutdown_client_context",
]

log = structlog.get_logger(__name__)

CF_COSE = 18  # application/cose; cose-type="cose-sign1"
CF_JSON = 50


OSCORE_ALGORITHM = "AES-CCM-16-64-128"  # RFC 8613's mandatory-to-implement AEAD
_OSCORE_ID_BYTES = 6  # the gateway's sender id: random, the platform finds its context by it


class OscoreContextError(AgentError, ValueError):
    """The OSCORE context directory is missing, unreadable, too open, or in use."""


# --- OSCORE contexts -----------------------------------------------------------------------


def _write_context(dir: Path, sender: bytes, recipient: bytes, secret: bytes, salt: bytes,
                   force: bool) -> None:
    if dir.exists() and any(dir.iterdir()) and not force:
        raise OscoreContextError(
            f"{dir} already holds an OSCORE context; refusing to replace it",
            hint="a replaced context must be replaced on both ends: pass force to do so",
        )
    dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # a new secret restarts the sequence numbers: the old sequence file must go with the old key
    for stale in ("sequence.json", "lock"):
        with contextlib.suppress(FileNotFoundError):
            (dir / stale).unlink()
    settings = {"sender-id_hex": sender.hex(), "recipient-id_hex": recipient.hex(),
                "algorithm": OSCORE_ALGORITHM, "kdf-hashfun": "sha256"}
    write_atomic(dir / "settings.json", json.dumps(settings, indent=1).encode(), 0o644)
    keys = {"secret_hex": secret.hex(), "salt_hex": salt.hex()}
    write_atomic(dir / "secret.json", json.dumps(keys, indent=1).encode(), 0o600)


def provision_oscore(gateway_dir: Path, platform_dir: Path, *, force: bool = False) -> bytes:
    """Create a matching pair of OSCORE contexts (fresh 32-byte master secret, 8-byte salt):
    the gateway's (its sender id random, the platform's id empty) and the platform's mirror.
    Returns the gateway's sender id. Move, never copy, each half to where it is used."""
    secret, salt = secrets.token_bytes(32), secrets.token_bytes(8)
    gw_id = secrets.token_bytes(_OSCORE_ID_BYTES)
    _write_context(Path(gateway_dir), gw_id, b"", secret, salt, force)
    _write_context(Path(platform_dir), b"", gw_id, secret, salt, force)
    return gw_id


def check_oscore_context(dir: Path) -> None:
    """Refuse a context that is missing or whose secret others can read (as ssh does)."""
    secret = Path(dir) / "secret.json"
    try:
        mode = secret.stat().st_mode
    except OSError as exc:
        raise OscoreContextError(
            f"OSCORE context {dir}: cannot read {secret.name}: {exc.strerror}",
            hint="provision one with `branch-platform oscore-pair`",
        ) from None
    if stat.S_IMODE(mode) & 0o077:
        raise OscoreContextError(
            f"OSCORE secret {secret} is readable by others (mode {stat.S_IMODE(mode):o})",
            hint=f"chmod 600 {secret}",
        )
    if not os.access(dir, os.W_OK):
        raise OscoreContextError(
            f"OSCORE context {dir} is not writable: sequence numbers cannot be persisted",
            hint="give the agent's user write access to the directory",
        )


def oscore_credentials(credentials: Any, key: str, dir: Path) -> None:
    """Load the context at `dir` into an aiocoap CredentialsMap under `key` (a URI pattern on a
    client, ``:name`` on a server). The context locks its directory while loaded."""
    check_oscore_context(dir)
    try:
        credentials.load_from_dict({key: {"oscore": {"basedir": str(dir)}}})
    except Exception as exc:  # aiocoap raises LoadError, filelock.Timeout, OSError, KeyError
        hint = "is another process using this context?" if "lock" in repr(exc).lower() else None
        raise OscoreContextError(f"OSCORE context {dir} cannot be loaded: {exc!r}",
                                 hint=hint) from None


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a left-behind future's outcome so asyncio does not log it as never retrieved."""
    if not fut.cancelled():
        fut.exception()


async def shutdown_client_context(ctx: aiocoap.Context) -> None:
    """`ctx.shutdown()` that cannot fail the agent's exit: aiocoap 0.4 can raise
    InvalidStateError when a request was cancelled just before (its clean-up callbacks had not
    run yet). Then the clean-up is let run and the shutdown finished, once."""
    try:
        await ctx.shutdown()
    except asyncio.InvalidStateError as exc:
        log.debug("coap.shutdown_race", error=repr(exc))
        await asyncio.sleep(0)  # one loop turn: the pending clean-up callbacks run
        with contextlib.suppress(asyncio.InvalidStateError):
            await ctx.shutdown()


def release_oscore_contexts(credentials: Any) -> None:
    """Persist the sequence number and unlock every loaded context now, not at GC time."""
    for item in list(credentials.values()):
        if getattr(item, "lockfile", None) is not None:
            # aiocoap 0.4.17 has no public release (its own FIXME); __del__ calls the same
            item._destroy()
    credentials.clear()


class CoapUplink:
    """An `agent.uplink.base.Uplink` over CoAP. One aiocoap client context, made in `run`."""

    name = "coap"

    def __init__(self, cfg: CoapUplinkConfig, gateway_id: str) -> None:
        if cfg.oscore is not None:
            check_oscore_context(cfg.oscore.context)  # a clear error at startup, not at send
        self.cfg = cfg
        self.gateway_id = gateway_id
        self._batch_uri = f"{cfg.base}/b/{gateway_id}"
        self._status_uri = f"{cfg.base}/s/{gateway_id}"
        self._probe_uri = f"{cfg.base}/.well-known/core"
        self._heartbeat_uri = f"{cfg.base}/h/{gateway_id}"
        self.heartbeat_interval_s = cfg.heartbeat_interval_s
        self.heartbeat_timeout_s = cfg.heartbeat_timeout_s
        self._ctx: aiocoap.Context | None = None
        self._connected = False
        self.last_error: UplinkFailure | None = None  # CoAP has no connection to fail
        self.counters: dict[str, int] = {}
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
        oscore = self.cfg.oscore
        try:
            self._ctx = await aiocoap.Context.create_client_context(
                transports=["udp6"] if oscore is None else ["oscore", "udp6"]
            )
            if oscore is not None:
                oscore_credentials(self._ctx.client_credentials, f"{self.cfg.base}/*",
                                   oscore.context)
        except BaseException:
            self._running = False
            if self._ctx is not None:
                await shutdown_client_context(self._ctx)
                self._ctx = None
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
            await shutdown_client_context(ctx)
            release_oscore_contexts(ctx.client_credentials)

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
        response: asyncio.Future[aiocoap.Message] | None = None
        try:
            async with asyncio.timeout(limit):
                await self._ready.wait()  # run() is creating the client context
                assert self._ctx is not None
                response = self._ctx.request(msg).response
                # Shielded: a cancelled caller (the agent stopping) must not cancel aiocoap's
                # future. aiocoap 0.4 tidies a cancelled request up in callbacks that run a few
                # loop turns later; a Context.shutdown() in between sets an exception on the
                # cancelled future and fails with InvalidStateError (seen as exit code 1 on
                # SIGTERM). Left pending, the request is ended cleanly by shutdown instead.
                resp: aiocoap.Message = await asyncio.shield(response)
        except TimeoutError as exc:
            if response is not None:
                response.cancel()  # our deadline passed: stop aiocoap's retransmissions
            self._set_state(False)
            raise UplinkDownError(f"CoAP {msg.code} {msg.get_request_uri()}: {exc!r}") from exc
        except asyncio.CancelledError:
            if response is not None:
                response.add_done_callback(_consume)
            raise
        except (aiocoap.error.Error, OSError) as exc:
            self._set_state(False)
            raise UplinkDownError(f"CoAP {msg.code} {msg.get_request_uri()}: {exc!r}") from exc
        if resp.code.class_ == 5:  # 5.xx: the platform is there but cannot take it now
            self._set_state(False)
            raise UplinkDownError(f"platform answered {resp.code}: {resp.payload[:200]!r}")
        self._set_state(True)
        self._activity.set()
        return resp

    async def send(self, seq: int, data: bytes, lane: int = 0) -> None:
        # every lane to the one resource: each request is answered on its own
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

    async def heartbeat(self, data: bytes, accept: Callable[[bytes], bool]) -> bytes:
        """POST one heartbeat to ``{base}/h/{gw}``; the 2.04 response carries the answer (see
        `agent.uplink.base.HeartbeatChannel`). Sent whether or not this path carries the
        batches: it is also what keeps the standby path's state current."""
        msg = aiocoap.Message(code=aiocoap.POST, uri=self._heartbeat_uri, payload=data,
                              content_format=CF_COSE)
        resp = await self._exchange(msg, self.heartbeat_timeout_s)
        if resp.code != aiocoap.CHANGED or not accept(resp.payload):
            raise UplinkDownError(f"heartbeat answered {resp.code} "
                                  f"({resp.payload[:100].decode('utf-8', 'replace')!r})")
        return bytes(resp.payload)

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
