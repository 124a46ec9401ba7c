"""WAN faults between the agent and the broker (through branchsim.faultproxy) and broker
faults: traffic keeps flowing in, and once the path is back everything accepted arrives once."""

from __future__ import annotations

from tests.faults.conftest import Chain, counter
from tests.support.agentproc import wait_until


def test_proxy_faults_lose_nothing(chain: Chain) -> None:
    """Latency + bandwidth limit, a cut, a black hole (no RST) and a half-open connection, one
    after the other under load: the agent notices each (keepalive for the silent ones),
    reconnects, and every accepted id arrives exactly once."""
    chain.start_agent(counter("net", 300.0, batch=3), counter("alarm", 5.0, prio=0,
                                                               type="alarm.test"))
    chain.wait_delivered(100)

    chain.proxy.latency(0.2)
    chain.proxy.bandwidth(20_000)
    n = chain.delivered()
    chain.wait_delivered(n + 200)  # slow but moving
    chain.proxy.heal()

    n = chain.delivered()
    assert chain.proxy.cut() == 1
    chain.wait_delivered(n + 200)

    chain.proxy.blackhole(True)
    # The agent's keepalive (5 s) must notice the silence; it then reconnects into the hole.
    wait_until(lambda: chain.proxy.proxy.connections >= 3, 20, "reconnect after black hole",
               chain.agent)
    chain.proxy.heal()
    n = chain.delivered()
    chain.wait_delivered(n + 200, timeout=30)

    assert chain.proxy.half_open() == 1
    conns = chain.proxy.proxy.connections
    wait_until(lambda: chain.proxy.proxy.connections > conns, 20,
               "reconnect after half-open", chain.agent)
    n = chain.delivered()
    chain.wait_delivered(n + 200)

    chain.drain()
    rep = chain.check("proxy: latency+bandwidth, cut, blackhole, half-open")
    assert rep.lost == 0 and rep.alarms > 0


def test_broker_restart_and_state_loss_lose_nothing(chain: Chain) -> None:
    """A broker restart (sessions kept) and a broker that comes back with no state at all
    (sessions, queued batches and acks gone): the agent re-sends unacked batches byte for byte
    and the platform ends with every accepted id once and a valid chain."""
    chain.start_agent(counter("brk", 300.0, batch=3), counter("alarm", 5.0, prio=0,
                                                               type="alarm.test"))
    chain.wait_delivered(100)
    chain.broker.restart()
    from tests.faults.checker import SUMMARY

    SUMMARY.faults["broker restart"] += 1
    n = chain.delivered()
    chain.wait_delivered(n + 200)
    chain.lose_broker_state()
    n = chain.delivered()
    chain.wait_delivered(n + 200, timeout=40)
    chain.drain()
    rep = chain.check("broker restart + state loss")
    assert rep.lost == 0 and rep.alarms > 0
