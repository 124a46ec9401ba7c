"""CoAP ingest: SenML resolution (golden vectors) and the server's answers to a real client."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiocoap
import cbor2
import pytest
from structlog.testing import capture_logs

from agent.core.clock import SystemClock
from agent.core.errors import RefusedError
from agent.core.types import ALARM, TELEMETRY, Reading
from branchsim.coapsensors import CoapSensorSim
from drivers.base import SourceContext
from drivers.coap.config import CoapIngestConfig
from drivers.coap.senml import CF_SENML_CBOR, CF_SENML_JSON, SenMLRecord, decode_senml
from drivers.coap.server import CoapIngestSource, build_sources
from tests.support.agentproc import until
from tests.support.broker import free_udp_port
from tests.support.sinks import CollectingSink

NOW = 1_700_000_000.0

# RFC 8428 examples and edge cases: (pack as JSON text, resolved records)
GOLDEN: list[tuple[str, list[SenMLRecord]]] = [
    # RFC 8428 5.1.1: single datapoint, relative time 0
    (
        '[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]',
        [SenMLRecord("urn:dev:ow:10e2073a01080063", NOW, 23.1, "Cel")],
    ),
    # RFC 8428 5.1.2: base name, base time, base unit carried forward
    (
        '[{"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},'
        '{"n":"current","u":"A","v":1.2}]',
        [
            SenMLRecord("urn:dev:ow:10e2073a01080063:voltage", NOW, 120.1, "V"),
            SenMLRecord("urn:dev:ow:10e2073a01080063:current", NOW, 1.2, "A"),
        ],
    ),
    # absolute base time + relative offsets; bu as default unit; bv added to v
    (
        '[{"bn":"atm1/","bt":1.320067464e+09,"bu":"A","bv":10,"n":"current","t":-5,"v":1.2},'
        '{"n":"current","t":-4,"v":1.3},{"n":"door","vb":true,"u":"/"}]',
        [
            SenMLRecord("atm1/current", 1320067459.0, 11.2, "A"),
            SenMLRecord("atm1/current", 1320067460.0, 11.3, "A"),
            SenMLRecord("atm1/door", 1320067464.0, True, "/"),
        ],
    ),
    # string, data (base64url no padding), sum with base sum, unknown field ignored
    (
        '[{"n":"fw","vs":"1.2.3","x":1},{"n":"blob","vd":"AQI"},{"bs":100,"n":"energy","s":5}]',
        [
            SenMLRecord("fw", NOW, "1.2.3"),
            SenMLRecord("blob", NOW, b"\x01\x02"),
            SenMLRecord("energy", NOW, None, None, 105.0),
        ],
    ),
]

MALFORMED: list[tuple[bytes, str]] = [
    (b"{", "not valid JSON"),
    (b'{"n":"x","v":1}', "array of records"),
    (b"[]", "empty SenML pack"),
    (b"[1]", "not a map"),
    (b'[{"v":1}]', "invalid name"),
    (b'[{"n":"-x","v":1}]', "invalid name"),
    (b'[{"n":"x"}]', "no value and no sum"),
    (b'[{"n":"x","v":"1"}]', "wrong type"),
    (b'[{"n":"x","v":true}]', "wrong type"),
    (b'[{"n":"x","v":1,"vs":"a"}]', "more than one value"),
    (b'[{"n":"x","v":1,"foo_":2}]', "must-understand"),
    (b'[{"n":"x","vd":"!!"}]', "base64url"),
    (b'[{"bver":11,"n":"x","v":1}]', "version"),
    (b"\xff\xfe", "not valid JSON"),
]


@pytest.mark.parametrize(("pack", "expected"), GOLDEN)
def test_senml_json_golden(pack: str, expected: list[SenMLRecord]) -> None:
    """JSON SenML resolves names, times, units and values as RFC 8428 section 4.6 says."""
    result = decode_senml(pack.encode(), CF_SENML_JSON, NOW)
    assert result.error is None
    assert list(result.records) == expected


@pytest.mark.parametrize(("pack", "expected"), GOLDEN)
def test_senml_cbor_golden(pack: str, expected: list[SenMLRecord]) -> None:
    """The same packs as CBOR with integer labels resolve to the same records."""
    labels = {"bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6, "n": 0, "u": 1,
              "v": 2, "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8}  # fmt: skip
    records = []
    for rec in json.loads(pack):
        if "vd" in rec:  # CBOR carries data as a byte string, not base64
            rec["vd"] = b"\x01\x02"
        records.append({labels.get(k, k): v for k, v in rec.items()})
    result = decode_senml(cbor2.dumps(records), CF_SENML_CBOR, NOW)
    assert result.error is None
    assert list(result.records) == expected


@pytest.mark.parametrize(("payload", "why"), MALFORMED)
def test_senml_malformed_is_an_error_not_an_exception(payload: bytes, why: str) -> None:
    """Malformed packs give an error message naming the problem and no records."""
    result = decode_senml(payload, CF_SENML_JSON, NOW)
    assert result.records == ()
    assert result.error is not None and why in result.error


def test_senml_bad_cbor_and_record_limit() -> None:
    """Truncated CBOR is an error; more records than allowed is an error."""
    assert decode_senml(b"\x9f\x01", CF_SENML_CBOR, NOW).error is not None
    many = json.dumps([{"n": "x", "v": i} for i in range(5)]).encode()
    result = decode_senml(many, CF_SENML_JSON, NOW, max_records=4)
    assert result.error is not None and "too many records" in result.error


# --- the server ---------------------------------------------------------------------------



class RefusingSink(CollectingSink):
    """An outbox at quota for telemetry: refuses it, takes alarms."""

    async def submit_many(self, readings: Sequence[Reading], key: str | None = None) -> None:
        if any(r.priority >= TELEMETRY for r in readings):
            raise RefusedError("quota", priority=TELEMETRY, retry_after=42.5)
        await super().submit_many(readings)


@dataclass
class Server:
    source: CoapIngestSource
    sink: CollectingSink
    client: aiocoap.Context
    base: str

    async def post(
        self, path: str, payload: bytes, cf: int | None = CF_SENML_JSON
    ) -> aiocoap.Message:
        msg = aiocoap.Message(code=aiocoap.POST, uri=self.base + path, payload=payload)
        if cf is not None:
            msg.opt.content_format = cf
        return await asyncio.wait_for(self.client.request(msg).response, 10)

    async def get(self, path: str) -> aiocoap.Message:
        msg = aiocoap.Message(code=aiocoap.GET, uri=self.base + path)
        return await asyncio.wait_for(self.client.request(msg).response, 10)


async def _serve(sink: CollectingSink, **over: object) -> AsyncIterator[Server]:
    port = free_udp_port()
    cfg = CoapIngestConfig.model_validate(
        {
            "bind": "127.0.0.1",
            "port": port,
            "max_payload": 2048,
            "max_records": 50,
            "sensors": [
                {"name": "atm1", "allow": ["127.0.0.1"]},
                {"name": "vault", "allow": ["127.0.0.0/8"], "priority": ALARM},
                {"name": "elsewhere", "allow": ["10.1.2.0/24"]},
            ],
            **over,
        }
    )
    (source,) = build_sources(cfg, SourceContext(clock=SystemClock()))
    assert isinstance(source, CoapIngestSource)
    task = asyncio.create_task(source.run(sink), name="coap-ingest")
    client = await aiocoap.Context.create_client_context()
    try:
        await asyncio.wait_for(source.started.wait(), 10)
        yield Server(source, sink, client, f"coap://127.0.0.1:{port}")
    finally:
        await client.shutdown()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async for s in _serve(CollectingSink()):
        yield s


@pytest.fixture
async def refusing() -> AsyncIterator[Server]:
    async for s in _serve(RefusingSink()):
        yield s


async def test_post_json_is_committed_before_changed(server: Server) -> None:
    """A valid JSON pack gets 2.04 and every record is in the sink as a coap.<sensor> reading."""
    pack = [{"bn": "atm1/", "bu": "Cel", "n": "temperature", "v": 21.5}, {"n": "door", "vb": True}]
    resp = await server.post("/ingest/atm1", json.dumps(pack).encode())
    assert resp.code == aiocoap.CHANGED
    assert [(r.source, r.type, r.value, r.unit, r.priority) for r in server.sink.readings] == [
        ("coap.atm1", "atm1/temperature", 21.5, "Cel", TELEMETRY),
        ("coap.atm1", "atm1/door", True, "Cel", TELEMETRY),
    ]
    assert server.source.health.readings == 2


async def test_post_cbor_blockwise_uses_sensor_priority(server: Server) -> None:
    """A multi-block CBOR pack is reassembled, accepted, and takes the sensor's priority."""
    pack = [{0: f"vault.contact.number{i}", 4: i % 2 == 0, 6: -i} for i in range(45)]
    payload = cbor2.dumps(pack)
    assert 1024 < len(payload) <= 2048
    resp = await server.post("/ingest/vault", payload, CF_SENML_CBOR)
    assert resp.code == aiocoap.CHANGED
    assert len(server.sink.readings) == 45
    assert {r.priority for r in server.sink.readings} == {ALARM}


async def test_malformed_gets_400_with_diagnostic(server: Server) -> None:
    """Malformed SenML is answered 4.00 with the reason, nothing is kept, and it is counted."""
    resp = await server.post("/ingest/atm1", b'[{"n":"x","v":1},{"n":"y"}]')
    assert resp.code == aiocoap.BAD_REQUEST
    assert b"record 1: no value and no sum" in resp.payload
    assert server.sink.readings == []
    assert server.source.health.errors == {"malformed": 1}


async def test_not_allowlisted_gets_403(server: Server) -> None:
    """Unknown sensors and sensors posting from outside their networks get 4.03, counted."""
    ok = json.dumps([{"n": "x", "v": 1}]).encode()
    assert (await server.post("/ingest/elsewhere", ok)).code == aiocoap.FORBIDDEN
    assert (await server.post("/ingest/nobody", ok)).code == aiocoap.FORBIDDEN
    assert server.sink.readings == []
    assert server.source.health.errors == {"forbidden": 2}


async def test_oversize_gets_413(server: Server) -> None:
    """A payload above max_payload, or more records than max_records, gets 4.13."""
    big = json.dumps([{"n": "x", "vs": "a" * 3000}]).encode()
    resp = await server.post("/ingest/atm1", big)
    assert resp.code == aiocoap.REQUEST_ENTITY_TOO_LARGE
    assert resp.opt.size1 == 2048
    many = json.dumps([{"n": "x", "v": i} for i in range(51)]).encode()
    assert (await server.post("/ingest/atm1", many)).code == aiocoap.REQUEST_ENTITY_TOO_LARGE
    assert server.sink.readings == []
    assert server.source.health.errors == {"oversize": 2}


async def test_other_content_format_gets_415(server: Server) -> None:
    """Plain JSON (50) or no content format at all gets 4.15."""
    ok = json.dumps([{"n": "x", "v": 1}]).encode()
    assert (await server.post("/ingest/atm1", ok, 50)).code == aiocoap.UNSUPPORTED_CONTENT_FORMAT
    assert (await server.post("/ingest/atm1", ok, None)).code == aiocoap.UNSUPPORTED_CONTENT_FORMAT
    assert server.source.health.errors == {"unsupported_format": 2}


async def test_outbox_refusal_gets_503_with_max_age(refusing: Server) -> None:
    """When the outbox refuses the priority the answer is 5.03 with Max-Age from the hint."""
    ok = json.dumps([{"n": "x", "v": 1}]).encode()
    resp = await refusing.post("/ingest/atm1", ok)
    assert resp.code == aiocoap.SERVICE_UNAVAILABLE
    assert resp.opt.max_age == 43
    assert refusing.source.health.errors == {"refused": 1}
    # alarms are still taken
    assert (await refusing.post("/ingest/vault", ok)).code == aiocoap.CHANGED
    assert len(refusing.sink.readings) == 1


async def test_well_known_core_lists_only_what_the_asker_may_use(server: Server) -> None:
    """/.well-known/core lists the ingest resources the asking address is allowed to post to
    (atm1 and vault allow 127.0.0.1; "elsewhere" does not), and no implementation link naming
    the library and its version."""
    msg = aiocoap.Message(code=aiocoap.GET, uri=server.base + "/.well-known/core")
    resp = await asyncio.wait_for(server.client.request(msg).response, 10)
    assert resp.code == aiocoap.CONTENT
    assert b"</ingest/atm1>" in resp.payload and b"</ingest/vault>" in resp.payload
    assert b"elsewhere" not in resp.payload
    assert b"impl-info" not in resp.payload and b"aiocoap" not in resp.payload


async def test_simulated_sensor_every_answer(server: Server) -> None:
    """The simulated sensor's good, malformed, oversize, wrong-format and foreign posts get
    2.04, 4.00, 4.13, 4.15 and 4.03, and only the good post's readings are kept."""
    target = server.base
    async with (
        CoapSensorSim("atm1", target) as atm,
        CoapSensorSim("atm1", target, source_address="127.0.0.2") as intruder,
    ):
        assert (await atm.post_event({"temperature": 21.0, "door": False}, "Cel")).accepted
        assert (await atm.post_malformed()).code == str(aiocoap.BAD_REQUEST)
        assert (await atm.post_oversize()).code == str(aiocoap.REQUEST_ENTITY_TOO_LARGE)
        assert (await atm.post_wrong_format()).code == str(aiocoap.UNSUPPORTED_CONTENT_FORMAT)
        assert (await intruder.post_event({"temperature": 99.0})).code == str(aiocoap.FORBIDDEN)
    assert [(r.type, r.value) for r in server.sink.readings] == [
        ("atm1/seq", 1),
        ("atm1/temperature", 21.0),
        ("atm1/door", False),
    ]
    assert server.source.health.errors == {
        "malformed": 1,
        "oversize": 1,
        "unsupported_format": 1,
        "forbidden": 1,
    }


# --- flood resistance: rate limits, bounded work, generic answers ---------------------------


class BlockingSink(CollectingSink):
    """An outbox that commits only when the test says so (requests pile up waiting for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def submit_many(self, readings: Sequence[Reading], key: str | None = None) -> None:
        await self.release.wait()
        await super().submit_many(readings)


class BrokenSink(CollectingSink):
    """A sink with a bug: it raises an unexpected exception whose text must not leak."""

    async def submit_many(self, readings: Sequence[Reading], key: str | None = None) -> None:
        raise RuntimeError("boom in /var/lib/branch-agent/keys/signing.key")



def non_post(sensor: str, mid: int, payload: bytes) -> bytes:
    msg = aiocoap.Message(
        code=aiocoap.POST,
        transport_tuning=aiocoap.Unreliable,
        uri_path=("ingest", sensor),
        content_format=CF_SENML_JSON,
        payload=payload,
    )
    msg.mtype, msg.mid, msg.token = aiocoap.NON, mid, mid.to_bytes(2, "big")
    return bytes(msg.encode())


async def test_sensor_over_its_rate_gets_429_with_max_age() -> None:
    """Past its burst a sensor gets 4.29 with Max-Age until its next token, before any
    decoding (even malformed posts are 4.29), counted each time and logged once."""
    ok = json.dumps([{"n": "x", "v": 1}]).encode()
    with capture_logs() as logs:
        async for s in _serve(CollectingSink(), rate_limit_hz=0.5, rate_burst=2):
            assert (await s.post("/ingest/atm1", ok)).code == aiocoap.CHANGED
            assert (await s.post("/ingest/atm1", ok)).code == aiocoap.CHANGED
            for payload in (ok, b"{", ok):
                resp = await s.post("/ingest/atm1", payload)
                assert resp.code == aiocoap.TOO_MANY_REQUESTS
                assert resp.opt.max_age == 2
                assert resp.payload == b"too many requests"
            # another sensor has its own bucket
            assert (await s.post("/ingest/vault", ok)).code == aiocoap.CHANGED
            assert s.source.health.errors == {"rate_limited": 3}
            assert len(s.sink.readings) == 3
    rejected = [e for e in logs if e["event"] == "coap.rejected"]
    assert [(e["what"], e["total"]) for e in rejected] == [("rate_limited", 1)]


async def test_flood_over_global_rate_is_dropped_unparsed() -> None:
    """Datagrams over the endpoint-wide bucket are dropped before aiocoap parses them (no
    answer, counted as flooded); the ones within it are served."""
    async for s in _serve(CollectingSink(), global_rate_hz=0.01, global_burst=3):
        port = s.source.cfg.port
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            for mid in range(10):
                sock.send(non_post("atm1", mid, json.dumps([{"n": "x", "v": mid}]).encode()))
            await until(lambda src=s.source: src.health.errors.get("flooded", 0) == 7)
            answers = [await asyncio.wait_for(loop.sock_recv(sock, 2048), 10) for _ in range(3)]
        assert [a[1] for a in answers] == [int(aiocoap.CHANGED)] * 3
        assert s.source.health.errors == {"flooded": 7}
        assert len(s.sink.readings) == 3


async def test_requests_waiting_for_the_outbox_are_bounded() -> None:
    """With max_concurrent posts already waiting for the outbox, the next one gets 5.03 with
    Max-Age 1 at once; the waiting ones stay unanswered while the outbox has not committed
    (a 2.04 tells the sensor it may forget its readings), and get 2.04 when it commits.

    Mutation: answering before the commit (`_ingest` not awaiting `submit_many`, e.g. running
    it as a task) makes the waiting posts complete before the release: this test fails."""
    ok = json.dumps([{"n": "x", "v": 1}]).encode()
    sink = BlockingSink()
    async for s in _serve(sink, max_concurrent=2):
        waiting = [asyncio.create_task(s.post("/ingest/atm1", ok)) for _ in range(2)]
        await until(lambda src=s.source: src.inflight == 2)
        resp = await s.post("/ingest/vault", ok)
        assert resp.code == aiocoap.SERVICE_UNAVAILABLE
        assert resp.opt.max_age == 1
        # two more round trips through the same server after the waiting posts were received:
        # an answer sent for them before the commit would have arrived by now
        for _ in range(2):
            assert (await s.get("/.well-known/core")).code == aiocoap.CONTENT
        assert not any(w.done() for w in waiting), "answered before the outbox committed"
        assert sink.readings == []
        sink.release.set()
        assert [(await w).code for w in waiting] == [aiocoap.CHANGED] * 2
        assert s.source.inflight == 0
        assert s.source.health.errors == {"busy": 1}


async def test_answers_to_peers_are_generic() -> None:
    """Error answers are short fixed texts: no parser message, no exception text, no
    traceback; an unexpected fault in the agent is a bare 5.00 "internal error"."""
    ok = json.dumps([{"n": "x", "v": 1}]).encode()
    async for s in _serve(BrokenSink()):
        resp = await s.post("/ingest/atm1", ok)
        assert resp.code == aiocoap.INTERNAL_SERVER_ERROR
        assert resp.payload == b"internal error"
        assert s.source.health.errors == {"internal": 1}
        answers = [
            (await s.post("/ingest/atm1", b"{")).payload,
            (await s.post("/ingest/atm1", b"\x9f\x01", CF_SENML_CBOR)).payload,
            (await s.post("/ingest/atm1", b'[{"n":"<script>","v":1}]')).payload,
            (await s.post("/ingest/atm1", b'[{"n":"x","v":1,"evil_":2}]')).payload,
        ]
    assert answers == [
        b"not valid JSON",
        b"not valid CBOR",
        b"record 0: invalid name",
        b"record 0: must-understand field not supported",
    ]
