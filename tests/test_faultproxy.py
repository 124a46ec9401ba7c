"""The fault-injecting TCP proxy (branchsim.faultproxy) against a real loopback echo server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from branchsim.faultproxy import FaultProxy, ProxyThread


@dataclass
class Echo:
    """A loopback echo server that records when each of its connections ends."""

    port: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            w.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    e.server = await asyncio.start_server(e.handle, "127.0.0.1", 0)
    e.port = int(e.server.sockets[0].getsockname()[1])
    try:
        yield e
    finally:
        e.server.close()


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy("127.0.0.1", echo.port).start()
    try:
        yield p
    finally:
        await p.close()


async def connect(p: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.port)


async def roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> bytes:
    w.write(data)
    await w.drain()
    return await asyncio.wait_for(r.readexactly(len(data)), 5)


async def silent_for(r: asyncio.StreamReader, seconds: float) -> bool:
    """True if nothing (no byte, no EOF) arrives within `seconds`: the absence being tested."""
    try:
        await asyncio.wait_for(r.read(1), seconds)
    except TimeoutError:
        return True
    return False


async def test_forwards_both_ways(proxy: FaultProxy) -> None:
    """Bytes written to the proxy reach the target and the answer comes back unchanged."""
    r, w = await connect(proxy)
    assert await roundtrip(r, w, b"hello broker") == b"hello broker"
    w.close()


async def test_cut_closes_open_connections_and_allows_new_ones(proxy: FaultProxy,
                                                               echo: Echo) -> None:
    """cut() ends every open connection with EOF at both ends; a new connection works."""
    r, w = await connect(proxy)
    await roundtrip(r, w, b"x")
    assert await proxy.cut() == 1
    assert await asyncio.wait_for(r.read(), 5) == b""
    await asyncio.wait_for(echo.closed.wait(), 5)
    r2, w2 = await connect(proxy)
    assert await roundtrip(r2, w2, b"again") == b"again"
    assert proxy.injected["cut"] == 1
    w.close()
    w2.close()


async def test_blackhole_swallows_without_closing(proxy: FaultProxy) -> None:
    """In a black hole nothing is answered and nothing is closed, on old and new connections;
    after heal() new connections work again."""
    r, w = await connect(proxy)
    await roundtrip(r, w, b"x")
    proxy.blackhole(True)
    w.write(b"lost")
    await w.drain()
    assert await silent_for(r, 0.3)
    r2, w2 = await connect(proxy)  # the connect itself succeeds
    w2.write(b"lost too")
    await w2.drain()
    assert await silent_for(r2, 0.3)
    proxy.heal()
    r3, w3 = await connect(proxy)
    assert await roundtrip(r3, w3, b"back") == b"back"
    assert proxy.injected["blackhole"] == 1
    for writer in (w, w2, w3):
        writer.close()


async def test_latency_delays_each_way(proxy: FaultProxy) -> None:
    """With 0.1 s latency a round trip takes at least 0.2 s and bytes stay in order."""
    r, w = await connect(proxy)
    proxy.latency(0.1)
    t0 = time.monotonic()
    assert await roundtrip(r, w, b"abc") == b"abc"
    assert time.monotonic() - t0 >= 0.2
    w.write(b"1")
    w.write(b"2")
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(2), 5) == b"12"
    w.close()


async def test_bandwidth_paces_bytes(proxy: FaultProxy) -> None:
    """At 100 kB/s each way, 20 kB take at least 0.3 s to come back."""
    r, w = await connect(proxy)
    proxy.bandwidth(100_000)
    payload = bytes(range(256)) * 80
    t0 = time.monotonic()
    assert await roundtrip(r, w, payload) == payload
    assert time.monotonic() - t0 >= 0.3
    w.close()


async def test_half_open_closes_upstream_only(proxy: FaultProxy, echo: Echo) -> None:
    """half_open() closes the target's side; the client's side stays open and unanswered; a new
    connection is normal."""
    r, w = await connect(proxy)
    await roundtrip(r, w, b"x")
    assert await proxy.half_open() == 1
    await asyncio.wait_for(echo.closed.wait(), 5)
    w.write(b"into the void")
    await w.drain()
    assert await silent_for(r, 0.3)
    r2, w2 = await connect(proxy)
    assert await roundtrip(r2, w2, b"fresh") == b"fresh"
    w.close()
    w2.close()


async def test_proxy_thread_controls_from_sync_code(echo: Echo) -> None:
    """ProxyThread runs the proxy on its own loop; its controls are callable from any thread."""
    pt = await asyncio.to_thread(lambda: ProxyThread("127.0.0.1", echo.port).start())
    try:
        r, w = await connect(pt.proxy)
        assert await roundtrip(r, w, b"t") == b"t"
        assert await asyncio.to_thread(pt.open_connections) == 1
        assert await asyncio.to_thread(pt.cut) == 1
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
    finally:
        await asyncio.to_thread(pt.stop)
    assert pt.injected["cut"] == 1
