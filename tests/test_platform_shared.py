"""Several reference platforms on one MQTT shared subscription (`branch-platform serve --shared
GROUP`): they share one store file, so one chain head per gateway; a batch that overtakes its
predecessor waits for it. Real mosquitto, real `branch-platform` processes, a real agent."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from agent.protocol import ZERO_HASH, Ack, batch_hash, decode_batch
from branchsim.broker import Mosquitto
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until
from tests.test_platform import GW, Gateway, pem

PLATFORM = [sys.executable, "-m", "branchsim.platform.cli"]


def test_two_receivers_on_one_store_store_a_batch_once(tmp_path: Path) -> None:
    """The same batch handed to two receivers on one store file at the same moment: one stores
    it, the other answers `replay` (check and store are one write transaction)."""
    db = tmp_path / "platform.db"
    g = Gateway()
    receivers = [Receiver(db), Receiver(db)]
    barrier = threading.Barrier(2)

    def handle(rx: Receiver, data: bytes) -> Ack:
        barrier.wait(10)
        return rx.handle_batch(data, topic_gw=GW)

    try:
        receivers[0].register(GW, pem(g.key))
        with ThreadPoolExecutor(2) as pool:
            for seq in range(1, 31):
                data = g.batch()
                acks = [f.result(30) for f in [pool.submit(handle, rx, data) for rx in receivers]]
                assert sorted(a.err or "ok" for a in acks) == ["ok", "replay"], f"seq {seq}"
                g.accepted(data, seq)
        assert receivers[1].chain_head(GW) == (30, g.prev)
        assert receivers[1].counters() == {(GW, "replay"): 30}
    finally:
        for rx in receivers:
            rx.close()


def test_batch_ahead_waits_for_its_predecessor_from_another_receiver(tmp_path: Path) -> None:
    """With gap_wait_s, a batch that overtook its predecessor waits while another receiver on the
    same store stores that predecessor, then is accepted; a real gap is still one `gap`."""
    db = tmp_path / "platform.db"
    g = Gateway()
    first, second = Receiver(db), Receiver(db)
    try:
        first.register(GW, pem(g.key))
        b1 = g.batch()
        g.accepted(b1, 1)
        b2 = g.batch()
        with capture_logs() as logs, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(second.handle_batch, b2, GW, gap_wait_s=30.0)
            wait_until(lambda: any(e["event"] == "platform.gap_wait" for e in logs), 10,
                       "batch 2 waits for batch 1")
            assert first.handle_batch(b1, topic_gw=GW).ok
            assert waiting.result(30).ok
        g.accepted(b2, 2)
        assert second.chain_head(GW) == (2, batch_hash(b2))

        ahead = g.batch(seq=4)  # seq 3 never comes
        ack = second.handle_batch(ahead, topic_gw=GW, gap_wait_s=0.05)
        assert (ack.ok, ack.err) == (False, "gap")
        assert first.counters() == {(GW, "gap"): 1}
    finally:
        first.close()
        second.close()


def stored_batches(db: Path, gw: str) -> list[tuple[int, bytes]]:
    """(seq, raw bytes) of every bulk lane batch the platform accepted from `gw`, by seq."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        rows = c.execute("SELECT seq, raw FROM batches WHERE gw = ? AND lane = 0 ORDER BY seq",
                         (gw,))
        return [(int(seq), bytes(raw)) for seq, raw in rows]


def load(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The synthetic source's events (the agent adds its own audit records)."""
    return [e for e in events if e["src"] == "synthetic.load"]


def test_shared_subscription_splits_one_gateways_batches_over_two_platforms(
    tmp_path: Path, broker: Mosquitto, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Two `serve --shared GROUP` processes on one store both take batches of one gateway; every
    event arrives exactly once, the stored hash chain is unbroken, nothing is rejected, the
    outbox drains and the agent and both platforms exit 0."""
    n = 3000
    db = tmp_path / "platform.db"
    agent = AgentProcess(
        tmp_path / "gw",
        uplink={"mqtt": mqtt_uplink(broker.port, None)},
        # Small batches produced faster than they are acked: the window holds several at once,
        # so the broker hands consecutive batches of the chain to different platforms.
        forwarder={"batch_max_events": 50, "batch_linger_ms": 20.0, "ack_timeout_s": 10.0},
        sources={"synthetic": [{"name": "load", "rate_hz": 5000.0, "batch": 50, "count": n,
                                "waveform": "counter"}]},
    )
    done = subprocess.run([*PLATFORM, "register", "--db", str(db), agent.gw, str(agent.pubkey)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr

    logs = [tmp_path / f"platform-{i}.log" for i in range(2)]
    platforms: list[subprocess.Popen[bytes]] = []
    for log in logs:
        with log.open("wb") as out:
            platforms.append(subprocess.Popen(
                [*PLATFORM, "serve", "--db", str(db), "--port", str(broker.port), "--insecure",
                 "--no-coap", "--shared", "platform"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            ))
        procs.append(platforms[-1])
    wait_until(lambda: all("platform.mqtt.subscribed" in log.read_text(errors="replace")
                           for log in logs), 20, "both platforms' shared subscriptions granted")

    rx = Receiver(db)
    try:
        agent.start()
        try:
            wait_until(lambda: len(load(rx.events(agent.gw))) >= n, 60,
                       "every event at the platform", agent)
            wait_until(lambda: agent.outbox_count() == 0, 20, "outbox drained", agent)
        finally:
            rc = agent.stop()
        assert rc == 0, agent.log_text()[-6000:]
        events = rx.events(agent.gw)
        head = rx.chain_head(agent.gw)
        counters = rx.counters()
    finally:
        rx.close()
    for p in platforms:
        p.send_signal(signal.SIGTERM)
    texts = [log.read_text(errors="replace") for log in logs]
    assert [p.wait(10) for p in platforms] == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert not any("handle_failed" in t for t in texts), "\n".join(t[-3000:] for t in texts)

    batches = stored_batches(db, agent.gw)
    accepted = [t.count("platform.accepted") for t in texts]
    assert all(accepted), f"both platforms took batches: {accepted}"
    assert sum(accepted) == len(batches), "each batch accepted once, by one platform"
    # `replay` only if a resend after an ack timeout crossed the ack; never a gap
    assert set(counters) <= {(agent.gw, "replay")}, counters

    assert [seq for seq, _ in batches] == list(range(1, len(batches) + 1))
    assert head == (len(batches), batch_hash(batches[-1][1]))
    prev, delivered = ZERO_HASH, []
    for seq, raw in batches:
        batch = decode_batch(raw)[0]
        assert batch.prev == prev, f"seq {seq}: chain broken"
        prev = batch_hash(raw)
        delivered += [int(e["id"]) for e in batch.events]
    # alarms and alerts go first, so ids are not in batch order; each is in exactly one batch
    assert sorted(delivered) == list(range(1, len(delivered) + 1))
    assert [int(e["id"]) for e in events] == sorted(delivered)
    assert sorted(e["v"] for e in load(events)) == [float(i) for i in range(n)]
