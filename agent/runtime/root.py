"""The composition root: the one place that assembles drivers, pipeline, outbox, forwarder and
uplinks from the configuration, and runs them under one TaskGroup until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.config import AgentConfig
from agent.core.atomic import write_atomic
from agent.core.backoff import Backoff
from agent.core.clock import Clock, make_clock
from agent.core.errors import RefusedError
from agent.core.paths import RuntimeLayout, StateLayout
from agent.core.types import Event, Reading
from agent.outbox import Outbox
from agent.rules.arming import ArmChange, Arming, Cause
from agent.rules.config import stateful_rules
from agent.rules.stateful import StatefulRules
from agent.runtime.forwarder import Forwarder, Signer
from agent.runtime.pipeline import Pipeline
from agent.runtime.sdnotify import Notifier, watchdog_interval
from agent.runtime.sink import PipelineSink
from agent.security.audit import AuditForwarder, AuditLog, AuditTrail
from agent.security.commands import CommandProcessor
from agent.security.pseudonym import load_pseudonym_key
from agent.uplink.base import CommandChannel, Uplink, UplinkFailure
from drivers import synthetic
from drivers.base import Source, SourceContext, SourceState

if TYPE_CHECKING:
    from drivers.gpio.config import StatusState
    from drivers.gpio.source import GpioStatusOutput

__all__ = ["Runtime", "build_sources", "build_uplinks"]

log = structlog.get_logger(__name__)


AUDIT_FORWARD_EVERY_S = 5  # how often the local audit log is looked at for operator records
# The arm state is re-evaluated at least this often, besides at the schedule's next change:
# the wall clock may be stepped (NTP after boot) or become synchronised meanwhile.
ARMING_RECHECK_S = 30.0
ARMING_SOURCE = "arming"  # the source of the arm.state events


def build_sources(cfg: AgentConfig, ctx: SourceContext) -> list[Source]:
    """Every configured source, each from its own driver's factory. A driver module (and its
    libraries: gpiozero, pyserial, bleak, aiocoap, pysnmp, pymodbus) is imported only when it is
    configured."""
    sources: list[Source] = []
    sources.extend(synthetic.build_sources(cfg.sources.synthetic, ctx))
    if cfg.sources.gpio is not None:
        from drivers.gpio import source as gpio

        sources.extend(gpio.build_sources(cfg.sources.gpio, ctx))
    if any((cfg.sources.serial.ups, cfg.sources.serial.modbus, cfg.sources.serial.line)):
        from drivers import serial

        sources.extend(serial.build_sources(cfg.sources.serial, ctx))
    if cfg.sources.coap is not None:
        from drivers.coap import server as coap

        sources.extend(coap.build_sources(cfg.sources.coap, ctx))
    if cfg.sources.ble is not None:
        from drivers import ble

        sources.extend(ble.build_sources(cfg.sources.ble, ctx))
    if cfg.sources.nut:
        from drivers import nut

        sources.extend(nut.build_sources(cfg.sources.nut, ctx))
    if cfg.sources.snmp:
        from drivers import snmp

        sources.extend(snmp.build_sources(cfg.sources.snmp, ctx))
    if cfg.sources.modbus_tcp:
        from drivers.modbus_tcp import source as modbus_tcp

        sources.extend(modbus_tcp.build_sources(cfg.sources.modbus_tcp, ctx))
    return sources


def build_uplinks(cfg: AgentConfig) -> list[Uplink]:
    """The uplinks in preference order."""
    uplinks: list[Uplink] = []
    for name in cfg.uplink.order:
        if name == "mqtt":
            from agent.uplink.mqtt import MqttUplink

            assert cfg.uplink.mqtt is not None  # the config's validator guarantees it
            uplinks.append(MqttUplink(cfg.uplink.mqtt, cfg.gateway.id))
        elif name == "coap":
            from agent.uplink.coap import CoapUplink

            assert cfg.uplink.coap is not None  # the config's validator guarantees it
            uplinks.append(CoapUplink(cfg.uplink.coap, cfg.gateway.id))
    return uplinks


def _write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    """Advisory files rewritten every few seconds: atomic (never torn), not fsynced."""
    write_atomic(path, json.dumps(doc, default=str, sort_keys=True).encode(), 0o644,
                 durable=False)


# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms). An
# alarm crosses threads several times on its way out (the GPIO callback's thread, the event loop,
# the outbox's database thread, paho's); while the loop and the database thread drain a backlog
# each crossing waited up to the default, which made the larger part of an alarm's p99
# (bench/README.md, alarm latency under load).
SWITCH_INTERVAL_S = 0.001

class Runtime:
    """`await Runtime(cfg).run(stop)`; `stop` is an asyncio.Event set by a signal handler."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        ctx_extra: Mapping[str, Any] | None = None,
        pin_factory: Any = None,
        notifier: Notifier | None = None,
        uplinks: Sequence[Uplink] | None = None,
        config_path: Path | None = None,
        doctor: Callable[[], Awaitable[Mapping[str, Any]]] | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`doctor` answers the platform's `doctor` command: the operator's checks, lent by
        the command line that started the runtime (the runtime does not import it). `clock`
        is every part's wall and monotonic time and time quality (default: the system's,
        synchronised as `[gateway] time_sync` says); tests pass one that steps."""
        self.cfg = cfg
        self.config_path = config_path
        self.doctor = doctor
        self.clock: Clock = clock if clock is not None else make_clock(cfg.gateway.time_sync)
        self.ctx = SourceContext(clock=self.clock, pin_factory=pin_factory,
                                 extra=dict(ctx_extra or {}))
        self.notifier = notifier or Notifier()
        self._uplinks_override = uplinks
        self.outbox: Outbox | None = None
        self.forwarder: Forwarder | None = None
        self.sink: PipelineSink | None = None
        self.sources: list[Source] = []
        self.uplinks: list[Uplink] = []
        self.started = time.time()
        self.ready = asyncio.Event()
        self.status_output: GpioStatusOutput | None = None
        self.audit: AuditTrail | None = None
        self.commands: CommandProcessor | None = None
        self.pulse_outputs: Any = None
        self._key: Ed25519PrivateKey | None = None
        self._seen_uplink_errors: dict[str, UplinkFailure | None] = {}
        self._clock_ref: tuple[float, float] | None = None
        self._audit_forward_lock = asyncio.Lock()
        self._audit_forwarder: AuditForwarder | None = None
        self._audit_log_seen: tuple[int, int] | None = None  # (size, mtime_ns) last forwarded
        self.arming: Arming | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._arming_wake = asyncio.Event()

    # ----------------------------------------------------------------- assembly

    async def _assemble(self) -> None:
        from agent.security.keys import load_private_key

        cfg = self.cfg
        cfg.gateway.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = load_private_key(cfg.gateway.key_file)
        ob = cfg.outbox
        self.outbox = await Outbox.open(
            cfg.outbox_path,
            quota_bytes=ob.quota_bytes,
            commit_interval=ob.commit_interval_ms / 1000.0,
            commit_max=ob.commit_max_events,
            telemetry_window=ob.telemetry_window_ms / 1000.0,
            clock_synchronized=self.clock.synchronized,
            low_watermark=ob.low_watermark,
            clock_time=self.clock.time,
            reserve_bytes=ob.reserve_bytes,
        )
        pkey = load_pseudonym_key(cfg.gateway.state_dir) if cfg.privacy.pseudonymise_attrs else None
        pipeline = Pipeline(
            [r.to_rule() for r in cfg.rules],
            wall=self.clock.time,
            synchronized=self.clock.synchronized,
            pseudonym_key=pkey,
            pseudonymise_attrs=cfg.privacy.pseudonymise_attrs,
            strip_attrs=cfg.privacy.strip_attrs,
            stateful=StatefulRules(stateful_rules(cfg.held_open, cfg.silence, cfg.sequence,
                                                  start=self.clock.monotonic())),
        )
        if cfg.arming is not None:
            self.arming = Arming(cfg.arming.schedule(), max_disarm_s=cfg.arming.max_disarm_s)
        self._key = key
        self.audit = AuditTrail(
            AuditLog.from_config(cfg.audit, cfg.gateway.state_dir, self.clock.time),
            self.outbox.append,
            self.clock,
        )
        self.sink = PipelineSink(pipeline, self.outbox, self.clock.monotonic,
                                 on_committed=self._observe)
        self.sources = build_sources(cfg, self.ctx)
        if cfg.sources.gpio is not None:
            from drivers.gpio.source import build_status_output

            self.status_output = build_status_output(cfg.sources.gpio, self.ctx)
        self.uplinks = (
            list(self._uplinks_override)
            if self._uplinks_override is not None
            else build_uplinks(cfg)
        )
        fw = cfg.forwarder
        self.forwarder = Forwarder(
            self.outbox,
            self.uplinks,
            Signer(key, cfg.gateway.id, self.clock.time, compress=fw.compression == "zstd"),
            batch_max_events=fw.batch_max_events,
            batch_max_bytes=fw.batch_max_bytes,
            ack_mode=fw.ack_mode,
            ack_timeout_s=fw.ack_timeout_s,
            window=fw.window,
            batch_linger_s=fw.batch_linger_ms / 1000.0,
            drain_rate_bytes_per_s=fw.drain_rate_bytes_per_s,
            failover_after_s=cfg.uplink.failover_after_s,
            status_interval_s=fw.status_interval_s,
            status_doc=self.status_doc_sync,
            on_refused=self._batch_refused,
            synchronized=self.clock.synchronized,
            alarm_lane=fw.alarm_lane,
        )
        if cfg.commands is not None:
            self.commands = self._command_processor(cfg.commands, key)

    # ----------------------------------------------------------------- running

    async def run(self, stop: asyncio.Event) -> None:
        previous = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            await self._run(stop)
        finally:
            sys.setswitchinterval(previous)

    async def _run(self, stop: asyncio.Event) -> None:
        await self._assemble()
        assert self.outbox is not None and self.forwarder is not None and self.sink is not None
        log.info(
            "agent.started",
            gateway=self.cfg.gateway.id,
            version=__version__,
            sources=[s.name for s in self.sources],
            uplinks=[u.name for u in self.uplinks],
            kid=self.forwarder.signer.kid.hex(),
        )
        if self.arming is not None:
            # Decided before any source starts: the first readings get the armed-state
            # priority, and the outbox holds the state the branch started in.
            await self._arming_tick()
        metrics_server: Any = None
        if self.cfg.metrics.enabled:
            from agent.runtime.metrics import serve

            metrics_server = serve(self.status_doc_sync, self.cfg.metrics.port,
                                   self.cfg.metrics.bind)
            log.info("metrics.listening", bind=self.cfg.metrics.bind, port=self.cfg.metrics.port)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._supervise(src), name=f"source-{src.name}")
                    for src in self.sources
                ]
                tasks.append(tg.create_task(self.forwarder.run(), name="forwarder"))
                tasks.append(tg.create_task(self._debounce_loop(), name="pipeline-due"))
                if self.arming is not None:
                    tasks.append(tg.create_task(self._arming_loop(), name="arming"))
                tasks.append(tg.create_task(self._status_loop(), name="status"))
                tasks.append(tg.create_task(self._watchdog_loop(), name="watchdog"))
                if self.commands is not None:
                    tasks.append(tg.create_task(self.commands.run(), name="commands"))
                tasks.append(tg.create_task(self._audit_loop(), name="audit"))
                await self._audit_start()
                await self._sources_started(timeout=10.0)
                self.notifier.ready(self.summary())
                self.ready.set()
                log.info("agent.ready")
                await stop.wait()
                log.info("agent.stopping")
                self.notifier.stopping()
                for t in tasks:
                    t.cancel()
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            if self.status_output is not None:
                self.status_output.close()
            if self.pulse_outputs is not None:
                self.pulse_outputs.close()
            await self.outbox.close()
            with contextlib.suppress(OSError):
                self._write_status()
            log.info("agent.stopped", accepted=self.sink.accepted)

    async def _sources_started(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a deadline API
        """READY means the sources are listening: wait (bounded) until each left STARTING."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(s.health.state == SourceState.STARTING for s in self.sources):
            if loop.time() >= deadline:
                slow = [s.name for s in self.sources if s.health.state == SourceState.STARTING]
                log.warning("agent.sources_slow_to_start", sources=slow)
                return
            await asyncio.sleep(0.01)

    async def _supervise(self, src: Source) -> None:
        """A driver bug must not stop the agent: log it, count it, restart with backoff."""
        assert self.sink is not None
        backoff = Backoff(base=1.0, cap=60.0)
        while True:
            started = time.monotonic()
            try:
                await src.run(self.sink)
                return  # a finite source (e.g. synthetic with a count) ended on its own
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                src.health.state = SourceState.OFFLINE
                src.health.count("crashed")
                log.exception("source.crashed", source=src.name, error=str(exc))
            if time.monotonic() - started > 60:
                backoff.reset()
            await backoff.wait()

    async def _debounce_loop(self) -> None:
        assert self.sink is not None
        pipeline = self.sink.pipeline
        if not pipeline.has_deadlines:
            return  # nothing is ever held back: no need to wake 20 times a second (idle CPU)
        # Debounce windows are tens of milliseconds; the stateful rules' waits are seconds to
        # minutes, where half a second late does not matter and waking less often does.
        step = 0.05 if any(r.debounce_s > 0 for r in pipeline.rules) else 0.5
        while True:
            deadline = pipeline.next_deadline()
            delay = step if deadline is None else max(0.0, deadline - self.clock.monotonic())
            await asyncio.sleep(min(delay, step))
            await self.sink.flush_due()

    # ----------------------------------------------------------------- arming

    async def _arming_loop(self) -> None:
        """The arm state at the schedule's next change, at an override's end, after a manual
        act, and every ARMING_RECHECK_S (clock steps, clock sync)."""
        assert self.arming is not None
        while True:
            wait = self.arming.next_tick(self.clock.time(), self.clock.monotonic())
            self._arming_wake.clear()
            # just past the change: the schedule counts its boundary as the new state
            # (asyncio.timeout, not wait_for: on 3.11 wait_for may swallow the stop when the
            # wake-up and the cancellation come together, and this loop would never end)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait + 0.001, ARMING_RECHECK_S)):
                    await self._arming_wake.wait()
            await self._arming_tick()

    async def _arming_tick(self) -> None:
        assert self.arming is not None
        await self._arm_changed(self.arming.tick(self.clock.time(), self.clock.monotonic(),
                                                 self.clock.synchronized()))

    async def arm_manual(self, armed: bool, cause: Cause, **detail: Any) -> dict[str, Any]:
        """A keyswitch turn or a signed command; returns the state it leaves."""
        if self.arming is None:
            raise RuntimeError("no [arming] table in the configuration")
        changes = self.arming.manual(armed, cause, self.clock.time(), self.clock.monotonic(),
                                     self.clock.synchronized())
        changes = [ArmChange(c.armed, c.cause, c.t, c.initial, {**c.detail, **detail})
                   for c in changes]
        self._arming_wake.set()  # the override's end is a new deadline
        await self._arm_changed(changes)
        return {"state": "armed" if self.arming.armed else "disarmed",
                "cause": self.arming.cause, "changed": bool(changes)}

    async def _arm_changed(self, changes: Sequence[ArmChange]) -> None:
        """Each change: the pipeline's priorities first, then the arm.state event."""
        assert self.sink is not None and self.cfg.arming is not None
        for c in changes:
            self.sink.pipeline.set_armed(c.armed)
            attrs: dict[str, Any] = {"cause": c.cause, **c.detail}
            if c.initial:
                attrs["initial"] = True
            log.info("arming.changed", state=c.value, **attrs)
            try:
                await self.sink.submit(Reading(source=ARMING_SOURCE, type="arm.state",
                                               value=c.value, ts=c.t,
                                               priority=self.cfg.arming.priority, attrs=attrs))
            except RefusedError as exc:  # a full disk: the state still applies
                log.warning("arming.event_refused", error=str(exc))

    async def _watchdog_loop(self) -> None:
        """WATCHDOG=1 from the event loop itself: a blocked loop stops the pings and systemd
        restarts the service."""
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            self.outbox_stats = await self.outbox.stats() if self.outbox else None
            try:
                self._write_status()
            except OSError as exc:
                # status.json is advisory: a full or read-only disk must not stop the agent
                # (the outbox decides what is accepted; see tests/faults/test_disk.py).
                log.warning("status.write_failed", error=str(exc))
            self.notifier.status(self.summary())
            if self.status_output is not None:
                self.status_output.set_state(self.led_state())

    def led_state(self) -> StatusState:
        """online: an uplink is up; buffering: none is (events kept locally); fault: a source
        is offline or the platform rejects our batches."""
        fw = self.forwarder.stats if self.forwarder else None
        if any(s.health.state == SourceState.OFFLINE for s in self.sources) or (
            fw is not None and any(k not in ("gap", "replay") for k in fw.rejections)
        ):
            return "fault"
        if any(u.connected for u in self.uplinks):
            return "online"
        return "buffering"

    # ----------------------------------------------------------------- audit and commands

    def _observe(self, events: Sequence[Event]) -> None:
        """Committed events the runtime acts on: keyswitch turns (manual arm/disarm; not the
        switch's position at start, which is no act: a reboot at night must not disarm) and
        tamper contacts (the audit trail)."""
        if self.arming is not None:
            for e in events:
                if e.type == "keyswitch" and not (e.attrs or {}).get("initial") and (
                        e.v in ("arm", "disarm")):
                    self._spawn(self.arm_manual(e.v == "arm", "keyswitch", source=e.src),
                                "arm-keyswitch")
        if self.audit is None:
            return
        for e in events:
            if e.type == "tamper":
                self._spawn(self.audit.record("audit.tamper_contact",
                                              {"source": e.src, "state": str(e.v)},
                                              actor="sensor"), "audit-tamper")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run `coro` in the background, keeping the task referenced until it ends (the event
        loop keeps only weak references: an unreferenced task may vanish mid-way)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _batch_refused(self, info: dict[str, Any]) -> None:
        """The forwarder took a platform refusal as final (docs/PROTOCOL.md 4.3): one record
        per episode, apart from the audit log's own `audit.integrity_failure`."""
        if self.audit is not None:
            await self.audit.record("audit.batch_refused", dict(info), actor="agent")

    async def _audit_start(self) -> None:
        assert self.audit is not None and self.outbox is not None
        from agent.security.audit import config_digest

        await self.audit.record(
            "audit.config_loaded",
            {"sha256": config_digest(self.cfg),
             "path": str(self.config_path) if self.config_path else None},
            actor="agent",
        )
        if self.outbox.reset_info is not None:
            # Two facts: the store failed its integrity check (what it found), and a fresh
            # store replaced it (where the old one went).
            reset = dict(self.outbox.reset_info)
            await self.audit.record("audit.integrity_failure",
                                    {"reason": "outbox", "problems": [reset["reason"]],
                                     "quarantined": reset["quarantined"]}, actor="agent")
            await self.audit.record("audit.store_reset", reset, actor="agent")
        # Operator commands (provision, keygen, renew, doctor, wipe) run without the agent and
        # only write the local log: their records join the outbox here, each once, and while
        # the agent runs (_audit_loop looks for a changed log). The cursor sits with the
        # outbox it describes.
        self._audit_forwarder = AuditForwarder(
            self.audit, StateLayout(self.cfg.gateway.state_dir).audit_forwarded,
            self.outbox.append_many)
        await self._forward_operator_audit()

    def _audit_log_stat(self) -> tuple[int, int] | None:
        local = self.audit.local if self.audit is not None else None
        try:
            st = os.stat(local.path) if local is not None else None
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns) if st is not None else None

    async def _forward_operator_audit(self) -> None:
        if self._audit_forwarder is None:
            return
        async with self._audit_forward_lock:
            seen = self._audit_log_stat()  # before reading: a record added meanwhile is news
            await self._audit_forwarder.run()
            self._audit_log_seen = seen

    async def _audit_loop(self) -> None:
        """What is seen by polling: TLS/connection failures of the uplinks, wall-clock jumps
        against the monotonic clock, and operator records added to the local audit log while
        the agent runs. (The platform's final refusals come from the forwarder itself.)"""
        assert self.audit is not None
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks % AUDIT_FORWARD_EVERY_S == 0 and self._audit_forwarder is not None and (
                self._audit_log_stat() != self._audit_log_seen
            ):
                # an operator command (doctor, renew ...) ran beside the running agent
                await self._forward_operator_audit()
            for up in self.uplinks:
                err = up.last_error
                if err != self._seen_uplink_errors.get(up.name):
                    self._seen_uplink_errors[up.name] = err
                    if err is not None and err.kind == "tls":
                        await self.audit.record("audit.tls_failure",
                                                {"uplink": up.name, "error": err.message},
                                                actor="agent")
            wall, mono = self.clock.time(), self.clock.monotonic()
            if self._clock_ref is not None:
                jump = (wall - self._clock_ref[0]) - (mono - self._clock_ref[1])
                if abs(jump) > 2.0:
                    await self.audit.record("audit.clock_jump", {"seconds": round(jump, 3)},
                                            actor="agent")
            self._clock_ref = (wall, mono)

    def _command_processor(self, cc: Any, key: Ed25519PrivateKey) -> CommandProcessor:
        from agent.core.log import configure_logging
        from agent.security.commands import CommandHooks, CommandProcessor, make_rotate_hook
        from agent.security.keys import install_next_key, load_public_key

        assert self.outbox is not None and self.forwarder is not None
        cfg = self.cfg
        forwarder, audit = self.forwarder, self.audit
        key_file = cfg.gateway.key_file

        def announced(new_key: Ed25519PrivateKey, event_id: int) -> None:
            async def install() -> None:
                install_next_key(key_file)
                if audit is not None:
                    await audit.record("audit.key_rotated",
                                       {"kid": forwarder.signer.kid.hex()}, actor="platform")

            forwarder.rotate_after(new_key, event_id, install)

        async def doctor() -> Mapping[str, Any]:
            if self.doctor is None:
                return {"error": "doctor is not available in this process"}
            return dict(await self.doctor())

        pulse = None
        if cfg.sources.gpio is not None and cfg.sources.gpio.outputs.pulse:
            from drivers.gpio.source import GpioPulseOutputs

            self.pulse_outputs = GpioPulseOutputs(cfg.sources.gpio, self.ctx)
            pulse = self.pulse_outputs.pulse
        hooks = CommandHooks(
            pulse=pulse,
            status=self.status_doc_sync,
            doctor=doctor,
            set_log_level=lambda level: configure_logging(level, cfg.log.format),
            default_log_level=cfg.log.level,
            arm=self._arm_command if self.arming is not None else None,
            rotate_key=make_rotate_hook(key_file, self.outbox.append, self.clock, announced),
        )
        proc = CommandProcessor(cc, gw=cfg.gateway.id,
                                platform_key=load_public_key(cc.platform_key), gateway_key=key,
                                state_dir=cfg.gateway.state_dir, clock=self.clock, hooks=hooks,
                                audit=self.audit)
        for up in self.uplinks:
            if isinstance(up, CommandChannel):
                up.set_command_handler(functools.partial(_submit_to, proc, up))
        return proc

    async def _arm_command(self, armed: bool) -> Mapping[str, Any]:
        return await self.arm_manual(armed, "command")

    # ----------------------------------------------------------------- status

    outbox_stats: Any = None  # the latest OutboxStats, refreshed every 2 s

    def summary(self) -> str:
        st = self.outbox_stats
        fw = self.forwarder.stats if self.forwarder else None
        depth = sum(st.depth.values()) if st else 0
        via = fw.active_uplink if fw and fw.active_uplink else "none"
        acked = fw.last_acked_seq if fw else 0
        return f"outbox {depth} events; uplink {via}; last acked batch {acked}"

    def status_doc_sync(self) -> dict[str, Any]:
        st = self.outbox_stats
        now = time.time()
        doc: dict[str, Any] = {
            "state": "online",
            "gateway": self.cfg.gateway.id,
            "version": __version__,
            "pid": os.getpid(),
            "updated": now,
            "started": self.started,
            "clock_synchronized": self.clock.synchronized(),
            "sources": [s.health.as_dict() for s in self.sources],
            "uplinks": [{"name": u.name, "connected": u.connected, **u.counters}
                        for u in self.uplinks],
        }
        if st is not None:
            doc["outbox"] = st.as_dict()
            doc["oldest_unsent_age_s"] = (now - st.oldest_unsent) if st.oldest_unsent else None
        if self.forwarder is not None:
            doc["forwarder"] = self.forwarder.stats.as_dict()
        if self.sink is not None:
            doc["pipeline"] = dict(self.sink.pipeline.counters)
            doc["accepted"] = self.sink.accepted
        if self.arming is not None and self.arming.armed is not None:
            doc["arming"] = {"state": "armed" if self.arming.armed else "disarmed",
                             "cause": self.arming.cause}
        return doc

    def _write_status(self) -> None:
        path = RuntimeLayout(self.cfg.gateway.runtime_dir).status
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        _write_json_atomic(path, self.status_doc_sync())


def _submit_to(proc: CommandProcessor, channel: CommandChannel, raw: bytes) -> None:
    """A command that arrived on `channel`; its ack goes back the same way."""
    proc.submit(raw, channel.publish_command_ack)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hang = os.environ.get("BRANCH_AGENT_DEBUG_HANG")
    if hang:
        # Test hook for the watchdog: SIGUSR2 blocks the event loop (not the process) for
        # `hang` seconds, as a stuck driver call would. Only with the variable set.
        def block() -> None:
            log.warning("agent.debug_hang", seconds=float(hang))
            time.sleep(float(hang))

        loop.add_signal_handler(signal.SIGUSR2, block)
