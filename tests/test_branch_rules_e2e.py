"""The branch security rules end to end: the agent's real runtime on the simulated branch
(MockFactory pins, pty serial ports), each rule against the simulator scenario written for it,
judged by what reaches the outbox."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import parse_config
from agent.runtime.root import Runtime
from branchsim.agentrun import started_sim, with_scenario
from branchsim.platform.commands import make_command
from branchsim.sim import Simulator
from tests.support.offline import Events, offline_gateway, outbox_events
from tests.vectors.commands import make_vectors

VECTORS = Path(make_vectors.__file__).parent
GW = "sim-gw"


def agent_cfg(tmp_path: Path) -> dict[str, Any]:
    return offline_gateway(tmp_path, GW,
                           commands={"platform_key": str(VECTORS / "platform-test.pub")})


@dataclass
class Branch:
    rt: Runtime
    sim: Simulator
    state: Path

    def events(self) -> Events:
        return outbox_events(self.state)

    async def until(self, cond: Callable[[Events], bool], timeout: float = 20.0) -> Events:
        async with asyncio.timeout(timeout):
            while not cond(evs := self.events()):
                await asyncio.sleep(0.05)  # polling interval of a condition wait
        return evs


@contextlib.asynccontextmanager
async def branch(tmp_path: Path, scenario: str, speed: float = 1.0) -> AsyncIterator[Branch]:
    """The runtime on the scenario's simulated branch, configured with the scenario's [agent]
    rules and its wall clock; the timeline plays once the agent is ready."""
    with started_sim(scenario, tmp_path / "sim", speed) as sim:
        # as `branch-sim agent SCENARIO` runs it: the scenario's [agent] rules over the config
        cfg = with_scenario(parse_config(agent_cfg(tmp_path)), sim)
        rt = Runtime(cfg, pin_factory=sim.pin_factory, clock=sim.agent_clock())
        stop = asyncio.Event()
        task = asyncio.create_task(rt.run(stop))
        try:
            await asyncio.wait_for(rt.ready.wait(), 15)
            sim.resume()
            yield Branch(rt, sim, cfg.gateway.state_dir)
        finally:
            stop.set()
            await task


def of(evs: Events, *types: str) -> list[tuple[str, str, Any, int, dict[str, Any]]]:
    """(src, type, value, priority, attrs) of the events of these types, in outbox order."""
    return [(e["src"], e["type"], e["v"], e["prio"], e.get("attrs") or {}) for e in evs
            if e["type"] in types]


def platform_key() -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((VECTORS / "platform-test.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def arm_states(evs: Events) -> list[tuple[str, str]]:
    return [(v, attrs["cause"]) for _, _, v, _, attrs in of(evs, "arm.state")]


async def test_late_night_vault_arming_priorities_and_sequence(tmp_path: Path) -> None:
    """late-night-vault (Tuesday 23:30 in Berlin): the schedule has the branch armed; the vault
    opening is an alarm and, with no keyswitch disarm before it, raises
    vault.opened_without_disarm; the keyswitch disarms (an arm.state event), the next opening
    is telemetry with no alert; the keyswitch re-arms; a signed disarm and arm command do the
    same through the command processor."""
    async with branch(tmp_path, "late-night-vault") as b:
        evs = await b.until(lambda evs: ("armed", "keyswitch") in arm_states(evs))
        assert arm_states(evs) == [("armed", "schedule"), ("disarmed", "keyswitch"),
                                   ("armed", "keyswitch")]
        initial = of(evs, "arm.state")[0]
        assert initial[0] == "arming" and initial[3] == 1 and initial[4]["initial"] is True
        vault = [(v, p) for s, _, v, p, a in of(evs, "contact") if not a.get("initial")]
        assert vault == [("open", 0), ("closed", 0), ("open", 2), ("closed", 2)]
        assert [(e[1], e[2], e[3]) for e in of(evs, "vault.opened_without_disarm")] == [
            ("vault.opened_without_disarm", "open", 0)]
        keys = [(v, a.get("initial", False)) for _, _, v, _, a in of(evs, "keyswitch")]
        assert keys == [("arm", True), ("disarm", False), ("arm", False)]
        order = [(e["type"], e["v"]) for e in evs
                 if e["type"] in ("arm.state", "keyswitch", "contact",
                                  "vault.opened_without_disarm")
                 and not (e.get("attrs") or {}).get("initial")]
        assert order == [("contact", "open"), ("vault.opened_without_disarm", "open"),
                         ("contact", "closed"), ("keyswitch", "disarm"),
                         ("arm.state", "disarmed"), ("contact", "open"), ("contact", "closed"),
                         ("keyswitch", "arm"), ("arm.state", "armed")]

        assert b.rt.commands is not None
        key, now = platform_key(), b.rt.clock.time()
        ack = await b.rt.commands.handle(make_command(key, GW, "disarm", now=now, seq=1))
        assert ack.ok and ack.result == {"state": "disarmed", "cause": "command",
                                         "changed": True}
        ack = await b.rt.commands.handle(make_command(key, GW, "arm", now=now, seq=2))
        assert ack.ok and ack.result is not None and ack.result["state"] == "armed"
        bad = await b.rt.commands.handle(make_command(key, GW, "arm", {"x": 1}, now=now, seq=3))
        assert (bad.ok, bad.err) == (False, "bad-args")
        evs = await b.until(lambda evs: len(arm_states(evs)) == 5)
        assert arm_states(evs)[3:] == [("disarmed", "command"), ("armed", "command")]
        assert b.rt.status_doc_sync()["arming"] == {"state": "armed", "cause": "command"}


async def test_door_propped_open_raises_and_clears(tmp_path: Path) -> None:
    """door-propped-open: a 1 s pass through the door raises nothing; propped open, the door
    raises contact.held_open once after 2 s, and closing it clears the alert."""
    async with branch(tmp_path, "door-propped-open") as b:
        evs = await b.until(lambda evs: any(e["type"] == "contact.held_open"
                                            and e["v"]["state"] == "cleared" for e in evs))
    changes = [(e["type"], e["v"] if e["type"] == "contact" else e["v"]["state"])
               for e in evs if e["src"] == "gpio.back_door"
               and not (e.get("attrs") or {}).get("initial")]
    assert changes == [("contact", "open"), ("contact", "closed"), ("contact", "open"),
                       ("contact.held_open", "raised"), ("contact", "closed"),
                       ("contact.held_open", "cleared")]
    [raised, cleared] = [e for e in evs if e["type"] == "contact.held_open"]
    assert raised["prio"] == 1 and 2.0 <= raised["v"]["open_s"] < 3.0
    assert 4.0 <= cleared["v"]["open_s"] < 6.5


async def test_sensor_that_dies_is_reported_silent(tmp_path: Path) -> None:
    """sensor-dies: the climate sensor stops printing while its port stays open (so no
    source.offline); after 2 s of silence sensor.silent is raised once, and its next line
    clears it."""
    async with branch(tmp_path, "sensor-dies") as b:
        evs = await b.until(lambda evs: any(e["type"] == "sensor.silent"
                                            and e["v"]["state"] == "cleared" for e in evs))
    mine = [e for e in evs if e["src"] == "line.climate"]
    assert not [e for e in mine if e["type"].startswith("source.")]
    kinds = [e["v"]["state"] if e["type"] == "sensor.silent" else "reading" for e in mine
             if e["type"] in ("sensor.silent", "temperature")]
    first_silent = kinds.index("raised")
    assert kinds[first_silent:] == ["raised", "reading", "cleared"]
    assert set(kinds[:first_silent]) == {"reading"} and len(kinds[:first_silent]) >= 3
    [raised, cleared] = [e for e in mine if e["type"] == "sensor.silent"]
    assert raised["prio"] == 1 and 2.0 <= raised["v"]["silent_s"] < 3.0
    assert cleared["v"]["silent_s"] >= 4.0
