"""``branch-sim``: the simulated branch, alone, with the agent, or as the whole demo.

    branch-sim list
    branch-sim run night-intrusion --speed 10 [--workdir DIR]
    branch-sim agent night-intrusion --config agent.toml [--speed X]
    branch-sim demo [--headless] [--duration S] [--transport auto|mqtt|coap]
    branch-sim fleet --gateways N --rate R --broker HOST:PORT[,HOST:PORT...] [--duration S]

`run` prints the serial devices' paths, the IP devices' addresses and the agent's ``[sources]``
config between the lines ``--- agent config ---`` and ``--- end ---``, then plays the timeline
until it ends or Ctrl-C. `agent` runs the agent's real runtime from a config, its GPIO, serial,
NUT, SNMP and Modbus TCP sources replaced by the scenario's simulated devices, until SIGTERM.
A scenario whose devices need a daemon this machine lacks (upsd, snmpd) exits 2 naming the
package to install. `demo` is simulator, agent and reference platform
in one terminal (README). `fleet` runs N simulated gateways in one process against real
brokers and a platform, cutting the WAN of a share of them on request (branchsim.fleet).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import structlog

from branchsim.scenario import ScenarioError, list_scenarios, load_scenario
from branchsim.sim import Simulator, SimUnavailable

__all__ = ["main"]

CONFIG_BEGIN = "--- agent config ---"
CONFIG_END = "--- end ---"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branch-sim", description="Simulated branch hardware.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the shipped scenarios")
    run = sub.add_parser("run", help="run a scenario's devices and timeline")
    run.add_argument("scenario", help="a shipped scenario's name, or a path to a .toml file")
    run.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="time compression (10 = ten times faster; 0 = no waits between steps)",
    )
    run.add_argument("--workdir", type=Path, help="where device symlinks go (default: a temp dir)")
    agent = sub.add_parser("agent", help="run the agent on a scenario's simulated devices")
    agent.add_argument("scenario", help="a shipped scenario's name, or a path to a .toml file")
    agent.add_argument("--config", required=True, help="the agent's config file")
    agent.add_argument("--speed", type=float, default=1.0, metavar="X",
                       help="simulator time speed-up")
    agent.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    from branchsim.demo import HELP, add_arguments

    add_arguments(sub.add_parser("demo", help=HELP))
    from branchsim import fleet

    fleet.add_arguments(sub.add_parser("fleet", help=fleet.HELP))
    return parser


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _run(scenario_arg: str, speed: float, workdir: Path | None) -> int:
    scenario = load_scenario(scenario_arg)
    if speed < 0:
        print("branch-sim: --speed must be >= 0", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="branch-sim-") as tmp:
        sim = Simulator(scenario, workdir=workdir or Path(tmp), speed=speed)
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        try:
            sim.start()
            print(f"branch-sim: scenario {scenario.name} ({scenario.origin}), speed {speed}")
            print(f"workdir: {sim.workdir}")
            print("devices:")
            for name, path in sim.device_paths().items():
                print(f"  {name}  {path}")
            for name, address in sim.device_addresses().items():
                print(f"  {name}  {address}")
            for g in scenario.gpio:
                print(f"  {g.name}  pin {g.pin} ({g.kind}, in-process mock pin)")
            print(CONFIG_BEGIN)
            print(sim.config_snippet(), end="")
            print(CONFIG_END, flush=True)
            while not sim.wait_done(0.5):
                pass
            print("branch-sim: timeline done", flush=True)
            return 1 if sim.errors else 0
        except SimUnavailable as exc:
            print(f"branch-sim: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("branch-sim: stopped", flush=True)
            return 130
        finally:
            sim.stop()


def _agent(scenario: str, config: Path, speed: float, level: str | None) -> int:
    from agent.config import load_config
    from agent.core.errors import ConfigError
    from agent.core.log import configure_logging
    from branchsim.agentrun import run_with_sim

    try:
        cfg = load_config(config)
        load_scenario(scenario)  # a wrong name fails here, before the agent starts
    except ConfigError as exc:
        print(f"branch-sim: {exc}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except ScenarioError as exc:
        print(f"branch-sim: {exc}", file=sys.stderr)
        return 2
    configure_logging(level or cfg.log.level, cfg.log.format)
    try:
        run_with_sim(cfg, scenario, speed)
    except SimUnavailable as exc:
        print(f"branch-sim: {exc}", file=sys.stderr)
        return 2
    return 0


def _setup_logging() -> None:
    # stdout carries the paths and the config snippet; logs go to stderr.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return int(args.func(args))
    if args.command == "fleet":
        return int(args.func(args))
    if args.command == "agent":
        return _agent(args.scenario, Path(args.config), args.speed, args.log_level)
    _setup_logging()
    try:
        if args.command == "list":
            for name, description in list_scenarios():
                print(f"{name:20} {description}")
            return 0
        return _run(args.scenario, args.speed, args.workdir)
    except ScenarioError as exc:
        print(f"branch-sim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
