"""CoAP uplink against the reference platform's CoAP endpoint, over real UDP sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import pydantic
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.protocol import ZERO_HASH, batch_hash, build_batch, decode_ack, encode_event, kid_for
from agent.uplink.base import Uplink, UplinkDownError
from agent.uplink.coap import (
    CoapUplink,
    CoapUplinkConfig,
    OscoreContextError,
    provision_oscore,
    shutdown_client_context,
)
from branchsim.platform.coap_server import serve_coap, shutdown_coap
from branchsim.platform.receiver import Receiver
from tests.support.broker import free_udp_port

GW = "gw-test-1"



@dataclass
class Chain:
    """Signs consecutive batches of a hash chain, as the agent's batcher does."""

    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    seq: int = 0
    prev: bytes = ZERO_HASH
    next_id: int = 1

    def pem(self) -> bytes:
        return self.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def batch(self, n_events: int) -> bytes:
        events = []
        for _ in range(n_events):
            events.append(
                encode_event(
                    id=self.next_id,
                    t=1.7e9 + self.next_id,
                    tq=1,
                    src="coap.atm1",
                    type="temperature",
                    v=21.5,
                    prio=2,
                    u="Cel",
                )
            )
            self.next_id += 1
        self.seq += 1
        data = build_batch(
            key=self.key, kid=kid_for(self.key.public_key()), gw=GW, seq=self.seq,
            prev=self.prev, created=1.7e9, encoded_events=events,
        )  # fmt: skip
        self.prev = batch_hash(data)
        return data


@dataclass
class Rig:
    uplink: CoapUplink
    chain: Chain
    acks: list[bytes]
    states: list[bool]
    statuses: dict[str, Any]
    receiver: Receiver
    port: int
    platform: aiocoap.Context | None
    oscore: dict[str, Path] | None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, cond: Any, limit: float = 10.0) -> None:
        async def _w() -> None:
            while not cond():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(_w(), limit)


@pytest.fixture(params=["plain", "oscore"])
async def rig(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    """The uplink against the platform's endpoint, over plain CoAP and over OSCORE."""
    chain = Chain()
    receiver = Receiver(tmp_path / "platform.sqlite")
    receiver.register(GW, chain.pem())
    port = free_udp_port()
    statuses: dict[str, Any] = {}
    oscore: dict[str, Path] | None = None
    security: dict[str, Any] = {"insecure": True}
    if request.param == "oscore":
        provision_oscore(tmp_path / "gw-oscore", tmp_path / "platform-oscore")
        oscore = {GW: tmp_path / "platform-oscore"}
        security = {"oscore": {"context": tmp_path / "gw-oscore"}}
    platform = await serve_coap(receiver, "127.0.0.1", port, statuses=statuses, oscore=oscore)
    cfg = CoapUplinkConfig(
        base=f"coap://127.0.0.1:{port}", timeout=3.0, probe_interval=0.2, **security
    )
    uplink = CoapUplink(cfg, GW)
    r = Rig(uplink, chain, [], [], statuses, receiver, port, platform, oscore)

    def on_ack(b: bytes) -> None:
        r.acks.append(b)
        r.changed.set()

    def on_state(up: bool) -> None:
        r.states.append(up)
        r.changed.set()

    task = asyncio.create_task(uplink.run(on_ack, on_state), name="coap-uplink")
    try:
        yield r
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if r.platform is not None:
            await shutdown_coap(r.platform)
        receiver.close()


def test_is_an_uplink_and_plain_coap_needs_insecure() -> None:
    """CoapUplink is an Uplink; coap:// without insecure, and coaps://, are refused."""
    cfg = CoapUplinkConfig(base="coap://p.example/", insecure=True)
    assert cfg.base == "coap://p.example"
    assert isinstance(CoapUplink(cfg, GW), Uplink)
    with pytest.raises(pydantic.ValidationError, match="insecure = true"):
        CoapUplinkConfig(base="coap://p.example")
    with pytest.raises(pydantic.ValidationError, match="DTLS"):
        CoapUplinkConfig(base="coaps://p.example", insecure=True)
    with pytest.raises(pydantic.ValidationError, match="coap://host"):
        CoapUplinkConfig(base="http://p.example", insecure=True)


async def test_probe_marks_connected(rig: Rig) -> None:
    """With the platform up and nothing to send, the idle probe reports the uplink connected."""
    await rig.wait(lambda: rig.states == [True])
    assert rig.uplink.connected


async def test_send_small_and_blockwise_batches_get_acks(rig: Rig) -> None:
    """Small and multi-block batches are acked by the platform with their seq and hash."""
    for n_events in (1, 300):
        data = rig.chain.batch(n_events)
        await rig.uplink.send(rig.chain.seq, data)
        ack = decode_ack(rig.acks[-1])
        assert (ack.seq, ack.h, ack.ok) == (rig.chain.seq, batch_hash(data), True)
    assert len(data) > 4096  # the second batch went block-wise
    assert len(rig.acks) == 2
    assert rig.uplink.connected
    assert [e["id"] for e in rig.receiver.events(GW)] == list(range(1, 302))


async def test_platform_down_raises_then_recovers(rig: Rig) -> None:
    """With the platform gone, send raises UplinkDownError and state goes down; back, it resumes."""
    await rig.wait(lambda: rig.states == [True])
    assert rig.platform is not None
    await shutdown_coap(rig.platform)
    rig.platform = None
    with pytest.raises(UplinkDownError):
        await rig.uplink.send(1, rig.chain.batch(1))
    assert rig.states[-1] is False and not rig.uplink.connected
    rig.platform = await serve_coap(rig.receiver, "127.0.0.1", rig.port, statuses=rig.statuses,
                                    oscore=rig.oscore)
    await rig.wait(lambda: rig.states[-1] is True)  # the probe found it again
    # the identical bytes of batch 1 are sent again and acked
    rig.chain = Chain(key=rig.chain.key)
    data = rig.chain.batch(1)
    await rig.uplink.send(1, data)
    assert decode_ack(rig.acks[-1]).ok
    assert rig.receiver.chain_head(GW) == (1, batch_hash(data))


async def test_publish_status_reaches_platform(rig: Rig) -> None:
    """A status document POSTed over CoAP is kept by the platform for that gateway."""
    await rig.wait(lambda: rig.states == [True])
    await rig.uplink.publish_status({"gw": GW, "uplink": "coap", "backlog": 3})
    assert rig.statuses[GW] == {"gw": GW, "uplink": "coap", "backlog": 3}


async def test_stop_while_requests_are_in_flight_is_clean() -> None:
    """Cancelling the uplink (the agent stopping) while a probe is unanswered and a block-wise
    batch waits behind it ends it with CancelledError only, nothing else."""
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a platform that never answers
    hole.bind(("127.0.0.1", 0))
    hole.setblocking(False)
    port = hole.getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        uplink = CoapUplink(CoapUplinkConfig(base=f"coap://127.0.0.1:{port}", insecure=True,
                                             timeout=30.0, probe_interval=30.0), GW)
        run = asyncio.create_task(uplink.run(lambda _: None, lambda _: None))
        await asyncio.wait_for(loop.sock_recv(hole, 2048), 10)  # the probe is on the wire
        # a batch queued behind it (aiocoap sends one request at a time to a peer)
        send = asyncio.create_task(uplink.send(1, Chain().batch(300)))
        await asyncio.sleep(0)  # one loop turn: the send task starts and waits its turn
        send.cancel()
        run.cancel()
        results = await asyncio.gather(send, run, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    finally:
        hole.close()


async def test_shutdown_survives_aiocoap_cancellation_race() -> None:
    """aiocoap 0.4 tidies up a cancelled request in a callback that runs a loop turn later; a
    context shutdown that gets in between fails with InvalidStateError (this made the agent
    exit 1 on SIGTERM in CI). The race is set up exactly here: first that plain
    `ctx.shutdown()` does fail (so the test cannot pass vacuously), then that
    `shutdown_client_context` does not."""
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a peer that never answers
    hole.bind(("127.0.0.1", 0))
    hole.setblocking(False)
    uri = f"coap://127.0.0.1:{hole.getsockname()[1]}/x"
    loop = asyncio.get_running_loop()

    async def race(shutdown: Callable[[aiocoap.Context], Awaitable[None]]) -> BaseException | None:
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        req = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri), handle_blockwise=False)
        await asyncio.wait_for(loop.sock_recv(hole, 2048), 10)  # the request is on the wire
        closing = asyncio.create_task(shutdown(ctx))
        await asyncio.sleep(0)  # one turn: the shutdown has queued its per-interface tasks
        req.response.cancel()  # its clean-up callback now runs after them
        try:
            await closing
        except BaseException as exc:  # the outcome is what is tested
            return exc
        return None

    try:
        assert isinstance(await race(lambda c: c.shutdown()), asyncio.InvalidStateError)
        assert await race(shutdown_client_context) is None
    finally:
        hole.close()


async def test_send_before_run_is_down() -> None:
    """An uplink that is not running refuses to send with UplinkDownError."""
    uplink = CoapUplink(CoapUplinkConfig(base="coap://127.0.0.1:9", insecure=True), GW)
    with pytest.raises(UplinkDownError):
        await uplink.send(1, b"x")


async def test_oscore_platform_refuses_plain_and_foreign_requests(tmp_path: Path) -> None:
    """An OSCORE platform answers 4.01 to a plain batch POST and to a gateway using another
    gateway's context; nothing is stored."""
    chain = Chain()
    receiver = Receiver(tmp_path / "platform.sqlite")
    receiver.register(GW, chain.pem())
    provision_oscore(tmp_path / "gw", tmp_path / "pf")
    provision_oscore(tmp_path / "other-gw", tmp_path / "other-pf")
    port = free_udp_port()
    platform = await serve_coap(receiver, "127.0.0.1", port,
                                oscore={GW: tmp_path / "pf", "gw-other": tmp_path / "other-pf"})
    client = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    try:
        data = chain.batch(1)
        plain = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/b/{GW}",
                                payload=data, content_format=18)
        resp = await asyncio.wait_for(client.request(plain).response, 10)
        assert resp.code == aiocoap.UNAUTHORIZED
        # gw-other's context, speaking for GW
        cfg = CoapUplinkConfig(base=f"coap://127.0.0.1:{port}", timeout=3.0,
                               oscore={"context": tmp_path / "other-gw"})
        uplink = CoapUplink(cfg, GW)
        up = asyncio.Event()
        task = asyncio.create_task(uplink.run(lambda _: None, lambda s: up.set() if s else None))
        try:
            await asyncio.wait_for(up.wait(), 10)  # its probe of /.well-known/core is fine
            with pytest.raises(UplinkDownError, match=r"4\.01"):
                await uplink.send(1, data)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert receiver.events(GW) == []
    finally:
        await client.shutdown()
        await shutdown_coap(platform)
        receiver.close()


def test_oscore_context_must_be_private_and_present(tmp_path: Path) -> None:
    """A missing context, or a secret readable by others, is refused when the uplink is made;
    provisioning refuses to overwrite an existing context."""
    gw_dir = tmp_path / "gw"
    cfg = CoapUplinkConfig(base="coap://127.0.0.1:9", oscore={"context": gw_dir})
    with pytest.raises(OscoreContextError, match=r"cannot read secret\.json"):
        CoapUplink(cfg, GW)
    sender = provision_oscore(gw_dir, tmp_path / "pf")
    assert len(sender) == 6
    assert (gw_dir / "secret.json").stat().st_mode & 0o777 == 0o600
    CoapUplink(cfg, GW)
    (gw_dir / "secret.json").chmod(0o644)
    with pytest.raises(OscoreContextError, match="chmod 600"):
        CoapUplink(cfg, GW)
    with pytest.raises(OscoreContextError, match="already holds"):
        provision_oscore(gw_dir, tmp_path / "pf")
