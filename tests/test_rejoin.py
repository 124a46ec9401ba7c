"""A gateway that lost its state rejoins its chain (issue 16): a real `branch-agent run` process,
a real mosquitto and the reference platform.

- Its key restored onto an empty state directory (a new SD card with the keys from backup): the
  agent starts a new chain epoch at seq 1, the platform accepts it and records where the old
  chain ended, and everything accepted after the rejoin is delivered.
- Its store damaged after a `kill -9` (quarantined at the next start): the fresh store starts a
  new epoch too, so the platform never answers `fork`, and delivery goes on. (Before epochs, the
  fresh store continued from a chain head written every 2 s; stale after a crash, it forked the
  platform's chain and nothing was delivered again.)
"""

from __future__ import annotations

import shutil
from typing import Any

from agent.protocol import ALARM_LANE
from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AgentProcess, mqtt_uplink, wait_until
from tests.support.broker import Mosquitto

N = 400  # events the counter source makes per run


def counter_agent(dir: Any, broker: Mosquitto) -> AgentProcess:
    return AgentProcess(
        dir,
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(broker.port, None)},
        sources={"synthetic": [{"name": "c", "rate_hz": 200.0, "batch": 5, "count": N,
                                "waveform": "counter"}]},
    )


def counted(rx: Receiver, gw: str, epoch: str) -> list[float]:
    return [float(e["v"]) for e in rx.events(gw)
            if e["src"] == "synthetic.c" and e["epoch"] == epoch]


def run_second_chain(agent: AgentProcess, platform: Receiver, what: str) -> None:
    """Start the agent again; wait until its second chain delivered all N and it drained."""
    agent.start()
    try:
        wait_until(lambda: len(platform.epochs(agent.gw)) == 2
                   and len(counted(platform, agent.gw, platform.epochs(agent.gw)[1]["epoch"]))
                   >= N, 30, what, agent)
        wait_until(lambda: agent.outbox_count() == 0, 20, "outbox drained", agent)
    finally:
        assert agent.stop() == 0


def test_a_gateway_restored_onto_an_empty_state_dir_rejoins(
    tmp_path: Any, broker: Mosquitto, platform: Receiver
) -> None:
    """Keys kept, state directory emptied: the restarted agent's batches start a new epoch at
    seq 1 with ids from 1; the platform accepts them (no fork, no gap), records the new chain
    with where the old one ended, and every event accepted after the rejoin arrives, each
    once."""
    agent = counter_agent(tmp_path / "gw", broker)
    platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        wait_until(lambda: len(platform.events(agent.gw)) >= 200, 30, "first chain delivered",
                   agent)
    finally:
        assert agent.stop() == 0
    [first] = platform.epochs(agent.gw)
    head = platform.chain_head(agent.gw)
    alarm_seq, alarm_hash = platform.chain_head(agent.gw, ALARM_LANE)
    shutil.rmtree(agent.state)  # the card is new; the keys came back from the backup
    run_second_chain(agent, platform, "the new chain delivered")
    epochs = platform.epochs(agent.gw)
    assert epochs[0] == first and epochs[1]["epoch"] not in ("", first["epoch"])
    assert epochs[1]["prev"] == {
        "epoch": first["epoch"], "seq": head[0], "hash": head[1].hex(),
        "alarm_seq": alarm_seq or None, "alarm_hash": alarm_hash.hex() if alarm_seq else None,
    }, "the gap is on record, for each lane"
    values = counted(platform, agent.gw, epochs[1]["epoch"])
    assert values == [float(i) for i in range(N)], "every event after the rejoin"
    ids = [e["id"] for e in platform.events(agent.gw) if e["epoch"] == epochs[1]["epoch"]]
    assert ids == list(range(1, len(ids) + 1)), "ids from 1 in the new epoch, none missing"
    assert platform.counters() == {}, "no fork, no gap: nothing refused"


def test_a_quarantine_after_a_crash_keeps_delivering(
    tmp_path: Any, broker: Mosquitto, platform: Receiver
) -> None:
    """kill -9 while batches flow, then the store and its WAL are overwritten: at the next
    start it is quarantined and a fresh store starts a new epoch; the platform accepts it (no
    `fork`), the `gateway.store_reset` alert and every event after it arrive, the outbox drains.
    """
    agent = counter_agent(tmp_path / "gw", broker)
    platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        wait_until(lambda: len(platform.events(agent.gw)) >= 150, 30, "delivering", agent)
        agent.kill()
    finally:
        if agent.running:
            agent.stop()
    for part in ("outbox.db", "outbox.db-wal"):  # a card returning garbage for these blocks
        path = agent.state / part
        if path.exists():
            path.write_bytes(b"\xff" * path.stat().st_size)
    run_second_chain(agent, platform, "delivering after the quarantine")
    assert list(agent.state.glob("outbox.db.corrupt-*")), "the damaged store was set aside"
    new = platform.epochs(agent.gw)[1]["epoch"]
    resets = [e for e in platform.events(agent.gw)
              if e["type"] == "gateway.store_reset" and e["epoch"] == new]
    assert len(resets) == 1
    values = counted(platform, agent.gw, new)
    assert values == [float(i) for i in range(N)]
    assert (agent.gw, "fork") not in platform.counters(), platform.counters()
