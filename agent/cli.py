"""`branch-agent`: run the agent and the installer's commands."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from agent.errors import AgentError, ConfigError
from agent.log import configure_logging

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_CONFIG = 2


def _summary(cfg: AgentConfig) -> str:
    src = cfg.sources
    lines = [
        f"gateway       {cfg.gateway.id}",
        f"state dir     {cfg.gateway.state_dir}",
        f"signing key   {cfg.gateway.key_file}",
        f"outbox quota  {cfg.outbox.quota_bytes} bytes",
        f"uplinks       {', '.join(cfg.uplink.order)} (ack mode {cfg.forwarder.ack_mode})",
    ]
    counts = {name: len(v) if isinstance(v, list) else (1 if v else 0)
              for name, v in src.model_dump().items()}
    lines.append("sources       " + (", ".join(f"{k}: {n}" for k, n in counts.items() if n)
                                     or "none"))
    lines.append(f"rules         {len(cfg.rules)}")
    return "\n".join(lines)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(Path(args.path))
    except ConfigError as exc:
        print(f"{exc}", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.path}: OK")
    print(_summary(cfg))
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.keys import generate_keypair

    info = generate_keypair(Path(args.dir), force=args.force)
    print(f"private key   {Path(args.dir) / 'signing.key'} (mode 0600)")
    print(f"public key    {Path(args.dir) / 'signing.pub'}")
    print(f"kid           {info.kid.hex()}")
    print(f"fingerprint   {info.fingerprint}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from agent.runtime import Runtime, install_signal_handlers

    cfg = load_config(Path(args.config))
    configure_logging(args.log_level or cfg.log.level, cfg.log.format)

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await Runtime(cfg).run(stop)

    asyncio.run(main())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branch-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"branch-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    cc = sub.add_parser("check-config", help="validate a config file")
    cc.add_argument("path", nargs="?", default=str(DEFAULT_CONFIG_PATH))
    cc.set_defaults(func=cmd_check_config)

    kg = sub.add_parser("keygen", help="generate the gateway's Ed25519 signing key pair")
    kg.add_argument("--dir", required=True)
    kg.add_argument("--force", action="store_true", help="overwrite existing keys")
    kg.set_defaults(func=cmd_keygen)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_CONFIG
    except (AgentError, ValueError, OSError) as exc:
        structlog.get_logger(__name__).debug("cli.failed", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
