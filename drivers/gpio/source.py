"""GPIO contacts (doors, vault, motion, panic buttons, tamper loops) and the status LED/buzzer.

Pins come from a gpiozero pin factory: the runtime's (``SourceContext.pin_factory``, the
simulator's ``MockFactory``) or one named in config (``lgpio`` on a Pi). gpiozero calls back on
its backend's thread; `LoopAdapter` is the one place that crosses into the event loop. Debounce
runs in the loop on the edge timestamps taken on the backend thread, because the mock backend
ignores ``bounce_time`` and lgpio's debounce differs between kernels.

Semantics: an input is *asserted* when the watched condition holds (door open, vault open,
motion seen, panic pressed, tamper loop broken). ``pull_up``/``active_high`` say which electrical
level that is (docs/HARDWARE.md has the wiring).

Readings (source ``gpio.<name>``):

========= =========== ========================= ==========
kind      type        value (asserted/not)      priority
========= =========== ========================= ==========
door      contact     "open" / "closed"         ALERT
vault     contact     "open" / "closed"         ALARM
generic   contact     "open" / "closed"         TELEMETRY
motion    motion      True / False              ALERT
panic     panic       "pressed" / "released"    ALARM
tamper    tamper      "tampered" / "normal"     ALARM
keyswitch keyswitch   "disarm" / "arm"          ALERT
========= =========== ========================= ==========

(``keyswitch``: the arming keyswitch; the runtime takes each change as a manual disarm/arm.)

The initial state is reported at start (``attrs={"initial": True}``), then each debounced
change, and every ``snapshot_interval_s`` a ``contact.snapshot`` (source ``gpio``, TELEMETRY,
value ``{name: value}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

import structlog
from gpiozero import LED, Buzzer, DigitalInputDevice
from gpiozero.exc import GPIOZeroError

from agent.core.backoff import Backoff
from agent.core.errors import RefusedError
from agent.core.types import ALERT, TELEMETRY, Reading, Value
from drivers.base import Sink, Source, SourceContext, SourceHealth, SourceState
from drivers.gpio.config import (
    KINDS,
    GpioConfig,
    GpioInputConfig,
    GpioOutputConfig,
    InputKind,
    KindSpec,
    PinFactoryName,
    StatusState,
    normalise_pin,
)

__all__ = [
    "KINDS",
    "GpioConfig",
    "GpioInputConfig",
    "GpioOutputConfig",
    "GpioSource",
    "GpioStatusOutput",
    "InputKind",
    "KindSpec",
    "LoopAdapter",
    "StatusState",
    "build_sources",
    "build_status_output",
    "normalise_pin",
    "resolve_pin_factory",
]


def resolve_pin_factory(name: PinFactoryName, ctx_factory: Any = None) -> tuple[Any, bool]:
    """The factory to use and whether we created it (and so must close it).

    The runtime's factory wins (the simulator's MockFactory); else the configured name is looked
    up in gpiozero's own entry points, so no backend module is imported here. "default" returns
    None: gpiozero then chooses (``GPIOZERO_PIN_FACTORY`` or lgpio on a Pi).
    """
    if ctx_factory is not None:
        return ctx_factory, False
    if name == "default":
        return None, False
    for ep in entry_points(group="gpiozero_pin_factories"):
        if ep.name == name:
            return ep.load()(), True
    raise GPIOZeroError(f"gpiozero has no pin factory named {name!r}")


class LoopAdapter:
    """The one crossing from gpiozero's callback thread into the event loop.

    `edge` may run on any thread: it stamps the edge with `time.monotonic()` and hands it over
    with `call_soon_threadsafe`, touching nothing else of asyncio. The handler then runs on the
    loop thread. `callback_threads` and `handled_off_loop` are kept so tests can check that.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: Callable[[int, bool, float], None],
    ) -> None:
        self._loop = loop
        self._handler = handler
        self.loop_thread = threading.get_ident()
        self.callback_threads: set[int] = set()
        self.handled_off_loop = 0

    def edge(self, index: int, level: bool) -> None:
        ts = time.monotonic()
        self.callback_threads.add(threading.get_ident())
        # RuntimeError: the loop closed while the backend still calls back (shutting down).
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver, index, level, ts)

    def _deliver(self, index: int, level: bool, ts: float) -> None:
        if threading.get_ident() != self.loop_thread:
            self.handled_off_loop += 1
        self._handler(index, level, ts)


class _Input:
    """Debounce state of one input; touched only on the loop thread."""

    def __init__(self, cfg: GpioInputConfig) -> None:
        self.cfg = cfg
        self.spec = KINDS[cfg.kind]
        self.invert = cfg.asserted_high() != cfg.gpiozero_active_high()
        self.device: DigitalInputDevice | None = None
        self.reported = False
        self.level = False
        self.last_edge = 0.0
        self.pending = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0

    def settle_s(self, level: bool) -> float:
        """How long a level must hold before it counts (a panic press must be held hold_ms)."""
        ms = self.cfg.debounce_ms
        if level and self.cfg.kind == "panic":
            ms = max(ms, self.cfg.hold_ms)
        return ms / 1000.0

    def value(self, asserted: bool) -> Value:
        return self.spec.asserted if asserted else self.spec.normal


class GpioSource:
    """All configured GPIO inputs as one source named ``gpio``."""

    def __init__(self, cfg: GpioConfig, ctx: SourceContext) -> None:
        self.name = "gpio"
        self.health = SourceHealth(name="gpio", kind="gpio")
        self.adapter: LoopAdapter | None = None
        self._cfg = cfg
        self._ctx = ctx
        self._inputs = [_Input(i) for i in cfg.inputs]
        self._queue: asyncio.Queue[Reading] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._factory: Any = None
        self._own_factory = False
        self._log = structlog.get_logger(__name__).bind(source="gpio")

    async def run(self, sink: Sink) -> None:
        backoff = Backoff()
        offline = False
        while True:
            try:
                self._open()
            except (GPIOZeroError, OSError) as exc:
                self._close()
                self.health.count("open_failed")
                self.health.detail = f"cannot open GPIO: {exc}"
                self._log.warning("gpio_open_failed", error=str(exc))
                if not offline:
                    offline = True
                    self.health.state = SourceState.OFFLINE
                    await self._submit(sink, self._status_reading("source.offline", str(exc)))
                await backoff.wait()
                continue
            try:
                backoff.reset()
                self.health.state = SourceState.ONLINE
                self.health.detail = ""
                if offline:
                    offline = False
                    await self._submit(sink, self._status_reading("source.online", ""))
                await self._submit_many(sink, self._initial_readings())
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pump(sink), name="gpio.pump")
                    if self._cfg.snapshot_interval_s > 0:
                        tg.create_task(self._snapshots(), name="gpio.snapshot")
            finally:
                self._close()
                self.health.state = SourceState.STOPPED

    # -- devices ---------------------------------------------------------------------------

    def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._queue = asyncio.Queue()
        self.adapter = LoopAdapter(loop, self._on_edge)
        self._factory, self._own_factory = resolve_pin_factory(
            self._cfg.pin_factory, self._ctx.pin_factory
        )
        adapter = self.adapter
        for index, inp in enumerate(self._inputs):
            c = inp.cfg
            device = DigitalInputDevice(
                c.pin,
                pull_up=c.pull_up,
                active_state=c.active_high if c.pull_up is None else None,
                pin_factory=self._factory,
            )
            inp.device = device
            # Callbacks first, then read the level: an edge in between is queued, not lost.
            # partial, not a closure or callable object: gpiozero inspects the callback's arity.
            device.when_activated = functools.partial(adapter.edge, index, not inp.invert)
            device.when_deactivated = functools.partial(adapter.edge, index, inp.invert)
            inp.level = inp.reported = bool(device.is_active) != inp.invert
            inp.last_edge = time.monotonic()
            inp.pending = 0

    def _close(self) -> None:
        for inp in self._inputs:
            if inp.timer is not None:
                inp.timer.cancel()
                inp.timer = None
            if inp.device is not None:
                inp.device.when_activated = None
                inp.device.when_deactivated = None
                inp.device.close()
                inp.device = None
        if self._own_factory and self._factory is not None:
            self._factory.close()
        self._factory = None
        self._own_factory = False

    # -- debounce (loop thread) ------------------------------------------------------------

    def _on_edge(self, index: int, level: bool, ts: float) -> None:
        inp = self._inputs[index]
        inp.level = level
        inp.last_edge = ts
        inp.pending += 1
        self.health.count("edges")
        self._arm(inp, ts + inp.settle_s(level))

    def _arm(self, inp: _Input, due: float) -> None:
        # One timer per input: a storm of edges moves the deadline, it does not pile up timers.
        if inp.timer is not None and inp.timer_due <= due:
            return
        if inp.timer is not None:
            inp.timer.cancel()
        assert self._loop is not None
        inp.timer_due = due
        inp.timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._settle, inp)

    def _settle(self, inp: _Input) -> None:
        inp.timer = None
        due = inp.last_edge + inp.settle_s(inp.level)
        if time.monotonic() < due:
            self._arm(inp, due)
            return
        if inp.level != inp.reported:
            inp.reported = inp.level
            self.health.count("bounces_suppressed", inp.pending - 1)
            stable_for = time.monotonic() - inp.last_edge
            self._emit(inp, ts=self._ctx.clock.time() - stable_for)
        else:
            self.health.count("bounces_suppressed", inp.pending)
        inp.pending = 0

    # -- readings --------------------------------------------------------------------------

    def _emit(self, inp: _Input, *, ts: float, initial: bool = False) -> None:
        assert self._queue is not None
        self._queue.put_nowait(self._reading(inp, ts=ts, initial=initial))

    def _reading(self, inp: _Input, *, ts: float, initial: bool = False) -> Reading:
        spec = inp.spec
        return Reading(
            source=inp.cfg.source_id,
            type=spec.type,
            value=inp.value(inp.reported),
            ts=ts,
            priority=spec.priority if inp.cfg.priority is None else inp.cfg.priority,
            attrs={"initial": True} if initial else None,
        )

    def _initial_readings(self) -> list[Reading]:
        now = self._ctx.clock.time()
        return [self._reading(inp, ts=now, initial=True) for inp in self._inputs]

    def _snapshot(self) -> Reading:
        return Reading(
            source="gpio",
            type="contact.snapshot",
            value={inp.cfg.name: inp.value(inp.reported) for inp in self._inputs},
            ts=self._ctx.clock.time(),
            priority=TELEMETRY,
        )

    def _status_reading(self, type_: str, detail: str) -> Reading:
        return Reading(
            source="gpio",
            type=type_,
            value=detail or None,
            ts=self._ctx.clock.time(),
            priority=ALERT,
        )

    async def _snapshots(self) -> None:
        assert self._queue is not None
        while True:
            await asyncio.sleep(self._cfg.snapshot_interval_s)
            self._queue.put_nowait(self._snapshot())

    async def _pump(self, sink: Sink) -> None:
        assert self._queue is not None
        while True:
            reading = await self._queue.get()
            await self._submit(sink, reading)

    async def _submit(self, sink: Sink, reading: Reading) -> None:
        await self._submit_many(sink, [reading])

    async def _submit_many(self, sink: Sink, readings: Sequence[Reading]) -> None:
        try:
            await sink.submit_many(readings)
        except RefusedError as exc:
            self.health.count("refused", len(readings))
            self._log.warning("gpio_reading_refused", error=str(exc), priority=exc.priority)
            return
        self.health.readings += len(readings)
        self.health.last_reading = self._ctx.clock.time()


def build_sources(cfg: GpioConfig, ctx: SourceContext) -> list[Source]:
    """One `GpioSource` for all inputs, or none when disabled or nothing is wired."""
    if not cfg.enabled or not cfg.inputs:
        return []
    return [GpioSource(cfg, ctx)]


class GpioStatusOutput:
    """The gateway's status LED (on / slow blink / fast blink) and optional buzzer.

    online: LED on. buffering (WAN down, events kept locally): slow blink, 1 s on / 1 s off.
    fault: fast blink, 0.1 s / 0.1 s, and three short beeps (not a continuous tone: staff in
    the branch must not be tempted to pull the plug).
    """

    def __init__(
        self, cfg: GpioOutputConfig, pin_factory: Any = None, *, owns_factory: bool = False
    ) -> None:
        self._factory = pin_factory if owns_factory else None
        self._led: LED | None = None
        self._buzzer: Buzzer | None = None
        self.state: StatusState | None = None
        high, factory = cfg.active_high, pin_factory
        try:
            if cfg.status_led is not None:
                self._led = LED(cfg.status_led, active_high=high, pin_factory=factory)
            if cfg.buzzer is not None:
                self._buzzer = Buzzer(cfg.buzzer, active_high=high, pin_factory=factory)
        except BaseException:
            self.close()
            raise

    def set_state(self, state: StatusState) -> None:
        if state == self.state:
            return
        self.state = state
        led, buzzer = self._led, self._buzzer
        if led is not None:
            if state == "online":
                led.on()
            elif state == "buffering":
                led.blink(on_time=1.0, off_time=1.0)
            else:
                led.blink(on_time=0.1, off_time=0.1)
        if buzzer is not None:
            if state == "fault":
                buzzer.beep(on_time=0.1, off_time=0.2, n=3)
            else:
                buzzer.off()

    def close(self) -> None:
        """Idempotent."""
        for device in (self._led, self._buzzer):
            if device is not None:
                device.close()
        self._led = self._buzzer = None
        if self._factory is not None:
            self._factory.close()
            self._factory = None


def build_status_output(cfg: GpioConfig, ctx: SourceContext) -> GpioStatusOutput | None:
    """The status output for `cfg.outputs`, or None when no output pin is configured."""
    if not cfg.enabled or (cfg.outputs.status_led is None and cfg.outputs.buzzer is None):
        return None
    factory, own = resolve_pin_factory(cfg.pin_factory, ctx.pin_factory)
    return GpioStatusOutput(cfg.outputs, factory, owns_factory=own)


class GpioPulseOutputs:
    """Named outputs driven for a bounded time (a door strike, a siren relay) by the `pulse`
    command. One at a time per output; the output is switched off again even if the pulse is
    cancelled (the agent stopping)."""

    def __init__(self, cfg: GpioConfig, ctx: SourceContext) -> None:
        from gpiozero import DigitalOutputDevice

        factory, self._own = resolve_pin_factory(cfg.pin_factory, ctx.pin_factory)
        self._factory = factory
        self._devices = {
            name: DigitalOutputDevice(pin, active_high=cfg.outputs.active_high,
                                      initial_value=False, pin_factory=factory)
            for name, pin in cfg.outputs.pulse.items()
        }
        self._busy: set[str] = set()

    @property
    def names(self) -> list[str]:
        return sorted(self._devices)

    async def pulse(self, name: str, seconds: float) -> None:
        device = self._devices.get(name)
        if device is None:
            raise KeyError(f"no output named {name!r} in [sources.gpio.outputs.pulse]")
        if name in self._busy:
            raise RuntimeError(f"output {name!r} is already being pulsed")
        self._busy.add(name)
        try:
            device.on()
            await asyncio.sleep(seconds)
        finally:
            device.off()
            self._busy.discard(name)

    def close(self) -> None:
        for device in self._devices.values():
            device.close()
        self._devices.clear()
        if self._own and self._factory is not None:
            self._factory.close()

