"""Wiping a gateway: its keys, state and config go; its audit log is kept in place, or exported
(verified) and then removed. `wipe_check` makes the refusals before anything is touched."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import AgentConfig
from agent.core.atomic import write_atomic
from agent.core.errors import OperatorError
from agent.core.paths import RuntimeLayout, StateLayout
from agent.ops.provision.clientkey import next_dir
from agent.ops.status import pid_alive
from agent.security.audit import export, verify
from agent.security.keys import PUBLIC_NAME

__all__ = ["WipeResult", "agent_pid", "wipe", "wipe_check"]


@dataclass
class WipeResult:
    removed: list[Path] = field(default_factory=list)
    audit_kept: Path | None = None  # the local audit log, left in place
    audit_export: Path | None = None  # or exported here, then removed


# Directories `wipe` never removes as a whole, whatever the config says.
_SYSTEM_DIRS = frozenset(Path(p) for p in (
    "/", "/etc", "/var", "/var/lib", "/usr", "/usr/lib", "/opt", "/home", "/root", "/tmp",
    "/srv", "/run", "/boot", "/mnt", "/media"))


def _owned_dir(d: Path) -> bool:
    d = d.resolve()
    return len(d.parts) >= 3 and d not in _SYSTEM_DIRS and d != Path.home().resolve()


def agent_pid(cfg: AgentConfig) -> int | None:
    """The pid in the runtime dir's status.json if that process is alive, else None."""
    try:
        pid = int(json.loads(RuntimeLayout(cfg.gateway.runtime_dir).status.read_text())
                  .get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return pid if pid_alive(pid) else None


def _audit_path(cfg: AgentConfig) -> Path:
    return cfg.audit.path or StateLayout(cfg.gateway.state_dir).audit_log


def wipe_check(cfg: AgentConfig, keep_audit: Path | None = None) -> None:
    """The refusals of `wipe`, made before anything is touched, so that the caller records a
    wipe only once it is going ahead. Raises ValueError naming the reason."""
    state = cfg.gateway.state_dir
    if state.exists() and not _owned_dir(state):
        raise OperatorError(f"refusing to wipe {state}: gateway.state_dir must be the agent's "
                            "own directory")
    log_path = _audit_path(cfg)
    if keep_audit is not None and log_path.exists():
        checked = verify(log_path)
        if not checked.ok:
            raise OperatorError(f"the audit log {log_path} does not verify "
                                f"({checked.problems[0]}); nothing wiped: `branch-agent audit "
                                "verify` names the damage")


def wipe(cfg: AgentConfig, config_path: Path, keep_audit: Path | None = None) -> WipeResult:
    """Remove the gateway's keys (signing, TLS, pending ones, `.prev`), its trust anchors and
    OSCORE context, everything in its state dir, and its config. The local audit log is kept
    in place, or exported to `keep_audit` (JSON lines, verified) and then removed too. The
    caller checks the agent is not running (`agent_pid`), runs `wipe_check`, then records
    `audit.operator_command` before calling this (which checks again)."""
    wipe_check(cfg, keep_audit)
    res = WipeResult()
    state = cfg.gateway.state_dir
    log_path = _audit_path(cfg)
    if keep_audit is not None and log_path.exists():
        keep_audit.parent.mkdir(parents=True, exist_ok=True)
        out = io.StringIO()
        checked = export(log_path, out)
        write_atomic(keep_audit, out.getvalue().encode(), 0o640)
        if not checked.ok:
            raise OperatorError(f"the audit log {log_path} does not verify "
                                f"({checked.problems[0]}); exported to {keep_audit}, nothing "
                                "wiped")
        res.audit_export = keep_audit
    keeping = keep_audit is None and log_path.exists()
    if keeping:
        res.audit_kept = log_path
    log_real = log_path.resolve()

    def is_audit(p: Path) -> bool:
        """`p` is the audit log, one of its rotated files, or a directory holding them."""
        real = p.resolve()
        return real in log_real.parents or (real.parent == log_real.parent
                                            and real.name.startswith(log_real.name))

    def remove(p: Path) -> None:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            return
        res.removed.append(p)

    key_file = cfg.gateway.key_file
    files = [key_file, key_file.with_name(PUBLIC_NAME), key_file.parent / "next"]
    mq = cfg.uplink.mqtt
    if mq is not None and mq.tls is not None:
        key, cert = Path(mq.tls.key), Path(mq.tls.cert)
        files += [key, cert, Path(mq.tls.ca), key.with_name(key.name + ".prev"),
                  cert.with_name(cert.name + ".prev"), key.parent / "client.csr",
                  key.parent / "client.csr.cose", next_dir(mq.tls)]
    if cfg.commands is not None:
        files.append(cfg.commands.platform_key)
    co = cfg.uplink.coap
    if co is not None and co.oscore is not None and _owned_dir(co.oscore.context):
        files.append(co.oscore.context)
    for p in files:
        remove(p)
    if state.exists():
        for child in sorted(state.iterdir()):
            if not (keeping and is_audit(child)):
                remove(child)
    if keep_audit is not None:
        rotated = [p for p in log_path.parent.glob(log_path.name + ".*")
                   if p.name.rsplit(".", 1)[1].isdigit()]
        for p in [log_path, *rotated]:
            remove(p)
    remove(config_path)
    # Directories left empty (keys/, tls/, the config dir) go too; non-empty ones stay.
    for d in {key_file.parent, *(Path(p).parent for p in files), config_path.parent}:
        with contextlib.suppress(OSError):
            if d.is_dir() and _owned_dir(d) and not any(d.iterdir()):
                d.rmdir()
                res.removed.append(d)
    return res
