"""`branch-agent`: run the agent and the installer's commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from agent.core.errors import AgentError, ConfigError
from agent.core.log import configure_logging
from agent.core.paths import StateLayout
from agent.security.integrity import MANIFEST_PATH

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_CONFIG = 2
EXIT_NOT_RUNNING = 3  # `status`: the agent is not running (figures read from the database)


def _summary(cfg: AgentConfig) -> str:
    src = cfg.sources
    lines = [
        f"gateway       {cfg.gateway.id}",
        f"state dir     {cfg.gateway.state_dir}",
        f"signing key   {cfg.gateway.key_file}",
        f"outbox quota  {cfg.outbox.quota_bytes} bytes",
        f"uplinks       {', '.join(cfg.uplink.order)} (ack mode {cfg.forwarder.ack_mode})",
    ]
    def count(v: object) -> int:
        if isinstance(v, list):
            return len(v)
        if isinstance(v, dict):  # a table of device lists (serial: ups, modbus, line)
            lists = [x for x in v.values() if isinstance(x, list)]
            return sum(len(x) for x in lists) if lists else 1
        return 1 if v else 0

    counts = {name: count(v) for name, v in src.model_dump().items()}
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


def _audit_operator(config: Path | None, command: str, *, image: Path | None = None,
                    **attrs: object) -> None:
    """Operator commands go to the local audit log (IEC 62443-4-2 CR 2.8), with the invoking
    user. Best effort: a command that cannot read the config or write the log still runs (the
    agent raises audit.degraded itself when it cannot write). `image`: the root file system
    the command worked on (`provision --root`), whose config names paths as the gateway sees
    them: the record goes to the log in that root, which the gateway's agent forwards, not to
    the provisioning machine's."""
    from agent.security.audit import AuditLog, AuditWriteError

    if config is None or not config.exists():
        return
    try:
        cfg = load_config(config)
        log = AuditLog.from_config(cfg.audit, cfg.gateway.state_dir)
        if image is not None:
            log.path = image / log.path.relative_to(log.path.anchor)
        log.append("audit.operator_command", {"cmd": command, **attrs})
    except (ConfigError, AuditWriteError, OSError) as exc:
        structlog.get_logger(__name__).warning("audit.operator_not_recorded", cmd=command,
                                               error=str(exc))


def cmd_audit(args: argparse.Namespace) -> int:
    from agent.security import audit

    argv = [args.action]
    path = args.file
    if path is None:
        cfg = load_config(Path(args.config))
        path = cfg.audit.path or StateLayout(cfg.gateway.state_dir).audit_log
    argv += ["--file", str(path)]
    if args.json:
        argv.append("--json")
    return audit.main(argv)


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.security.keys import generate_keypair

    info = generate_keypair(Path(args.dir), force=args.force)
    _audit_operator(Path(args.config) if args.config else None, "keygen",
                    kid=info.kid.hex(), force=bool(args.force))
    print(f"private key   {Path(args.dir) / 'signing.key'} (mode 0600)")
    print(f"public key    {Path(args.dir) / 'signing.pub'}")
    print(f"kid           {info.kid.hex()}")
    print(f"fingerprint   {info.fingerprint}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    configure_logging(args.log_level or cfg.log.level, cfg.log.format)
    from agent.runtime.root import Runtime, install_signal_handlers

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        config_path = Path(args.config)

        async def doctor() -> Mapping[str, Any]:
            from agent.ops.doctor import run_checks

            return {"checks": [c.as_dict() for c in await run_checks(config_path)]}

        await Runtime(cfg, config_path=config_path, doctor=doctor).run(stop)

    asyncio.run(main())
    return EXIT_OK


def _ask(option: str, value: str | None, interactive: bool) -> str:
    if value:
        return value
    if not interactive:
        raise ConfigError(f"--{option} is required (no terminal to ask on)",
                          [f"--{option}: missing, expected a value"])
    answer = input(f"{option.replace('-', ' ')}: ").strip()
    if not answer:
        raise ConfigError(f"--{option} is required", [f"--{option}: missing, expected a value"])
    return answer


def _renew(args: argparse.Namespace) -> int:
    from agent.ops.provision import renew

    cfg_path = Path(args.config)
    res = renew(load_config(cfg_path))
    _audit_operator(cfg_path, "renew", kid=res.kid, new_key=res.new_key, csr=str(res.csr))
    print(f"{'created' if res.new_key else 'kept   '}       {res.key} (mode 0600)")
    print(f"csr           {res.csr}")
    print(f"csr auth      {res.auth} (COSE_Sign1 by signing key kid {res.kid})")
    print("Send both files to the bank's CA; install the certificate it returns with "
          "`branch-agent provision --install-cert CERT`. Until then the current key and "
          "certificate stay in use.")
    return EXIT_OK


def _install_cert(args: argparse.Namespace) -> int:
    from agent.ops.provision import install_cert

    cfg_path = Path(args.config)
    res = install_cert(load_config(cfg_path), Path(args.install_cert))
    _audit_operator(cfg_path, "install_cert", subject=res.subject, serial=res.serial,
                    not_after=res.not_after, sha256=res.sha256)
    print(f"installed     {res.cert}: {res.subject}, serial {res.serial}, "
          f"valid until {res.not_after}")
    for p in res.kept_prev:
        print(f"previous      {p}")
    print("The agent uses it from its next connection; to switch now: "
          "`systemctl restart branch-agent`, then `branch-agent doctor`.")
    return EXIT_OK


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.ops.provision import provision, registration_text

    if args.renew:
        return _renew(args)
    if args.install_cert:
        return _install_cert(args)
    interactive = not args.non_interactive and sys.stdin.isatty()
    gw = _ask("gateway-id", args.gateway_id, interactive)
    broker = _ask("broker", args.broker, interactive)
    res = provision(Path(args.root), gw, broker, args.coap, exec_path=args.exec_path,
                    allow_ips=args.allow_ip)
    _audit_operator(res.config, "provision", image=Path(args.root),
                    gateway=gw, root=str(args.root), kid=res.info.kid.hex())
    for p in res.created:
        print(f"created       {p}")
    for p in res.kept:
        print(f"kept          {p}")
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print()
    print("Register this gateway with the platform:")
    print(f"  gateway id   {res.gateway_id}")
    print(f"  kid          {res.info.kid.hex()}")
    print(f"  fingerprint  {res.info.fingerprint}")
    print(f"Send {res.csr} to the bank's CA; install the certificate it returns as "
          "tls/client.pem and the bank's CA as tls/ca.pem, then run `branch-agent doctor`.")
    if not args.no_qr:
        import segno

        print()
        segno.make(registration_text(res.gateway_id, res.info), error="m").terminal(
            out=sys.stdout, compact=True)
    return EXIT_OK


def cmd_wipe(args: argparse.Namespace) -> int:
    from agent.ops.provision import agent_pid, wipe, wipe_check
    from agent.security.audit import AuditLog, AuditWriteError

    cfg_path = Path(args.config)
    cfg = load_config(cfg_path)
    gw = cfg.gateway.id
    pid = agent_pid(cfg)
    if pid is not None:
        print(f"error: the agent is running (pid {pid}): `systemctl stop branch-agent` first",
              file=sys.stderr)
        return EXIT_FAIL
    answer = args.yes_i_am_sure
    if answer is None:
        if not sys.stdin.isatty():
            print("error: no terminal to confirm on: pass --yes-i-am-sure GATEWAY_ID",
                  file=sys.stderr)
            return EXIT_FAIL
        print(f"This removes the keys, state (unsent events too) and config of gateway {gw}.")
        answer = input("type the gateway id to confirm: ").strip()
    if answer != gw:
        print(f"error: confirmation {answer!r} is not the gateway id; nothing removed",
              file=sys.stderr)
        return EXIT_FAIL
    keep = Path(args.keep_audit) if args.keep_audit else None
    audit = AuditLog.from_config(cfg.audit, cfg.gateway.state_dir)

    def not_wiped(cmd: str, exc: ValueError) -> None:
        """A refusal is worth an auditor's look (a damaged audit log, a foreign state dir) but
        is no wipe: its own record, added to the gateway's log, never starting one elsewhere."""
        if audit.path.exists():
            with contextlib.suppress(AuditWriteError):
                audit.append("audit.operator_command", {"cmd": cmd, "gateway": gw,
                                                        "reason": str(exc)})

    try:
        wipe_check(cfg, keep)
    except ValueError as exc:
        not_wiped("wipe_refused", exc)
        raise
    # Recorded once it goes ahead, before anything goes; no record, no wipe (the auditor must
    # see every wipe).
    audit.append("audit.operator_command", {"cmd": "wipe", "gateway": gw,
                                            "keep_audit": str(keep) if keep else None})
    try:
        res = wipe(cfg, cfg_path, keep)
    except ValueError as exc:  # the log was damaged between the check and its export
        not_wiped("wipe_aborted", exc)
        raise
    if res.audit_kept is not None:
        audit.append("audit.operator_command", {"cmd": "wipe", "done": True,
                                                "removed": len(res.removed)})
    for p in res.removed:
        print(f"removed       {p}")
    if res.audit_export is not None:
        print(f"audit log     exported to {res.audit_export}, then removed")
    elif res.audit_kept is not None:
        print(f"audit log     kept: {res.audit_kept}")
    return EXIT_OK


def _redacted(cfg: AgentConfig) -> dict[str, Any]:
    """The effective config as plain data. Secrets are pydantic SecretStr fields (the BTHome
    bindkeys), which `mode="json"` dumps as "**********"; key files appear as paths only."""
    return cfg.model_dump(mode="json")


def _drop_none(v: Any) -> Any:
    """TOML has no null: unset optional keys are left out."""
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v]
    return v


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    doc = _redacted(cfg)
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    import tomli_w

    print(f"# effective configuration of {args.config}: defaults filled in, secrets redacted")
    print(tomli_w.dumps(_drop_none(doc)), end="")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.ops import doctor

    checks = asyncio.run(doctor.run_checks(Path(args.config), args.timeout,
                                           Path(args.manifest)))
    code = doctor.exit_code(checks)
    integrity = next((str(c.status) for c in checks if c.name == "integrity"), None)
    _audit_operator(Path(args.config), "doctor", exit=code, integrity=integrity)
    if args.json:
        print(json.dumps({"exit": code, "checks": [c.as_dict() for c in checks]}, indent=2))
        return code
    from agent.ops.render import colour, table

    marks = {"pass": colour("✔ pass", "green"), "warn": colour("! warn", "yellow"),
             "fail": colour("✘ fail", "red"), "skip": colour("- skip", "dim")}
    print(table(((c.name, marks[str(c.status)], c.detail + (f"\nfix: {c.fix}" if c.fix else ""))
                 for c in checks), ("check", "result", "detail / fix"), wrap=(None, None, 72)))
    print({0: colour("all checks passed", "green"),
           1: colour("passed with warnings", "yellow"),
           2: colour("failures: fix them before leaving the branch", "red")}[code])
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from agent.ops import status as statusview

    cfg = load_config(Path(args.config))
    if args.json:
        doc = statusview.collect(cfg)
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK if doc["running"] else EXIT_NOT_RUNNING
    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how --watch ends
            statusview.watch(cfg, args.interval)
        return EXIT_OK
    doc = statusview.collect(cfg)
    print(statusview.render(doc))
    return EXIT_OK if doc["running"] else EXIT_NOT_RUNNING


def cmd_metrics(args: argparse.Namespace) -> int:
    from agent.ops import status as statusview
    from agent.runtime import metrics

    cfg = load_config(Path(args.config))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = metrics.serve(lambda: statusview.collect(cfg), args.port, args.bind)
    print(f"serving metrics on http://{args.bind}:{args.port}/metrics", flush=True)
    stop.wait()
    server.shutdown()
    return EXIT_OK


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branch-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"branch-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    default_cfg = str(DEFAULT_CONFIG_PATH)

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", default=default_cfg)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    cc = sub.add_parser("check-config", help="validate a config file")
    cc.add_argument("path", nargs="?", default=default_cfg)
    cc.set_defaults(func=cmd_check_config)

    kg = sub.add_parser("keygen", help="generate the gateway's Ed25519 signing key pair")
    kg.add_argument("--dir", required=True)
    kg.add_argument("--force", action="store_true", help="overwrite existing keys")
    kg.add_argument("--config", default=None,
                    help="the agent's config, for the audit record (default: none)")
    kg.set_defaults(func=cmd_keygen)

    pv = sub.add_parser("provision", help="config, keys, CSR and service for a new gateway")
    pv.add_argument("--root", default="/", help="root of the target file system (an SD image)")
    pv.add_argument("--gateway-id", help="the gateway's id as registered with the platform")
    pv.add_argument("--broker", metavar="HOST[:PORT]", help="the bank's MQTT broker (port 8883)")
    pv.add_argument("--coap", metavar="URL", help="CoAP fallback uplink, coap://host[:port]")
    pv.add_argument("--exec-path", default="/opt/branch-agent/bin/branch-agent",
                    help="where branch-agent is installed on the gateway (the unit's ExecStart)")
    pv.add_argument("--non-interactive", action="store_true", help="never prompt")
    pv.add_argument("--no-qr", action="store_true", help="do not print the QR code")
    pv.add_argument("--allow-ip", action="append", default=[], metavar="ADDR[/PREFIX]",
                    help="also allow this address or network in the egress drop-in (repeat)")
    life = pv.add_mutually_exclusive_group()
    life.add_argument("--renew", action="store_true",
                      help="new MQTT client key + CSR (authenticated by the signing key) in "
                      "tls/next/")
    life.add_argument("--install-cert", metavar="CERT",
                      help="check CERT against the pending key and the CA, then switch over")
    pv.add_argument("--config", default=default_cfg,
                    help="the gateway's config (for --renew / --install-cert)")
    pv.set_defaults(func=cmd_provision)

    wp = sub.add_parser("wipe", help="remove keys, state and config (decommissioning)")
    wp.add_argument("--config", default=default_cfg)
    wp.add_argument("--yes-i-am-sure", metavar="GATEWAY_ID",
                    help="confirm without a prompt (scripts): the gateway's id")
    wp.add_argument("--keep-audit", metavar="PATH",
                    help="export the audit log to PATH, then remove it too (default: keep it "
                    "in place)")
    wp.set_defaults(func=cmd_wipe)

    cf = sub.add_parser("config", help="show the effective config (secrets redacted)")
    cf.add_argument("action", choices=["show"])
    cf.add_argument("--config", default=default_cfg)
    cf.add_argument("--json", action="store_true", help="JSON instead of TOML")
    cf.set_defaults(func=cmd_config)

    dr = sub.add_parser("doctor", help="check that everything is right on this gateway")
    dr.add_argument("--config", default=default_cfg)
    dr.add_argument("--json", action="store_true", help="machine-readable output")
    dr.add_argument("--timeout", type=float, default=5.0, help="seconds per network check")
    dr.add_argument("--manifest", default=str(MANIFEST_PATH),
                    help="the integrity manifest written by provision")
    dr.set_defaults(func=cmd_doctor)

    st = sub.add_parser("status", help="what the agent is doing")
    st.add_argument("--config", default=default_cfg)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, help="--watch refresh period (s)")
    st.set_defaults(func=cmd_status)

    mt = sub.add_parser("metrics", help="serve the status figures for Prometheus (localhost)")
    mt.add_argument("--config", default=default_cfg)
    mt.add_argument("--port", type=int, default=9108)
    mt.add_argument("--bind", default="127.0.0.1", help="address to bind")
    mt.set_defaults(func=cmd_metrics)

    au = sub.add_parser("audit", help="verify or export the local, hash-chained audit log")
    au.add_argument("action", choices=["verify", "export"])
    au.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    au.add_argument("--file", type=Path, default=None,
                    help="the log (default: from the config's [audit] / state dir)")
    au.add_argument("--json", action="store_true")
    au.set_defaults(func=cmd_audit)

    if plugins:
        _add_plugins(sub)
    return p


# Commands other distributions add to branch-agent: an entry point in this group names a
# function that adds its subparser (with `func` set). The simulator registers `demo` this
# way; the product itself never imports the simulator (tests/test_layering.py).
PLUGIN_GROUP = "branch_agent.commands"


def _add_plugins(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()(sub)


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Our own commands' parser; with the plugins' commands too when the command is not one of
    ours or for the top-level help (scanning the installed distributions costs tens of ms, which
    `status` and `check-config` should not pay)."""
    parser = build_parser(plugins=False)
    ours = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    first = next((a for a in argv if not a.startswith("-")), None)
    return parser if first in ours.choices else build_parser(plugins=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser_for(argv).parse_args(argv)
    # stdout belongs to the command's output (`--json`); logs go to stderr, warnings only, until
    # `run` applies the config's level.
    configure_logging("warning")
    return run_command(args.func, args)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command: an operator's error is one line and an exit code, anything else a
    programming error that keeps its traceback."""
    try:
        return int(func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_CONFIG
    except (AgentError, OSError) as exc:
        # What the operator can act on: the message alone. Anything else is a programming
        # error and keeps its traceback (Python prints it, exit 1).
        structlog.get_logger(__name__).debug("cli.failed", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
