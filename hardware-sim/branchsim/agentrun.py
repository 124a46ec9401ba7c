"""`branch-sim agent SCENARIO`: the agent's real runtime with the simulator in its process.

GPIO needs it: the simulator's pins live on an in-process gpiozero MockFactory, handed to the
drivers as their pin factory exactly as lgpio's would be on a Pi. Serial devices are ptys the
drivers open by path; NUT, SNMP and Modbus TCP devices listen on 127.0.0.1. The simulator
depends on the product, never the reverse: the agent is started here with the simulated
hardware injected through its seams.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.config import AgentConfig, SourcesConfig, parse_config
from agent.runtime.root import Runtime, install_signal_handlers

if TYPE_CHECKING:
    from branchsim.sim import Simulator

__all__ = ["merge_sim_sources", "run_with_sim", "started_sim", "with_scenario"]

log = structlog.get_logger(__name__)


def merge_sim_sources(cfg: AgentConfig, sim_sources: dict[str, Any]) -> AgentConfig:
    """`cfg` with its GPIO, serial, NUT, SNMP and Modbus TCP sources replaced by the
    simulator's devices (`Simulator.agent_sources_config`)."""
    sources = cfg.sources.model_dump(mode="python", exclude_none=True)
    sources.update(sim_sources)
    return cfg.model_copy(update={"sources": SourcesConfig.model_validate(sources)})


def with_scenario(cfg: AgentConfig, sim: Simulator) -> AgentConfig:
    """`cfg` on the scenario's branch: its device sources are the simulator's devices,
    and the tables of the scenario's ``[agent]`` (the rules it was written for: ``[arming]``,
    ``[[held_open]]``, ``[[silence]]``, ``[[sequence]]``, ``[[rules]]``) replace the config's.
    Checked as a whole config is (`parse_config`): errors name the scenario."""
    merged = merge_sim_sources(cfg, sim.agent_sources_config())
    overlay = dict(sim.scenario.agent or {})
    if not overlay:
        return merged
    doc = merged.model_dump(mode="python", exclude_none=True)
    doc.update(overlay)
    return parse_config(doc, f"{sim.scenario.origin} [agent] over the agent's config")


@contextlib.contextmanager
def started_sim(scenario: str, workdir: Path, speed: float) -> Any:
    """A started (paused) simulator for `scenario`; stopped on exit."""
    from branchsim.scenario import load_scenario
    from branchsim.sim import Simulator

    sim = Simulator(load_scenario(scenario), workdir=workdir, speed=speed)
    sim.start(paused=True)
    try:
        yield sim
    finally:
        sim.stop()


def run_with_sim(cfg: AgentConfig, scenario: str, speed: float = 1.0) -> None:
    """Run the agent on a simulated branch (`with_scenario`) until SIGTERM/SIGINT. The timeline
    starts once the agent's sources are up, so no step is played to a driver that is not
    listening yet."""

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        with started_sim(scenario, cfg.gateway.state_dir / "sim", speed) as sim:
            # the scenario's rules, and its wall clock when it has one (arming: a night at
            # the branch whatever the time here)
            rt = Runtime(with_scenario(cfg, sim), pin_factory=sim.pin_factory,
                         clock=sim.agent_clock())
            log.info("sim.started", scenario=scenario, speed=speed, devices=sim.device_paths())

            async def resume_when_ready() -> None:
                await rt.ready.wait()
                sim.resume()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(resume_when_ready(), name="sim-resume")
                tg.create_task(rt.run(stop), name="runtime")

    asyncio.run(main())
