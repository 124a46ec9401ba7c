"""Signed downlink commands (docs/COMMANDS.md): verify, refuse or run, and acknowledge. The wire
format is agent.protocol.commands; this is the gateway's processor.

A command is a tagged COSE_Sign1 signed with the platform's command key, which is pinned on the
gateway at provisioning (`[commands] platform_key`). Its payload names the gateway, carries a
command `seq` that must increase with every command, and an expiry. The agent checks, in order:
structure, key, signature, gateway, validity window, sequence; every refusal is audited and
answered on `{prefix}/{gw}/cmd-ack` with a reason code and nothing else (no detail, no traceback).

The highest accepted `seq` is persisted (fsync, atomic rename) *before* the command runs, so a
command runs at most once even across a crash or a restart. Commands are processed one at a
time from a bounded queue: a flood of commands cannot grow memory or delay the event pipeline.

The acknowledgement is itself a COSE_Sign1, signed with the gateway's key, so the platform knows
which gateway answered and to exactly which command bytes (`h`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.core.atomic import write_atomic
from agent.core.clock import Clock
from agent.core.paths import StateLayout
from agent.core.types import ALERT, TQ_SYNCED, TQ_UNSYNCED, Event
from agent.protocol.commands import (
    COMMANDS,
    MAX_COMMAND_BYTES,
    Command,
    CommandAck,
    CommandError,
    duration,
    encode_ack,
    verify_command,
)
from agent.security.audit import AuditTrail
from agent.security.config import CommandsConfig
from agent.security.keys import PRIVATE_NAME, generate_keypair, load_private_key

__all__ = ["CommandHooks", "CommandProcessor", "SeqStore", "make_rotate_hook"]

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

# Read-only commands: still signed, in sequence and for this gateway, but accepted while the
# wall clock is unsynchronised (a Pi has no RTC; expiry cannot be judged until NTP is back).
READ_ONLY = frozenset({"ping", "status"})
_LOG_LEVELS = ("debug", "info", "warning", "error")


# --- the sequence, persisted ------------------------------------------------------------------


class SeqStore:
    """The highest accepted command seq and the hashes of the last accepted commands (to tell a
    replay from an out-of-order command), in one small JSON file written atomically."""

    RECENT = 32

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_seq = 0
        self.recent: list[str] = []
        try:
            doc = json.loads(path.read_text())
            self.last_seq = int(doc["last_seq"])
            self.recent = [str(h) for h in doc["recent"]][-self.RECENT:]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never fall back to 0 (that would re-open every old command): refuse to start.
            raise CommandError("failed", f"{path} is unreadable ({type(exc).__name__}); "
                               "restore it or re-provision the platform command key") from None

    def accept(self, seq: int, h: bytes) -> None:
        recent = [*self.recent, h.hex()][-self.RECENT:]
        # The directory is fsynced too (agent.core.atomic): without it a power cut could bring
        # back the previous last_seq and let a replayed command through.
        write_atomic(self.path, json.dumps({"last_seq": seq, "recent": recent}).encode(), 0o600)
        self.last_seq, self.recent = seq, recent


# --- dispatch ---------------------------------------------------------------------------------


@dataclass
class CommandHooks:
    """What the runtime lends the commands. A hook left None makes its command `unavailable`."""

    status: Callable[[], Mapping[str, Any]] | None = None
    doctor: Callable[[], Awaitable[Mapping[str, Any]]] | None = None
    set_log_level: Callable[[str], None] | None = None
    default_log_level: str = "info"
    # Generate the next signing key, announce it (event `gateway.key_rotated`, signed by the
    # current key) and switch after the announcement is acked; returns {"kid": hex, ...}.
    rotate_key: Callable[[], Awaitable[Mapping[str, Any]]] | None = None
    pulse: Callable[[str, float], Awaitable[None]] | None = None
    # Manual arm (True) / disarm (False) of the branch (agent.rules.arming): overrides the
    # schedule until its next change; returns {"state", "cause", "changed"}.
    arm: Callable[[bool], Awaitable[Mapping[str, Any]]] | None = None


Reply = Callable[[bytes], Awaitable[None]]


def make_rotate_hook(
    key_file: Path,
    emit: Callable[[Event], Awaitable[int]],
    clock: Clock,
    on_announced: Callable[[Ed25519PrivateKey, int], None],
) -> Callable[[], Awaitable[Mapping[str, Any]]]:
    """The `rotate-key` hook: write the next key beside the current one (`next/signing.key`,
    0600), announce its public key in a `gateway.key_rotated` event (priority ALERT) that the
    *current* key signs, then `on_announced(new_key, event_id)`: the forwarder switches to the
    new key once the batch holding `event_id` is acked (and moves `next/` over the old files)."""

    async def rotate() -> Mapping[str, Any]:
        next_dir = key_file.parent / "next"
        info = await asyncio.to_thread(generate_keypair, next_dir, True)
        new_key = await asyncio.to_thread(load_private_key, next_dir / PRIVATE_NAME)
        raw = new_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        event = Event(src="agent.keys", type="gateway.key_rotated", v=info.kid.hex(),
                      t=clock.time(), tq=TQ_SYNCED if clock.synchronized() else TQ_UNSYNCED,
                      prio=ALERT, attrs={"kid": info.kid.hex(), "alg": "EdDSA",
                                         "pub": raw.hex(), "fingerprint": info.fingerprint})
        event_id = await emit(event)
        on_announced(new_key, event_id)
        return {"kid": info.kid.hex(), "fingerprint": info.fingerprint, "event": event_id}

    return rotate


@dataclass
class CommandStats:
    received: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # queue full

    def as_dict(self) -> dict[str, Any]:
        return {"received": self.received, "accepted": self.accepted,
                "rejected": dict(self.rejected), "dropped": self.dropped}


class CommandProcessor:
    """Takes raw command bytes from an uplink (`submit`, non-blocking, safe from a callback),
    runs them one at a time in `run()`, and answers through the `reply` given with each."""

    def __init__(self, cfg: CommandsConfig, *, gw: str, platform_key: Ed25519PublicKey,
                 gateway_key: Ed25519PrivateKey, state_dir: Path, clock: Clock,
                 hooks: CommandHooks, audit: AuditTrail | None = None) -> None:
        self.cfg = cfg
        self.gw = gw
        self.platform_key = platform_key
        self.gateway_key = gateway_key
        self.clock = clock
        self.hooks = hooks
        self.audit = audit
        self.seqs = SeqStore(StateLayout(state_dir).command_seq)
        self.stats = CommandStats()
        self._queue: asyncio.Queue[tuple[bytes, Reply]] = asyncio.Queue(cfg.queue)
        self._log = log.bind(gw=gw)
        self._revert: asyncio.TimerHandle | None = None

    def submit(self, raw: bytes, reply: Reply) -> None:
        """Queue a command; when the queue is full it is dropped (counted), not waited for."""
        self.stats.received += 1
        try:
            self._queue.put_nowait((bytes(raw[:MAX_COMMAND_BYTES + 1]), reply))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            self._log.warning("command.dropped", reason="busy", dropped=self.stats.dropped)

    async def run(self) -> None:
        """Process queued commands until cancelled."""
        try:
            while True:
                raw, reply = await self._queue.get()
                ack = await self.handle(raw)
                try:
                    await reply(encode_ack(self.gateway_key, ack))
                except (ConnectionError, OSError) as exc:  # the platform may resend; seq guards
                    self._log.warning("command.ack_not_sent", seq=ack.seq, error=str(exc))
        finally:
            if self._revert is not None:
                self._revert.cancel()

    async def handle(self, raw: bytes) -> CommandAck:
        """Verify and run one command; never raises for bad input (the ack says what happened)."""
        h = hashlib.sha256(raw).digest()
        try:
            cmd = self._check(raw)
        except CommandError as exc:
            return await self._refuse(exc, h)
        self.seqs.accept(cmd.seq, cmd.hash)  # before running: at most once, even across a crash
        try:
            result = await self._run(cmd)
        except CommandError as exc:
            return await self._refuse(CommandError(exc.reason, exc.detail, cmd.seq), h, cmd)
        except Exception as exc:  # a hook's failure is the command's failure, not the agent's
            self._log.exception("command.failed", seq=cmd.seq, cmd=cmd.cmd)
            return await self._refuse(CommandError("failed", type(exc).__name__, cmd.seq), h,
                                      cmd)
        self.stats.accepted += 1
        self._log.info("command.accepted", seq=cmd.seq, cmd=cmd.cmd)
        await self._audit("audit.command_accepted", {"seq": cmd.seq, "cmd": cmd.cmd,
                                                     "h": cmd.hash.hex()})
        return CommandAck(self.gw, cmd.seq, cmd.hash, True, self.clock.time(), result=result)

    async def _refuse(self, exc: CommandError, h: bytes,
                      cmd: Command | None = None) -> CommandAck:
        self.stats.rejected[exc.reason] = self.stats.rejected.get(exc.reason, 0) + 1
        self._log.warning("command.rejected", reason=exc.reason, detail=exc.detail[:200],
                          seq=exc.seq or None, h=h.hex())
        attrs: dict[str, Any] = {"reason": exc.reason, "h": h.hex(), "seq": exc.seq}
        if cmd is not None:
            attrs["cmd"] = cmd.cmd
        await self._audit("audit.command_rejected", attrs)
        return CommandAck(self.gw, exc.seq, h, False, self.clock.time(), err=exc.reason)

    async def _audit(self, type: str, attrs: dict[str, Any]) -> None:
        if self.audit is not None:
            await self.audit.record(type, attrs, actor="platform")

    def _check(self, raw: bytes) -> Command:
        cmd = verify_command(raw, self.platform_key)
        if cmd.gw != self.gw:
            raise CommandError("wrong-gateway", cmd.gw[:64], cmd.seq)
        if cmd.seq <= self.seqs.last_seq:
            replay = cmd.hash.hex() in self.seqs.recent
            raise CommandError("replay" if replay else "out-of-order",
                               f"seq {cmd.seq} <= {self.seqs.last_seq}", cmd.seq)
        if cmd.exp - cmd.iat > self.cfg.max_validity_s:
            raise CommandError("too-long-valid", f"{cmd.exp - cmd.iat:.0f} s", cmd.seq)
        if self.clock.synchronized():
            now, skew = self.clock.time(), self.cfg.max_skew_s
            if now > cmd.exp + skew:
                raise CommandError("expired", f"{now - cmd.exp:.0f} s ago", cmd.seq)
            if cmd.iat > now + skew:
                raise CommandError("not-yet-valid", f"in {cmd.iat - now:.0f} s", cmd.seq)
        elif cmd.cmd not in READ_ONLY:
            raise CommandError("clock-unsynced", cmd.cmd, cmd.seq)
        if cmd.cmd not in COMMANDS:
            raise CommandError("unknown-command", cmd.cmd[:64], cmd.seq)
        return cmd

    async def _run(self, cmd: Command) -> dict[str, Any]:
        h, args = self.hooks, cmd.args
        if cmd.cmd == "ping":
            return {"pong": True}
        if cmd.cmd == "status":
            return dict(_need(h.status)())
        if cmd.cmd == "doctor":
            return dict(await _need(h.doctor)())
        if cmd.cmd == "log-level":
            return self._log_level(args)
        if cmd.cmd == "rotate-key":
            return dict(await _need(h.rotate_key)())
        if cmd.cmd in ("arm", "disarm"):
            if args:
                raise CommandError("bad-args", "arm/disarm take no arguments")
            return dict(await _need(h.arm)(cmd.cmd == "arm"))
        return await self._pulse(args)

    def _log_level(self, args: Mapping[str, Any]) -> dict[str, Any]:
        level, seconds = args.get("level"), duration(args.get("seconds"))
        if not isinstance(level, str) or level not in _LOG_LEVELS or seconds is None or (
                seconds > self.cfg.max_log_level_s):
            raise CommandError("bad-args", "level/seconds")
        apply = _need(self.hooks.set_log_level)
        if self._revert is not None:
            self._revert.cancel()
        apply(level)
        default = self.hooks.default_log_level
        self._revert = asyncio.get_running_loop().call_later(seconds, apply, default)
        return {"level": level, "until": self.clock.time() + seconds, "then": default}

    async def _pulse(self, args: Mapping[str, Any]) -> dict[str, Any]:
        name, seconds = args.get("output"), duration(args.get("seconds"))
        if not isinstance(name, str) or seconds is None:
            raise CommandError("bad-args", "output/seconds")
        longest = self.cfg.allow_outputs.get(name)
        if longest is None:
            raise CommandError("not-allowed", name[:64])
        if seconds > longest:
            raise CommandError("not-allowed", f"{name} longer than {longest} s")
        await _need(self.hooks.pulse)(name, seconds)
        return {"output": name, "seconds": seconds}


def _need(hook: _T | None) -> _T:
    if hook is None:
        raise CommandError("unavailable", "not wired in this build")
    return hook

