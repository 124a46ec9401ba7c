"""Path supervision (docs/PROTOCOL.md 7; EN 50136 dual path): signed heartbeats on both paths,
the platform's reporting times, and an alarm sent over the other path at once when one is down.
Real parts: mosquitto behind the fault proxy, the reference platform (MQTT and CoAP, one store),
the forwarder with the real MQTT and CoAP uplinks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiocoap
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.core.types import ALARM, Event
from agent.outbox import Outbox
from agent.protocol import ALARM_LANE, Ack, ProtocolError, decode_batch
from agent.protocol.cose import kid_for
from agent.protocol.heartbeat import (
    HeartbeatAnswer,
    build_heartbeat,
    decode_heartbeat_answer,
    encode_heartbeat_answer,
    verify_heartbeat,
)
from agent.runtime.forwarder import Forwarder, Signer
from agent.uplink.coap import CoapUplink, CoapUplinkConfig, shutdown_client_context
from agent.uplink.mqtt import MqttUplink, MqttUplinkConfig
from branchsim.broker import Mosquitto
from branchsim.faultproxy import FaultProxy
from branchsim.platform.coap_server import serve_coap, shutdown_coap
from branchsim.platform.mqtt_server import MqttPlatformServer
from branchsim.platform.receiver import Receiver
from branchsim.platform.supervision import PathSupervisor, Supervision
from tests.support.agentproc import until
from tests.support.broker import free_udp_port

GW = "gw-sup"
PATH_LOST_AFTER = 2.0
OFFLINE_AFTER = 3.0
HEARTBEAT_S = 0.3
BOUND_S = 0.6  # the platform's timer (0.2 s) and the way through the broker, with room


# --- the state machine, with plain numbers ----------------------------------------------------


def test_a_silent_path_is_lost_once_and_restored() -> None:
    """A path is lost only once it is silent past the reporting time, reported once, and
    restored by the next heartbeat; the other path is untouched."""
    m = PathSupervisor(path_lost_after=2.0, offline_after=3.0)
    assert m.heard("g", "mqtt", 0.0) == [] and m.heard("g", "coap", 0.0) == []
    m.heard("g", "coap", 1.5)
    assert m.check(2.0) == []  # exactly the reporting time: not yet
    [lost] = m.check(2.01)
    assert (lost.type, lost.gw, lost.attrs["path"]) == ("gateway.path_lost", "g", "mqtt")
    assert lost.attrs["silent_s"] == 2.01 and lost.attrs["reporting_time_s"] == 2.0
    assert m.check(3.0) == [] and m.lost("g") == {"mqtt"}
    [restored] = m.heard("g", "mqtt", 3.2)
    assert restored.type == "gateway.path_restored" and restored.attrs == {
        "path": "mqtt", "lost_s": 3.2}
    assert m.lost("g") == set()


def test_offline_needs_every_path_lost_and_the_offline_time() -> None:
    """Both paths lost: `gateway.offline` once the newest heartbeat is older than
    `offline_after`, not before, once; a heartbeat brings the gateway and its path back."""
    m = PathSupervisor(path_lost_after=2.0, offline_after=3.0)
    m.heard("g", "mqtt", 0.0)
    m.heard("g", "coap", 0.5)
    assert [e.attrs["path"] for e in m.check(2.6)] == ["coap", "mqtt"]
    assert m.check(3.5) == [] and not m.offline("g")
    [off] = m.check(3.51)
    assert off.type == "gateway.offline" and off.attrs["paths"] == ["coap", "mqtt"]
    assert m.check(100.0) == []
    assert [e.type for e in m.heard("g", "coap", 101.0)] == ["gateway.path_restored",
                                                              "gateway.online"]
    assert not m.offline("g") and m.lost("g") == {"mqtt"}


def test_one_path_lost_is_not_offline_and_known_paths_count_from_the_start() -> None:
    """A gateway with one live path is never offline; a path known from before the platform
    started is supervised from the start."""
    m = PathSupervisor(path_lost_after=2.0, offline_after=2.0)
    m.watch("g", "coap", 10.0)
    m.heard("g", "mqtt", 10.0)
    for t in (11.0, 11.9):
        m.heard("g", "mqtt", t)
    assert [e.attrs["path"] for e in m.check(12.5)] == ["coap"]
    assert not m.offline("g")
    with pytest.raises(ValueError):
        PathSupervisor(path_lost_after=5.0, offline_after=4.0)


# --- the heartbeat message ----------------------------------------------------------------


def test_heartbeat_round_trip_and_tampering() -> None:
    """A heartbeat verifies with its key to its fields; a flipped bit, another key, or a
    malformed answer are refused."""
    key = Ed25519PrivateKey.generate()
    kid = kid_for(key.public_key())
    data = build_heartbeat(key, kid, GW, "coap", 42, 1700000000.5)
    hb = verify_heartbeat(data, lambda k: key.public_key() if k == kid else None)
    assert (hb.gw, hb.path, hb.seq, hb.t, hb.kid) == (GW, "coap", 42, 1700000000.5, kid)
    assert hb.hash == hashlib.sha256(data).digest()
    bad = bytearray(data)
    bad[-70] ^= 1  # in the payload
    with pytest.raises(ProtocolError) as err:
        verify_heartbeat(bytes(bad), lambda k: key.public_key())
    assert err.value.reason in ("bad-signature", "malformed")
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ProtocolError) as err:
        verify_heartbeat(data, lambda k: other.public_key())
    assert err.value.reason == "bad-signature"
    answer = HeartbeatAnswer(hb.hash, 42, False, "replay", 41)
    assert decode_heartbeat_answer(encode_heartbeat_answer(answer)) == answer
    with pytest.raises(ProtocolError):
        decode_heartbeat_answer(b"\xa1\x61h\x40")


# --- against the real parts -------------------------------------------------------------------


class CoapSeen:
    """The CoAP endpoint's view of the shared Receiver: the event ids that came by CoAP."""

    def __init__(self, rx: Receiver) -> None:
        self.rx = rx
        self.ids: list[int] = []

    def handle_batch(self, data: bytes, topic_gw: str | None = None) -> Ack:
        ack = self.rx.handle_batch(data, topic_gw)
        if ack.ok:
            self.ids += [int(e["id"]) for e in decode_batch(data)[0].events]
        return ack


@dataclass
class Wan:
    rx: Receiver
    sup: Supervision
    broker: Mosquitto
    proxy: FaultProxy  # the gateway's MQTT path: gateway -> proxy -> mosquitto
    coap: CoapSeen
    coap_port: int
    key: Ed25519PrivateKey
    coap_ctx: aiocoap.Context | None = None
    tmp: Path = field(default_factory=Path)

    async def cut_coap(self) -> None:
        """The platform's CoAP endpoint goes away (requests are refused by ICMP)."""
        assert self.coap_ctx is not None
        ctx, self.coap_ctx = self.coap_ctx, None
        await shutdown_coap(ctx)

    def events(self, type: str | None = None, path: str | None = None) -> list[dict[str, object]]:
        return [e for e in self.rx.platform_events(GW)
                if (type is None or e["type"] == type)
                and (path is None or e["attrs"].get("path") == path)]  # type: ignore[attr-defined]


@pytest.fixture
async def wan(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Wan]:
    key = Ed25519PrivateKey.generate()
    rx = Receiver(tmp_path / "platform.db")
    rx.register(GW, key.public_key().public_bytes(Encoding.PEM,
                                                   PublicFormat.SubjectPublicKeyInfo))
    sup = Supervision(rx, path_lost_after=PATH_LOST_AFTER, offline_after=OFFLINE_AFTER)
    server = MqttPlatformServer(rx, "127.0.0.1", mosquitto.port, client_id="platform-sup",
                                supervision=sup)
    proxy = await FaultProxy("127.0.0.1", mosquitto.port).start()
    coap = CoapSeen(rx)
    port = free_udp_port()
    w = Wan(rx, sup, mosquitto, proxy, coap, port, key, tmp=tmp_path)
    w.coap_ctx = await serve_coap(coap, "127.0.0.1", port, supervision=sup)
    timer = asyncio.create_task(sup.run())
    try:
        await asyncio.to_thread(server.start)
        assert await asyncio.to_thread(server.ready.wait, 10), "platform never subscribed"
        yield w
    finally:
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer
        if w.coap_ctx is not None:
            await shutdown_coap(w.coap_ctx)
        await asyncio.to_thread(server.stop)
        await proxy.close()
        rx.close()


@dataclass
class Gateway:
    fw: Forwarder
    outbox: Outbox
    mqtt: MqttUplink
    coap: CoapUplink


@pytest.fixture
async def gateway(wan: Wan) -> AsyncIterator[Gateway]:
    """The forwarder with MQTT (through the proxy) preferred and CoAP as the other path;
    failover for bulk data after 60 s, so that nothing in these tests is a failover."""
    mqtt = MqttUplink(MqttUplinkConfig(
        host="127.0.0.1", port=wan.proxy.port, insecure=True, keepalive=5, backoff_base=0.05,
        backoff_max=0.3, connect_timeout=2.0, heartbeat_interval_s=HEARTBEAT_S,
        heartbeat_timeout_s=0.5), GW)
    coap = CoapUplink(CoapUplinkConfig(
        base=f"coap://127.0.0.1:{wan.coap_port}", insecure=True, timeout=2.0,
        probe_interval=0.5, heartbeat_interval_s=HEARTBEAT_S, heartbeat_timeout_s=0.5), GW)
    ob = await Outbox.open(wan.tmp / "gw" / "outbox.db", commit_interval=0.001)
    fw = Forwarder(ob, [mqtt, coap], Signer(wan.key, GW, time.time), failover_after_s=60.0,
                   ack_timeout_s=3.0)
    task = asyncio.create_task(fw.run())
    try:
        yield Gateway(fw, ob, mqtt, coap)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()


async def both_paths_heard(wan: Wan, gw: Gateway) -> None:
    await until(lambda: wan.sup.accepted[(GW, "mqtt")] >= 2
                and wan.sup.accepted[(GW, "coap")] >= 2, 10, "heartbeats on both paths")
    await until(lambda: gw.fw.stats.alarm_uplink == gw.mqtt.name, 5, "alarms on MQTT")


async def test_a_cut_path_is_reported_within_the_reporting_time(wan: Wan,
                                                                gateway: Gateway) -> None:
    """Heartbeats go on both paths (CoAP carries no batches); black-holing the MQTT path makes
    the platform record gateway.path_lost for mqtt within path_lost_after + a small bound, not
    before the cut and not for coap; healing it records gateway.path_restored. The uplinks
    count their heartbeats."""
    await both_paths_heard(wan, gateway)
    await asyncio.sleep(PATH_LOST_AFTER + 0.5)  # a stretch longer than the reporting time ...
    assert wan.events() == [], "... with both paths alive raises nothing"
    assert gateway.coap.counters["heartbeats_acked"] >= 3  # the standby path too

    wan.proxy.blackhole(True)
    cut_at = time.monotonic()
    await until(lambda: wan.events("gateway.path_lost"), PATH_LOST_AFTER + 3, "path_lost")
    took = time.monotonic() - cut_at
    assert PATH_LOST_AFTER - HEARTBEAT_S - 0.2 <= took <= PATH_LOST_AFTER + BOUND_S, took
    [lost] = wan.events("gateway.path_lost")
    assert lost["attrs"] == {"path": "mqtt", "silent_s": pytest.approx(took, abs=0.5),
                             "reporting_time_s": PATH_LOST_AFTER}
    assert gateway.mqtt.counters["heartbeats_failed"] >= 1

    wan.proxy.blackhole(False)
    await wan.proxy.cut()  # the black-holed connection stays dead: make the gateway reconnect
    await until(lambda: wan.events("gateway.path_restored", "mqtt"), 10, "path_restored")
    assert [e["type"] for e in wan.events()] == ["gateway.path_lost", "gateway.path_restored"]
    assert not wan.events(path="coap")
    c = gateway.mqtt.counters
    settled = c["heartbeats_acked"] + c["heartbeats_failed"] + c["heartbeats_refused"]
    # every heartbeat sent is counted once settled; one may still await its answer
    assert c["heartbeats_sent"] - settled in (0, 1), c
    assert c["heartbeats_refused"] == 0


async def test_an_alarm_during_the_cut_goes_over_the_other_path_at_once(
        wan: Wan, gateway: Gateway) -> None:
    """An alarm raised as the MQTT path goes dark (TCP still open: only the heartbeats tell)
    reaches the platform over CoAP within seconds, though bulk failover would take 60 s;
    exactly once, both chains unbroken, bulk data still waiting for MQTT."""
    await both_paths_heard(wan, gateway)
    wan.proxy.blackhole(True)
    [alarm] = await gateway.outbox.append_many(
        [Event(src="gpio.vault_door", type="contact", v=True, t=time.time(), prio=ALARM)])
    raised = time.monotonic()
    await until(lambda: alarm in wan.coap.ids, 10, "the alarm over CoAP")
    took = time.monotonic() - raised
    assert took < 3.0, took  # heartbeat interval + answer timeout + one CoAP exchange
    assert gateway.fw.stats.active_uplink != gateway.coap.name, "bulk did not fail over"
    [stored] = [e for e in wan.rx.events(GW) if e["id"] == alarm]
    assert stored["lane"] == ALARM_LANE and stored["prio"] == ALARM

    wan.proxy.blackhole(False)
    await wan.proxy.cut()
    [tele] = await gateway.outbox.append_many(
        [Event(src="s.t", type="temperature", v=21.0, t=time.time(), prio=2)])
    await until(lambda: tele in wan.rx.delivered_ids(GW), 15, "bulk over MQTT again")
    wire = Counter(wan.rx.delivered_ids(GW))
    assert wire[alarm] == 1 and all(n == 1 for n in wire.values()), wire
    assert wan.coap.ids.count(alarm) == 1 and tele not in wan.coap.ids
    assert wan.rx.chain_head(GW, ALARM_LANE)[0] == wan.rx.batch_count(GW, ALARM_LANE)
    assert wan.rx.chain_head(GW)[0] == wan.rx.batch_count(GW, 0)
    assert not {r for (_, r) in wan.rx.counters()} - {"replay", "gap"}, wan.rx.counters()


async def test_both_paths_cut_is_offline(wan: Wan, gateway: Gateway) -> None:
    """MQTT black-holed and the CoAP endpoint gone: both paths are reported lost, then the
    gateway offline within offline_after + a small bound."""
    await both_paths_heard(wan, gateway)
    wan.proxy.blackhole(True)
    await wan.cut_coap()
    cut_at = time.monotonic()
    await until(lambda: wan.events("gateway.offline"), OFFLINE_AFTER + 3, "offline")
    took = time.monotonic() - cut_at
    assert took <= OFFLINE_AFTER + BOUND_S, took
    assert [(e["type"], e["attrs"].get("path")) for e in wan.events()] == [  # type: ignore[attr-defined]
        ("gateway.path_lost", "coap"), ("gateway.path_lost", "mqtt"), ("gateway.offline", None)]
    assert gateway.fw.stats.alarm_uplink is None


async def coap_post(port: int, data: bytes) -> HeartbeatAnswer:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        resp = await ctx.request(aiocoap.Message(
            code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/h/{GW}", payload=data,
            content_format=18)).response
    finally:
        await shutdown_client_context(ctx)
    assert resp.code == aiocoap.CHANGED
    return decode_heartbeat_answer(resp.payload)


async def test_forged_replayed_and_misrouted_heartbeats_are_refused_and_counted(
        wan: Wan) -> None:
    """Over the wire: a heartbeat played again, one signed by a key not registered, and an MQTT
    heartbeat played on the CoAP path are refused, counted, and keep no path alive."""
    kid = kid_for(wan.key.public_key())
    first = build_heartbeat(wan.key, kid, GW, "coap", 1000, time.time())
    assert (await coap_post(wan.coap_port, first)).ok
    again = await coap_post(wan.coap_port, first)
    assert (again.ok, again.err, again.last) == (False, "replay", 1000)
    older = build_heartbeat(wan.key, kid, GW, "coap", 999, time.time())
    assert (await coap_post(wan.coap_port, older)).err == "replay"
    stranger = Ed25519PrivateKey.generate()
    forged = build_heartbeat(stranger, kid_for(stranger.public_key()), GW, "coap", 2000,
                             time.time())
    assert (await coap_post(wan.coap_port, forged)).err == "unknown-key"
    misrouted = build_heartbeat(wan.key, kid, GW, "mqtt", 3000, time.time())
    assert (await coap_post(wan.coap_port, misrouted)).err == "wrong-path"
    assert wan.sup.refused == Counter({(GW, "replay"): 2, (GW, "unknown-key"): 1,
                                       (GW, "wrong-path"): 1})
    assert wan.rx.counters() == {(GW, "heartbeat-replay"): 2, (GW, "heartbeat-unknown-key"): 1,
                                 (GW, "heartbeat-wrong-path"): 1}
    assert wan.sup.accepted == Counter({(GW, "coap"): 1})
    await until(lambda: wan.events("gateway.path_lost", "coap"), PATH_LOST_AFTER + 2,
                "the refused heartbeats kept nothing alive")


async def test_a_gateway_behind_the_platforms_seq_catches_up(wan: Wan) -> None:
    """A gateway whose heartbeat seq is behind the platform's (a clock set back) is refused
    once as a replay and goes on at once above the platform's last seq."""
    ahead = int(time.time() * 1000) + 10_000_000
    assert wan.rx.advance_heartbeat(GW, "coap", ahead, time.time()) == (True, ahead)
    coap = CoapUplink(CoapUplinkConfig(
        base=f"coap://127.0.0.1:{wan.coap_port}", insecure=True, timeout=2.0,
        heartbeat_interval_s=HEARTBEAT_S, heartbeat_timeout_s=0.5), GW)
    ob = await Outbox.open(wan.tmp / "gw2" / "outbox.db", commit_interval=0.001)
    fw = Forwarder(ob, [coap], Signer(wan.key, GW, time.time))
    task = asyncio.create_task(fw.run())
    try:
        await until(lambda: coap.counters.get("heartbeats_acked", 0) >= 2, 10, "caught up")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ob.close()
    assert coap.counters["heartbeats_refused"] == 1
    assert wan.sup.refused == Counter({(GW, "replay"): 1})
