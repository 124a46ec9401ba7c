"""kill -9 of the agent at random moments while traffic flows: nothing accepted is lost,
nothing is delivered twice, the chain stays valid."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.faults.checker import read_outbox
from tests.faults.conftest import Chain, counter
from tests.support.agentproc import wait_until


def kill_at_random_moments(chain: Chain, rng: random.Random, kills: int) -> None:
    """Each run: start with fresh counter sources (telemetry burst + alarms), wait until it
    commits, then SIGKILL it at a moment chosen one of three ways: a random delay, the moment a
    signed batch sits unacked in the outbox (between claim/sign/send and ack), or with WAN
    latency so that batches are in flight for long."""
    for k in range(kills):
        way = k % 3
        chain.proxy.latency(0.3 if way == 2 else 0.0)
        before = chain.accepted_now()
        chain.start_agent(counter(f"k{k}", 800.0, batch=4), counter(f"a{k}", 20.0, prio=0,
                                                                   type="alarm.test"))
        chain.wait_accepting(before)
        if way == 1:
            # The moment a batch is stored signed but unacked.
            wait_until(lambda: (s := read_outbox(chain.ledger.db)) is not None and s.batches > 0,
                       10, "a signed batch in flight", chain.agent)
        else:
            # The random moment is the injected fault, not a wait for a condition.
            time.sleep(rng.uniform(0.0, 0.6))
        chain.kill()
    chain.proxy.heal()


def test_ten_kills_lose_nothing(chain: Chain, rng: random.Random) -> None:
    """10 SIGKILLs at random moments (some with a batch signed but unacked): every accepted id
    arrives exactly once, counter values have no holes, alarms all arrive."""
    kill_at_random_moments(chain, rng, 10)
    chain.drain()
    rep = chain.check("kill x10")
    assert chain.ledger.kills == 10
    assert chain.ledger.kills_with_batch_in_flight >= 3, "no kill landed between send and ack"
    assert rep.lost == 0 and rep.alarms > 0


@pytest.mark.slow
def test_fifty_kills_lose_nothing(chain: Chain, rng: random.Random) -> None:
    """FAULTS_KILLS (default 50) SIGKILLs at random moments: nothing accepted lost or doubled."""
    n = int(os.environ.get("FAULTS_KILLS", "50"))
    kill_at_random_moments(chain, rng, n)
    chain.drain()
    rep = chain.check(f"kill x{n}")
    assert chain.ledger.kills == n
    assert rep.lost == 0
