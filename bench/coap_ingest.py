"""SenML readings/s accepted by the CoAP ingest endpoint, with 1 and with 16 concurrent clients.

    .venv/bin/python bench/coap_ingest.py [--seconds 3] [--records 10]

Each client posts SenML JSON packs of ``--records`` records one request at a time (the next post
only after the 2.04), over real UDP on 127.0.0.1, as an IP sensor would. The sink is in memory,
so the figure is the CoAP + SenML path alone; the outbox's commit cost is measured by its own
bench. Baseline printed alongside: the same posts answered by a bare aiocoap resource that
does nothing (the floor that aiocoap itself sets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Sequence

import aiocoap
import aiocoap.resource

from agent.core.clock import SystemClock
from agent.core.types import Reading
from drivers.base import SourceContext
from drivers.coap.config import CoapIngestConfig
from drivers.coap.senml import CF_SENML_JSON
from drivers.coap.server import CoapIngestSource


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    async def submit(self, reading: Reading) -> None:
        self.count += 1

    async def submit_many(self, readings: Sequence[Reading], key: str | None = None) -> None:
        self.count += len(readings)


class _Bare(aiocoap.resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _clients(uri: str, n_clients: int, seconds: float, records: int) -> tuple[int, float]:
    payload = json.dumps(
        [{"bn": "bench/", "n": f"t{i}", "u": "Cel", "v": 20.0 + i} for i in range(records)]
    ).encode()
    ctxs = [await aiocoap.Context.create_client_context() for _ in range(n_clients)]
    accepted = 0
    deadline = time.perf_counter() + seconds

    async def one(ctx: aiocoap.Context) -> None:
        nonlocal accepted
        while time.perf_counter() < deadline:
            msg = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=payload)
            msg.opt.content_format = CF_SENML_JSON
            resp = await ctx.request(msg).response
            if resp.code == aiocoap.CHANGED:
                accepted += records

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(c) for c in ctxs))
    finally:
        for c in ctxs:
            await c.shutdown()
    return accepted, time.perf_counter() - start


async def main(seconds: float, records: int) -> None:
    port = free_udp_port()
    cfg = CoapIngestConfig.model_validate(
        {
            "bind": "127.0.0.1",
            "port": port,
            "max_records": max(records, 1),
            # The throughput of the ingest path itself: the production rate limits (a few
            # requests/s per sensor, 50/s per endpoint) are lifted for the measurement.
            "global_rate_hz": 10_000.0, "global_burst": 100_000,
            "max_concurrent": 1024,
            "sensors": [{"name": "bench", "allow": ["127.0.0.1"],
                         "rate_limit_hz": 10_000.0, "rate_burst": 100_000}],
        }
    )
    source = CoapIngestSource(cfg, SourceContext(clock=SystemClock()))
    sink = CountingSink()
    task = asyncio.create_task(source.run(sink))
    await asyncio.wait_for(source.started.wait(), 10)

    bare_port = free_udp_port()
    site = aiocoap.resource.Site()
    site.add_resource(("x",), _Bare())
    bare = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", bare_port))
    try:
        print(f"SenML JSON, {records} records per request, {seconds:g} s per run")
        for n in (1, 16):
            got, took = await _clients(f"coap://127.0.0.1:{port}/ingest/bench", n, seconds, records)
            base, btook = await _clients(f"coap://127.0.0.1:{bare_port}/x", n, seconds, records)
            print(
                f"  {n:2d} client(s): {got / took:9.0f} readings/s accepted "
                f"({got / records / took:7.0f} req/s); "
                f"bare aiocoap baseline {base / records / btook:7.0f} req/s"
            )
        assert sink.count > 0
    finally:
        await bare.shutdown()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--records", type=int, default=10)
    args = ap.parse_args()
    asyncio.run(main(args.seconds, args.records))
