"""`branch-sim agent SCENARIO`: the agent's real runtime with the simulator in its process.

GPIO needs it: the simulator's pins live on an in-process gpiozero MockFactory, handed to the
drivers as their pin factory exactly as lgpio's would be on a Pi. Serial devices are ptys the
drivers open by path. The simulator depends on the product, never the reverse: the agent is
started here with the simulated hardware injected through its seams.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog

from agent.config import AgentConfig, SourcesConfig
from agent.runtime.root import Runtime, install_signal_handlers

__all__ = ["merge_sim_sources", "run_with_sim", "started_sim"]

log = structlog.get_logger(__name__)


def merge_sim_sources(cfg: AgentConfig, sim_sources: dict[str, Any]) -> AgentConfig:
    """`cfg` with its GPIO and serial sources replaced by the simulator's devices."""
    sources = cfg.sources.model_dump(mode="python", exclude_none=True)
    sources.update(sim_sources)
    return cfg.model_copy(update={"sources": SourcesConfig.model_validate(sources)})


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
    """Run the agent on a simulated branch until SIGTERM/SIGINT. The timeline starts once the
    agent's sources are up, so no step is played to a driver that is not listening yet."""

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        with started_sim(scenario, cfg.gateway.state_dir / "sim", speed) as sim:
            merged = merge_sim_sources(cfg, sim.agent_sources_config())
            rt = Runtime(merged, pin_factory=sim.pin_factory)
            log.info("sim.started", scenario=scenario, speed=speed, devices=sim.device_paths())

            async def resume_when_ready() -> None:
                await rt.ready.wait()
                sim.resume()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(resume_when_ready(), name="sim-resume")
                tg.create_task(rt.run(stop), name="runtime")

    asyncio.run(main())
