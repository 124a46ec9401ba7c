"""Simulated CoAP IP sensors: they POST SenML to the agent's ingest endpoint like real ones.

A `CoapSensorSim` posts on a schedule (`run`) and on demand (`post_event`), and can misbehave on
purpose: malformed SenML, oversize payloads, a wrong content format, or posting from an address
that is not on the agent's allowlist (it binds its socket to ``source_address``; on Linux every
127.0.0.0/8 address is local, so ``127.0.0.2`` is "another host" on one machine).

Every answer is recorded in `results` (sequence number, response code) so a test or the demo can
check what the agent promised: readings of a post answered 2.04 must reach the platform.

`flood` is the misbehaving peer of the flood test: raw NON POSTs from a paced loop (aiocoap
encodes the message once; only the message id changes), far more than any sensor sends. It is
blocking and meant to run in its own process (``python -m branchsim.coapsensors flood ...``) so
its CPU is not the agent's; it is bounded in rate and duration and only aims at loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiocoap
import aiocoap.error
import structlog

__all__ = ["CF_SENML_CBOR", "CF_SENML_JSON", "CoapSensorSim", "FloodStats", "PostResult", "flood"]

log = structlog.get_logger(__name__)

CF_SENML_JSON = 110
CF_SENML_CBOR = 112


@dataclass(frozen=True, slots=True)
class PostResult:
    """One post and its answer. `code` is None when no answer came (timeout, unreachable)."""

    seq: int
    kind: str
    code: str | None
    max_age: int | None = None
    payload: bytes = b""

    @property
    def accepted(self) -> bool:
        return self.code == str(aiocoap.CHANGED)


@dataclass
class CoapSensorSim:
    """One simulated IP sensor posting to ``{target}/ingest/{name}``."""

    name: str
    target: str  # e.g. "coap://127.0.0.1:5683"
    source_address: str = "127.0.0.1"
    timeout: float = 10.0
    results: list[PostResult] = field(default_factory=list)
    _ctx: aiocoap.Context | None = None
    _seq: int = 0

    async def __aenter__(self) -> CoapSensorSim:
        # A server context bound to port 0 is a client with a chosen source address.
        self._ctx = await aiocoap.Context.create_server_context(
            None, bind=(self.source_address, 0), transports=["udp6"]
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            await ctx.shutdown()

    def pack(self, values: Mapping[str, Any], unit: str | None = None) -> list[dict[str, Any]]:
        """A SenML pack with base name ``{name}/`` and one record per value; the sequence number
        rides along as ``seq`` so every accepted reading can be traced to its post."""
        self._seq += 1
        pack: list[dict[str, Any]] = [{"bn": f"{self.name}/", "n": "seq", "v": self._seq}]
        for key, value in values.items():
            rec: dict[str, Any] = {"n": key}
            rec["vb" if isinstance(value, bool) else "vs" if isinstance(value, str) else "v"] = (
                value
            )
            if unit is not None:
                rec["u"] = unit
            pack.append(rec)
        return pack

    async def post_raw(
        self, payload: bytes, content_format: int | None = CF_SENML_JSON, kind: str = "raw"
    ) -> PostResult:
        """POST bytes as they are; record and return the answer."""
        if self._ctx is None:
            raise RuntimeError("use `async with CoapSensorSim(...)`")
        msg = aiocoap.Message(
            code=aiocoap.POST, uri=f"{self.target}/ingest/{self.name}", payload=payload
        )
        if content_format is not None:
            msg.opt.content_format = content_format
        try:
            resp = await asyncio.wait_for(self._ctx.request(msg).response, self.timeout)
        except (TimeoutError, aiocoap.error.Error, OSError) as exc:
            log.info("sim.coap_no_answer", sensor=self.name, error=repr(exc))
            result = PostResult(self._seq, kind, None)
        else:
            result = PostResult(
                self._seq, kind, str(resp.code), resp.opt.max_age, bytes(resp.payload)
            )
        self.results.append(result)
        return result

    async def post_event(self, values: Mapping[str, Any], unit: str | None = None) -> PostResult:
        """Post one well-formed SenML JSON pack now (an "event": a door opened, a threshold)."""
        return await self.post_raw(json.dumps(self.pack(values, unit)).encode(), kind="senml")

    async def post_malformed(self) -> PostResult:
        """A record with neither value nor sum: the agent must answer 4.00."""
        self._seq += 1
        return await self.post_raw(b'[{"n":"broken"}]', kind="malformed")

    async def post_oversize(self, size: int = 64 * 1024) -> PostResult:
        """A syntactically valid pack larger than any sane limit: the agent must answer 4.13."""
        self._seq += 1
        pack = [{"n": "blob", "vs": "x" * size}]
        return await self.post_raw(json.dumps(pack).encode(), kind="oversize")

    async def post_wrong_format(self) -> PostResult:
        """SenML sent as plain JSON (50): the agent must answer 4.15."""
        return await self.post_raw(
            json.dumps(self.pack({"temperature": 20.0})).encode(), 50, kind="wrong_format"
        )

    async def run(self, interval: float, rng: random.Random | None = None) -> None:
        """Post a temperature/humidity pack every `interval` seconds until cancelled."""
        rng = rng or random.Random()
        while True:
            await self.post_event(
                {"temperature": round(rng.uniform(18, 26), 2), "humidity": rng.randint(30, 60)}
            )
            await asyncio.sleep(interval)


# --- the flood ------------------------------------------------------------------------------

FLOOD_MAX_RATE = 100_000.0  # requests per second
FLOOD_MAX_DURATION = 60.0  # seconds


@dataclass(frozen=True, slots=True)
class FloodStats:
    """What a flood sent (handed to the kernel) and what came back: `answers` counts response
    codes ("4.29": n)."""

    sent: int
    duration: float
    answers: dict[str, int]

    @property
    def rate(self) -> float:
        return self.sent / self.duration if self.duration > 0 else 0.0


def _code(datagram: bytes) -> str:
    if len(datagram) < 4:
        return "short"
    return f"{datagram[1] >> 5}.{datagram[1] & 31:02d}"


def flood(
    host: str,
    port: int,
    sensor: str,
    rate: float,
    duration: float,
    *,
    sockets: int = 8,
    source_address: str = "127.0.0.1",
    drain: float = 1.0,
) -> FloodStats:
    """Send NON ``POST /ingest/{sensor}`` (a valid one-record SenML JSON pack) at `rate` per
    second for `duration` seconds, round robin over `sockets` source ports (so the server's
    per-peer message-id deduplication does not absorb the flood), and count the answers; after
    the last send, keep reading answers until none came for `drain` seconds. Blocking."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError("the flood generator only aims at loopback addresses")
    if not (0 < rate <= FLOOD_MAX_RATE and 0 < duration <= FLOOD_MAX_DURATION):
        raise ValueError(f"rate <= {FLOOD_MAX_RATE:g}/s and duration <= {FLOOD_MAX_DURATION:g} s")
    msg = aiocoap.Message(
        code=aiocoap.POST,
        transport_tuning=aiocoap.Unreliable,
        token=b"",
        uri_path=("ingest", sensor),
        content_format=CF_SENML_JSON,
        payload=b'[{"n":"flood","v":1}]',
    )
    msg.mtype, msg.mid = aiocoap.NON, 0  # encoded once here; the loop rewrites the id bytes
    template = bytearray(msg.encode())
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(sockets)]
    answers: Counter[str] = Counter()

    def read(timeout: float) -> bool:
        ready, _, _ = select.select(socks, [], [], max(0.0, timeout))
        for s in ready:
            while True:
                try:
                    answers[_code(s.recv(2048))] += 1
                except (BlockingIOError, ConnectionRefusedError):
                    break  # nothing more queued (or an ICMP unreachable: the port is closed)
        return bool(ready)

    sent = lost = 0
    try:
        for s in socks:
            s.bind((source_address, 0))
            s.connect((host, port))
            s.setblocking(False)
        start = time.monotonic()
        end = start + duration
        while (now := time.monotonic()) < end:
            due = min(int((now - start) * rate), int(duration * rate))
            while sent < due:
                template[2:4] = (sent & 0xFFFF).to_bytes(2, "big")
                try:
                    socks[sent % sockets].send(template)
                except (BlockingIOError, ConnectionRefusedError):
                    lost += 1  # socket buffer full or port closed: lost, as on a LAN
                sent += 1
            read(min(0.001, end - time.monotonic()))
        elapsed = time.monotonic() - start
        while read(drain):
            pass
    finally:
        for s in socks:
            s.close()
    return FloodStats(sent=sent - lost, duration=elapsed, answers=dict(answers))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m branchsim.coapsensors flood HOST PORT SENSOR --rate R --duration D``: prints
    the `FloodStats` as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m branchsim.coapsensors")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fl = sub.add_parser("flood", help="flood a CoAP ingest endpoint on loopback")
    fl.add_argument("host")
    fl.add_argument("port", type=int)
    fl.add_argument("sensor")
    fl.add_argument("--rate", type=float, default=10_000.0)
    fl.add_argument("--duration", type=float, default=10.0)
    fl.add_argument("--sockets", type=int, default=8)
    args = parser.parse_args(argv)
    stats = flood(args.host, args.port, args.sensor, args.rate, args.duration, sockets=args.sockets)
    print(json.dumps({**asdict(stats), "rate": round(stats.rate, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
