"""A fault-injecting TCP proxy for the WAN between the gateway and the bank's broker.

It forwards bytes both ways and, on command, misbehaves the way branch WAN links do in the field:

- ``cut()``: every open connection is closed at once (FIN to both ends, like a router reboot);
  new connections still succeed.
- ``blackhole(True)``: bytes are swallowed in both directions and new connections are accepted
  but never reach the broker; nothing is closed and no RST is sent, so only the client's
  keepalive can notice (a dropped 4G bearer, a stateful firewall that forgot the flow).
- ``latency(s)`` and ``bandwidth(bytes_per_s)``: every chunk is delayed, and paced, in each
  direction (a congested DSL line). Order is preserved.
- ``half_open()``: the broker side of every open connection is closed while the client side
  stays open and silent (a NAT that dropped its mapping): the broker sees the client go, the
  client sees nothing until its keepalive fails. New connections are normal.

`FaultProxy` is asyncio; `ProxyThread` runs one on its own event loop thread for synchronous
tests and tools (every control is a thread-safe call). Counters say how many of each fault were
injected, for the fault suite's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import structlog

__all__ = ["FaultProxy", "ProxyThread"]

log = structlog.get_logger(__name__)

CHUNK = 16 * 1024
T = TypeVar("T")


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's streams, the upstream's, the pump tasks."""

    client_w: asyncio.StreamWriter
    upstream_w: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    half_open: bool = False


class FaultProxy:
    """Listen on `listen_port` (0 = any free port, see `.port`) and forward to the target."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.port = listen_port
        self.injected: Counter[str] = Counter()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._blackhole = False
        self._latency = 0.0
        self._bandwidth = 0

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("faultproxy.listening", port=self.port, target=f"{self.target[0]}:"
                 f"{self.target[1]}")
        return self

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            await self._drop(link)

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # ------------------------------------------------------------------ faults

    async def cut(self) -> int:
        """Close every open connection (both ends); returns how many were cut."""
        links = list(self._links)
        for link in links:
            await self._drop(link)
        self.injected["cut"] += 1
        log.info("faultproxy.cut", connections=len(links))
        return len(links)

    def blackhole(self, on: bool) -> None:
        if on and not self._blackhole:
            self.injected["blackhole"] += 1
        self._blackhole = on
        log.info("faultproxy.blackhole", on=on)

    def latency(self, seconds: float) -> None:
        if seconds > 0 and self._latency == 0:
            self.injected["latency"] += 1
        self._latency = max(0.0, seconds)
        log.info("faultproxy.latency", seconds=seconds)

    def bandwidth(self, bytes_per_s: int) -> None:
        """0 = unlimited."""
        if bytes_per_s > 0 and self._bandwidth == 0:
            self.injected["bandwidth"] += 1
        self._bandwidth = max(0, bytes_per_s)
        log.info("faultproxy.bandwidth", bytes_per_s=bytes_per_s)

    async def half_open(self) -> int:
        """Close the upstream side of every open connection, keep the client side open and
        silent; returns how many connections were affected."""
        n = 0
        for link in list(self._links):
            if link.half_open:
                continue
            link.half_open = True
            n += 1
            if link.upstream_w is not None:
                link.upstream_w.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await link.upstream_w.wait_closed()
        self.injected["half_open"] += 1
        log.info("faultproxy.half_open", connections=n)
        return n

    def heal(self) -> None:
        """Back to a clean link (existing half-open connections stay dead: that is the fault)."""
        self._blackhole = False
        self._latency = 0.0
        self._bandwidth = 0
        log.info("faultproxy.healed")

    # ------------------------------------------------------------------ forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(client_w=writer)
        self._links.add(link)
        try:
            if self._blackhole:
                # Accept and swallow: the connect "succeeds" and then nothing ever answers. This
                # connection stays a black hole after a heal; the client must time out and
                # reconnect, as it would in the field.
                while await reader.read(CHUNK):
                    pass
                return
            try:
                up_r, up_w = await asyncio.open_connection(*self.target)
            except OSError as exc:
                log.info("faultproxy.upstream_refused", error=str(exc))
                return
            link.upstream_w = up_w
            up = asyncio.create_task(self._pump(reader, up_w, link, "up"), name="proxy-up")
            down = asyncio.create_task(self._pump(up_r, writer, link, "down"), name="proxy-down")
            link.tasks = [up, down]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            if link.half_open:
                # The client side stays open and unanswered (the up pump swallows what the
                # client sends) until the client gives up.
                await up
        except (OSError, ConnectionError):
            pass
        finally:
            await self._drop(link)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link,
                    way: str) -> None:
        loop = asyncio.get_running_loop()
        # Delivery times are kept monotone so that latency and pacing never reorder bytes.
        ready_at = loop.time()
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                if self._blackhole or link.half_open:
                    continue  # swallowed: no error, no RST, no FIN
                now = loop.time()
                ready_at = max(ready_at, now + self._latency)
                if self._bandwidth:
                    ready_at += len(data) / self._bandwidth
                delay = ready_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self._blackhole or link.half_open:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            if not link.half_open:
                with contextlib.suppress(OSError, RuntimeError):
                    dst.close()

    async def _drop(self, link: _Link) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        for t in link.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        for w in (link.client_w, link.upstream_w):
            if w is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()
        for t in link.tasks:
            if t is not asyncio.current_task():
                with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                    await t


class ProxyThread:
    """A FaultProxy on its own event loop thread: `with ProxyThread(host, port) as p: p.cut()`."""

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy",
                                        daemon=True)
        self.proxy = FaultProxy(target_host, target_port, listen_port=listen_port)

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def injected(self) -> Counter[str]:
        return self.proxy.injected

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _soon(self, fn: Callable[[], None]) -> None:
        async def run() -> None:
            fn()

        self._call(run())

    def start(self) -> ProxyThread:
        self._thread.start()
        self._call(self.proxy.start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        async def shutdown() -> None:
            await self.proxy.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):  # stopping must not hide the test's own failure
            self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> int:
        return self._call(self.proxy.cut())

    def half_open(self) -> int:
        return self._call(self.proxy.half_open())

    def blackhole(self, on: bool) -> None:
        self._soon(lambda: self.proxy.blackhole(on))

    def latency(self, seconds: float) -> None:
        self._soon(lambda: self.proxy.latency(seconds))

    def bandwidth(self, bytes_per_s: int) -> None:
        self._soon(lambda: self.proxy.bandwidth(bytes_per_s))

    def heal(self) -> None:
        self._soon(self.proxy.heal)

    def open_connections(self) -> int:
        async def count() -> int:
            return self.proxy.open_connections

        return self._call(count())

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
