"""The simulated branch: GPIO contacts on a gpiozero MockFactory, simulated serial devices and
facility devices over IP (a NUT server, an SNMP agent, a Modbus TCP meter), driven through a
scenario's timeline from the simulator's own thread.

The agent sees the same seams as on a Pi: it opens the serial devices' paths (ptys behind
stable symlinks in `workdir`), reads pins through `pin_factory` (pass it as
``SourceContext.pin_factory``) and reaches the IP devices on 127.0.0.1 at the ports
`agent_sources_config` names. Pins are driven from the timeline thread because real gpiozero
backends call back from a foreign thread and the agent must cope with that.

The NUT and SNMP devices are Debian's real daemons (upsd + dummy-ups, snmpd), each in a temp
dir of its own under `workdir`; a scenario that needs one this machine lacks fails at `start`,
before anything starts, with `SimUnavailable` naming the package to install.
"""

from __future__ import annotations

import heapq
import itertools
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import tomli_w
from gpiozero.pins.mock import MockFactory

from branchsim.gpio import SimContact, sim_pin_factory
from branchsim.scenario import (
    IP_KINDS,
    SERIAL_KINDS,
    DeviceKind,
    GpioStep,
    IpDeviceSpec,
    ModbusTcpDeviceSpec,
    NutDeviceSpec,
    Scenario,
    SerialStep,
    SnmpDeviceSpec,
    Step,
    TimedStep,
)
from drivers.gpio.config import GpioConfig

if TYPE_CHECKING:
    from branchsim.serialdev import SimSerialDevice

__all__ = ["SimClock", "SimUnavailable", "Simulator", "missing_daemons"]

_log = structlog.get_logger(__name__)

# A simulated branch plays minutes in seconds: the agent's IP sources retry soon after an
# outage, so a device that comes back is seen within a poll or two, also at high speed.
_RETRY: dict[str, float] = {"backoff_base_s": 0.2, "backoff_cap_s": 2.0}


class SimUnavailable(RuntimeError):
    """A scenario device this machine cannot run; the message names the package to install."""


def missing_daemons(scenario: Scenario) -> list[str]:
    """What the scenario's IP devices need that is not installed, one line each (empty: all
    there). Looked up when called, so a scenario loads on any machine."""
    from branchsim import nutserver, snmpagent

    problems = []
    needs: list[tuple[DeviceKind, bool, str, str]] = [
        ("nut", nutserver.find_nut() is not None, "NUT's upsd and dummy-ups "
         f"({nutserver.UPSD}, {nutserver.DUMMY_UPS})", "nut-server"),
        ("snmp", snmpagent.find_snmpd() is not None, f"net-snmp's snmpd ({snmpagent.SNMPD})",
         "snmpd"),
    ]
    for kind, found, what, package in needs:
        names = [d.name for d in scenario.ip.get(kind, ())]
        if names and not found:
            problems.append(f"{scenario.origin}: the {kind} devices {names} need {what}, "
                            f"not installed here: apt install {package}")
    return problems


class _IpSim(Protocol):
    """What NutServer, SnmpAgentSim and ModbusTcpDevice have in common."""

    port: int  # on 127.0.0.1; chosen when made (NUT, SNMP) or at the first start (Modbus TCP)

    def start(self) -> object: ...
    def stop(self) -> None: ...
    def apply(self, step: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class _IpDevice:
    kind: DeviceKind
    spec: IpDeviceSpec
    sim: _IpSim

    def agent_config(self) -> dict[str, Any]:
        """The agent's entry for this device (``[[sources.<kind>]]``), named as in the scenario."""
        from branchsim.modbustcp import ModbusTcpDevice
        from branchsim.nutserver import NutServer
        from branchsim.snmpagent import OUTLETS, SnmpAgentSim

        name = self.spec.name
        if isinstance(self.sim, NutServer):
            assert isinstance(self.spec, NutDeviceSpec)
            return self.sim.agent_config(
                name=name, poll_interval_s=self.spec.params.poll_interval_s, timeout_s=1.0,
                **_RETRY)
        if isinstance(self.sim, SnmpAgentSim):
            assert isinstance(self.spec, SnmpDeviceSpec)
            # v2c with the simulator's own community: a test stand-in, not a device to protect
            return {"name": name, **self.sim.agent_config("2c"),
                    "profile": self.spec.params.profile, "max_outlets": OUTLETS,
                    "poll_interval_s": self.spec.params.poll_interval_s, "timeout_s": 0.5,
                    "retries": 1, **_RETRY}
        assert isinstance(self.sim, ModbusTcpDevice)
        return {**self.sim.agent_config(), **_RETRY}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sim.port}"


def _create_ip_device(spec: IpDeviceSpec, workdir: Path) -> _IpDevice:
    """The simulated device, not started; the daemons' files in a temp dir of its own under
    `workdir` (imported here: GPIO-only scenarios run without these modules' libraries)."""
    if isinstance(spec, ModbusTcpDeviceSpec):
        from branchsim.modbustcp import ModbusTcpDevice

        return _IpDevice("modbus_tcp", spec, ModbusTcpDevice(spec.name, spec.params))
    home = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=workdir))
    if isinstance(spec, NutDeviceSpec):
        from branchsim.nutserver import DEFAULT_STATE, NutServer

        p = spec.params
        return _IpDevice("nut", spec, NutServer(home, ups=p.ups, maxage_s=p.maxage_s,
                                                state=DEFAULT_STATE | p.values))
    assert isinstance(spec, SnmpDeviceSpec)
    from branchsim.snmpagent import SnmpAgentSim

    snmp = SnmpAgentSim(home)
    snmp.apply({"set": spec.params.ups.model_dump(exclude_none=True),
                "outlets": {n: c.model_dump(exclude_none=True)
                            for n, c in spec.params.outlets.items()}})
    return _IpDevice("snmp", spec, snmp)


class SimClock:
    """The agent's clock on a simulated branch (agent.core.clock.Clock): monotonic time is the
    machine's, the wall clock reads `start` when the clock is made and runs from there, and
    whether it is synchronised is the simulator's to say (`synchronized_now`), so a scenario
    can show a gateway that booted without NTP."""

    def __init__(self, start: float, synchronized: bool = True) -> None:
        self._mono0 = time.monotonic()
        self._start = start
        self.synchronized_now = synchronized

    def time(self) -> float:
        return self._start + (time.monotonic() - self._mono0)

    def monotonic(self) -> float:
        return time.monotonic()

    def synchronized(self) -> bool:
        return self.synchronized_now


class Simulator:
    """Runs one scenario. `start` returns once every device is up and at its initial state."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        workdir: Path,
        speed: float = 1.0,
    ) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0 (0 = no waiting between steps)")
        self.scenario = scenario
        self.workdir = Path(workdir)
        self.speed = speed
        # Pass it to the agent as SourceContext.pin_factory.
        self.pin_factory: MockFactory = sim_pin_factory()
        self.thread_ident: int | None = None
        self.errors = 0
        self._contacts: dict[str, SimContact] = {}
        self._serial: dict[str, SimSerialDevice] = {}
        self._ip: dict[str, _IpDevice] = {}
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._go = threading.Event()
        self._setup_error: Exception | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Bring up every device at its initial state, then play the timeline (time 0 is now).

        With `paused`, the timeline waits for `resume`: a caller that must open the devices
        first (the agent's drivers, a test) then loses no step.
        """
        if not paused:
            self._go.set()
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        if problems := missing_daemons(self.scenario):
            raise SimUnavailable("\n".join(problems))
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for kind in SERIAL_KINDS:
                for spec in self.scenario.serial[kind]:
                    # Imported here: the serial devices are another module's, and GPIO-only
                    # scenarios must run without it.
                    from branchsim.serialdev import create_device

                    device = create_device(kind, spec.name, spec.params, self.workdir)
                    self._serial[spec.name] = device
                    device.start()
            for kind in IP_KINDS:
                for ip_spec in self.scenario.ip.get(kind, ()):
                    ip = _create_ip_device(ip_spec, self.workdir)
                    self._ip[ip_spec.name] = ip  # before start: stop() ends a half-started one
                    ip.sim.start()
            self._thread = threading.Thread(target=self._run, name="branch-sim", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self._setup_error is not None:
                raise self._setup_error
        except BaseException:
            self.stop()
            raise

    def resume(self) -> None:
        """Start the timeline of a simulator started with ``paused=True``."""
        self._go.set()

    def stop(self) -> None:
        """Idempotent: ends the timeline thread and stops every device (each IP device's
        daemons too, also those of one that failed half-way through its start)."""
        self._stop.set()
        self._go.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        for device in self._serial.values():
            device.stop()
        for ip in reversed(self._ip.values()):
            try:
                ip.sim.stop()
            except Exception:  # the others must still be stopped
                _log.exception("sim_device_stop_failed", device=ip.spec.name)

    def wait_done(self, timeout: float) -> bool:
        """True once every step ran and the scenario's duration has passed (scaled by speed)."""
        return self._done.wait(timeout)

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the agent needs --------------------------------------------------------------

    def agent_sources_config(self) -> dict[str, Any]:
        """The agent's ``[sources]`` table for this simulated branch."""
        gpio = GpioConfig(
            pin_factory="mock", inputs=[g.driver_config() for g in self.scenario.gpio]
        )
        serial: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SERIAL_KINDS}
        for device in self._serial.values():
            serial[device.kind].append(device.agent_config())
        ip: dict[str, list[dict[str, Any]]] = {kind: [] for kind in IP_KINDS}
        for device_ip in self._ip.values():
            ip[device_ip.kind].append(device_ip.agent_config())
        return {"gpio": gpio.model_dump(mode="json", exclude_none=True), "serial": serial, **ip}

    def config_snippet(self) -> str:
        """`agent_sources_config` as TOML text."""
        header = (
            f"# branch-sim scenario {self.scenario.name!r}: paste into the agent's config.\n"
            "# GPIO pins are the simulator's in-process MockFactory: only an agent that runs\n"
            "# the simulator itself (branch-sim agent) sees them.\n"
        )
        return header + tomli_w.dumps({"sources": _drop_none(self.agent_sources_config())})

    def agent_clock(self, synchronized: bool = True) -> SimClock | None:
        """A clock for the agent whose wall time starts at the scenario's `start` (None for a
        scenario without one: the machine's clock then serves)."""
        if self.scenario.start is None:
            return None
        return SimClock(self.scenario.start, synchronized)

    def device_paths(self) -> dict[str, str]:
        """Serial device name -> the path the agent opens."""
        return {name: device.path for name, device in self._serial.items()}

    def device_addresses(self) -> dict[str, str]:
        """IP device name -> ``kind 127.0.0.1:port``, where the agent reaches it."""
        return {name: f"{ip.kind} {ip.address}" for name, ip in self._ip.items()}

    # -- the timeline thread ---------------------------------------------------------------

    def _run(self) -> None:
        self.thread_ident = threading.get_ident()
        try:
            for g in self.scenario.gpio:
                self._contacts[g.name] = SimContact(g, self.pin_factory)
        except Exception as exc:
            self._setup_error = exc
            return
        finally:
            self._ready.set()
        self._go.wait()
        if self._stop.is_set():
            return
        t0 = time.monotonic()
        for step in self.scenario.steps:
            self._push(t0 + self._scaled(step.at), self._runner(step))
        self._push(t0 + self._scaled(self.scenario.duration), lambda: None)
        while self._queue:
            due, _, action = heapq.heappop(self._queue)
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            if self._stop.is_set():
                return
            try:
                action()
            except Exception:
                self.errors += 1
                _log.exception("sim_step_failed")
        self._done.set()
        _log.info("sim_timeline_done", scenario=self.scenario.name)

    def _scaled(self, seconds: float) -> float:
        return 0.0 if self.speed == 0 else seconds / self.speed

    def _push(self, due: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (due, next(self._seq), action))

    def _runner(self, timed: TimedStep) -> Callable[[], None]:
        def run() -> None:
            log = _log.bind(device=timed.device, at=timed.at)
            log.debug("sim_step", step=timed.step.model_dump(exclude_none=True))
            if isinstance(timed.step, GpioStep):
                self._gpio_step(self._contacts[timed.device], timed.step)
            elif timed.kind in IP_KINDS:
                self._ip[timed.device].sim.apply(_ip_payload(timed.step))
            else:
                assert isinstance(timed.step, SerialStep)
                self._serial_step(self._serial[timed.device], timed.step)

        return run

    # -- GPIO ------------------------------------------------------------------------------

    def _gpio_step(self, contact: SimContact, step: GpioStep) -> None:
        if step.set is not None:
            contact.set(step.set, bounce=step.bounce, bounce_ms=step.bounce_ms)
            return
        duration = step.hold if step.hold is not None else step.pulse
        assert duration is not None  # GpioStep validates exactly one action
        contact.set(True, bounce=step.bounce, bounce_ms=step.bounce_ms)
        # Physical duration, not scaled by speed: see GpioStep.
        self._push(
            time.monotonic() + duration,
            lambda: contact.set(False, bounce=step.bounce, bounce_ms=step.bounce_ms),
        )

    # -- serial ----------------------------------------------------------------------------

    def _serial_step(self, device: SimSerialDevice, step: SerialStep) -> None:
        if step.unplug:
            device.unplug()
        if step.replug:
            device.replug()
        payload = step.payload()
        if payload:
            device.apply(payload)


def _ip_payload(step: Step) -> dict[str, Any]:
    """An IP device's step as its `apply` takes it: the step's keys, unplug/replug included."""
    payload = step.payload()
    if isinstance(step, SerialStep):
        payload |= {k: True for k in ("unplug", "replug") if getattr(step, k)}
    return payload


def _drop_none(value: Any) -> Any:
    """TOML has no null: leave unset keys out."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
