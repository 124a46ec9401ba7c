"""The agent's real runtime on the simulated branch (`branch-sim agent`): scenarios end up in the
outbox as the expected events, through the real seams (MockFactory pins, pty serial ports)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import cbor2

from agent.config import parse_config
from agent.runtime.root import Runtime
from agent.security.keys import generate_keypair
from branchsim.agentrun import merge_sim_sources, started_sim
from branchsim.broker import get_free_port


def agent_cfg(tmp_path: Path) -> dict[str, Any]:
    generate_keypair(tmp_path / "keys")
    return {
        "gateway": {"id": "sim-gw", "state_dir": str(tmp_path / "state"),
                    "key_file": str(tmp_path / "keys" / "signing.key"), "time_sync": "synced"},
        # A port where nothing listens: the uplink stays down and every event stays in the
        # outbox, where the test reads it.
        "uplink": {"order": ["mqtt"], "mqtt": {"host": "127.0.0.1", "port": get_free_port(),
                                               "insecure": True, "backoff_max": 1.0}},
    }


def outbox_events(state: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True) as c:
        return [cbor2.loads(b) for (b,) in c.execute("SELECT body FROM events ORDER BY id")]


async def play(tmp_path: Path, scenario: str, speed: float, until: Any,
               timeout: float = 30.0) -> list[dict[str, Any]]:
    """Run the runtime with the simulator until `until(events)` holds; return the outbox."""
    cfg = parse_config(agent_cfg(tmp_path))
    state = cfg.gateway.state_dir
    with started_sim(scenario, tmp_path / "sim", speed) as sim:
        rt = Runtime(merge_sim_sources(cfg, sim.agent_sources_config()),
                     pin_factory=sim.pin_factory)
        stop = asyncio.Event()
        task = asyncio.create_task(rt.run(stop))
        try:
            await asyncio.wait_for(rt.ready.wait(), 15)
            sim.resume()
            async with asyncio.timeout(timeout):
                while not until(outbox_events(state)):
                    await asyncio.sleep(0.05)  # polling interval of a condition wait
        finally:
            stop.set()
            await task
    return outbox_events(state)


async def test_night_intrusion_sequence_in_the_outbox(tmp_path: Path) -> None:
    """night-intrusion, compressed 10x: the outbox holds the contact changes in order with
    their priorities; 6- and 8-edge contact bounce each give one event; a short panic tap none."""
    def changes(evs: list[dict[str, Any]]) -> list[tuple[str, str, Any, int]]:
        return [(e["src"], e["type"], e["v"], e["prio"]) for e in evs
                if e["src"].startswith("gpio.") and not (e.get("attrs") or {}).get("initial")]

    evs = await play(tmp_path, "night-intrusion", 10.0,
                     lambda evs: ("gpio.panic_teller", "panic", "released", 0) in changes(evs))
    assert changes(evs) == [
        ("gpio.front_door", "contact", "open", 1),
        ("gpio.hall_motion", "motion", True, 1),
        ("gpio.front_door", "contact", "closed", 1),
        ("gpio.vault_door", "contact", "open", 0),
        ("gpio.tamper_loop", "tamper", "tampered", 0),
        ("gpio.hall_motion", "motion", False, 1),
        ("gpio.vault_door", "contact", "closed", 0),
        ("gpio.panic_teller", "panic", "pressed", 0),
        ("gpio.panic_teller", "panic", "released", 0),
    ]
    initial = {e["src"] for e in evs if (e.get("attrs") or {}).get("initial")}
    assert initial == {"gpio.front_door", "gpio.hall_motion", "gpio.vault_door",
                       "gpio.tamper_loop", "gpio.panic_teller"}
    ids = [e["id"] for e in evs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_power_failure_alerts_and_voltages(tmp_path: Path) -> None:
    """power-failure: the Megatec poller raises on-battery, then battery-low, as alerts, and
    the voltages arrive as telemetry."""
    def flags(evs: list[dict[str, Any]], kind: str) -> list[Any]:
        return [e["v"] for e in evs if e["type"] == kind]

    evs = await play(tmp_path, "power-failure", 10.0,
                     lambda evs: True in flags(evs, "ups.battery_low"))
    on_batt = [e for e in evs if e["type"] == "ups.on_battery" and e["v"] is True]
    low = [e for e in evs if e["type"] == "ups.battery_low" and e["v"] is True]
    assert on_batt and low and on_batt[0]["id"] < low[0]["id"]
    assert on_batt[0]["prio"] == 1 and low[0]["prio"] == 1
    volts = [e for e in evs if e["type"] == "ups.battery_voltage"]
    assert volts and all(e["u"] == "V" and e["prio"] == 2 for e in volts)
    assert any(e["type"] == "ups.input_voltage" for e in evs)
