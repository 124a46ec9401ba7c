"""A UPS watched through a NUT server (upsd): polls ``LIST VAR <ups>`` every `poll_interval_s`.

Readings use the Megatec UPS source's vocabulary (drivers/serial/megatec.py) where the meaning
is the same, so the platform sees one set of names for every UPS: ``ups.on_battery``,
``ups.battery_low``, ``ups.input_voltage``, ``ups.load`` ... The ``ups.status`` flags become
boolean readings sent when they change (and at the first poll), the alarming ones (on battery,
low battery, replace battery, overload, forced shutdown, output off, bypass) as ALERTs; the
numeric variables are TELEMETRY every poll (the pipeline's deadband rules thin them).

upsd answers for a UPS it cannot vouch for with an error instead of values: ``ERR UNKNOWN-UPS``
(no such UPS on that server), ``ERR DRIVER-NOT-CONNECTED`` (its driver is not running),
``ERR DATA-STALE`` (the driver lost the UPS). Each is counted on its own in health and makes the
source offline, as an unreachable server does, until the values come back.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Final

from agent.core.clock import Clock
from agent.core.types import ALERT, DIAGNOSTIC, TELEMETRY, Reading
from drivers.base import Source, SourceContext
from drivers.nut.config import NutConfig
from drivers.nut.protocol import NutClient, NutError, NutProtocolError
from drivers.ratelimit import LogGates
from drivers.supervised import DeviceUnavailable, Reachability, SupervisedSource

__all__ = [
    "FLAGS",
    "NutSource",
    "Reachability",
    "build_sources",
    "check_reachable",
    "parse_number",
    "reading_type",
    "status_flags",
    "status_readings",
]

STATUS: Final = "ups.status"

# ups.status token -> (reading type, priority); sent when it changes. Names as megatec.py's FLAGS
# where they mean the same (OB = its utility_fail bit, LB = battery_low, FSD = shutdown_active).
FLAGS: Final[dict[str, tuple[str, int]]] = {
    "OB": ("ups.on_battery", ALERT),
    "LB": ("ups.battery_low", ALERT),
    "RB": ("ups.replace_battery", ALERT),
    "OVER": ("ups.overload", ALERT),
    "FSD": ("ups.shutdown_active", ALERT),
    "OFF": ("ups.output_off", ALERT),  # the load has no power from the UPS
    # NUT's BYPASS is unambiguous (the load is on raw mains, unprotected): an ALERT, where the
    # Megatec bit shares "bypass" with "boost" and stays TELEMETRY
    "BYPASS": ("ups.bypass", ALERT),
    "ALARM": ("ups.alarm", ALERT),  # details in the ups.alarm variable (NUT 2.8)
    "CHRG": ("ups.charging", TELEMETRY),
    "DISCHRG": ("ups.discharging", TELEMETRY),
    "TRIM": ("ups.trim", TELEMETRY),
    "BOOST": ("ups.boost", TELEMETRY),
    "CAL": ("ups.calibrating", DIAGNOSTIC),
}

# NUT variable -> reading type where megatec.py has a name for the same measurement
TYPES: Final[dict[str, str]] = {"input.frequency": "ups.frequency"}
# last word of a NUT variable -> SenML unit (NUT's variable naming conventions)
UNITS: Final[dict[str, str]] = {
    "voltage": "V",
    "current": "A",
    "frequency": "Hz",
    "temperature": "Cel",
    "humidity": "%RH",
    "charge": "%",
    "load": "%",
    "runtime": "s",
    "realpower": "W",
    "power": "VA",
}

# upsd's refusals: ERR code -> (health counter, reason for source.offline)
REFUSALS: Final[dict[str, tuple[str, str]]] = {
    "UNKNOWN-UPS": ("unknown_ups", "UPS {ups!r} is not known to the NUT server at {where}"),
    "DRIVER-NOT-CONNECTED": ("driver_not_connected",
                             "the NUT driver of UPS {ups!r} is not running on {where}"),
    "DATA-STALE": ("data_stale", "the data of UPS {ups!r} on {where} is stale (its driver "
                   "lost the UPS)"),
    "ACCESS-DENIED": ("auth_refused", "login as {user!r} to UPS {ups!r} refused by {where}"),
}
ADVICE: Final[dict[str, str]] = {
    "unknown_ups": "compare `ups` in the config with `upsc -l <host>`",
    "driver_not_connected": "on the NUT server: `upsdrvctl start` and its log",
    "data_stale": "check the UPS's cable to the NUT server, then the driver's log",
    "auth_refused": "check username/password, and that upsd.users gives the user "
                    "`upsmon secondary`",
    "unreachable": "check the host and port, that upsd LISTENs on that address, and the "
                   "firewall (TCP 3493)",
}


def reading_type(variable: str) -> tuple[str, str | None]:
    """Pure: a NUT variable -> (reading type, SenML unit). ``battery.charge`` ->
    (``ups.battery_charge``, ``%``); ``ups.load`` -> (``ups.load``, ``%``)."""
    name = TYPES.get(variable)
    if name is None:
        name = "ups." + variable.removeprefix("ups.").replace(".", "_")
    return name, UNITS.get(variable.rsplit(".", 1)[-1])


def parse_number(text: str) -> int | float | None:
    """Pure: a NUT value as a number (int when written as one); None when it is not a finite
    number."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def status_flags(status: str) -> dict[str, bool]:
    """Pure: ``ups.status`` ("OL CHRG", "OB LB") -> reading type -> bool. ``ups.on_battery`` is
    left out when the status says neither OL nor OB (a driver starting up: "WAIT")."""
    tokens = set(status.split())
    flags = {type_: token in tokens for token, (type_, _) in FLAGS.items()}
    if not tokens & {"OL", "OB"}:
        del flags["ups.on_battery"]
    return flags


_PRIORITY: Final = {type_: priority for type_, priority in FLAGS.values()}


def status_readings(
    status: str, previous: str | None, source: str, ts: float | None
) -> list[Reading]:
    """Pure: the status string (TELEMETRY) and each flag, where they changed since `previous`
    (everything when `previous` is None)."""
    status = " ".join(status.split())
    if previous is not None and status == previous:
        return []
    readings = [Reading(source, STATUS, status, None, ts, TELEMETRY)]
    before = status_flags(previous) if previous is not None else {}
    for type_, value in status_flags(status).items():
        if before.get(type_) != value:
            readings.append(Reading(source, type_, value, None, ts, _PRIORITY[type_]))
    return readings


class NutSource(SupervisedSource):
    """Polls one UPS on one NUT server; id ``nut.<name>``."""

    kind = "nut"
    log_ns = "nut"

    def __init__(self, cfg: NutConfig, clock: Clock) -> None:
        super().__init__(cfg.name, clock, where=cfg.where, backoff_base_s=cfg.backoff_base_s,
                         backoff_cap_s=cfg.backoff_cap_s)
        self.cfg = cfg
        self.last_status: str | None = None  # kept across sessions: changes only after a gap
        self._fsd = False  # forced shutdown seen: no LOGIN until it is over (see `session`)
        self._absent: tuple[str, ...] | None = None
        self._gates = LogGates(clock.monotonic)

    async def session(self) -> None:
        client: NutClient | None = None
        try:
            client = await self._open(login=not self._fsd)
            while True:
                values = await client.list_vars(self.cfg.ups)
                await self.connected()
                await self.emit_many(self._readings(values))
                if self._fsd and client.logged_in:
                    # upsmon on the primary waits, before it powers the UPS off, until every
                    # client logged in to the UPS has left (or HOSTSYNC ends): leave at once
                    # and keep watching without a login
                    self.log.warning("nut.fsd_logout", ups=self.cfg.ups)
                    await client.close()
                    client = None
                    client = await self._open(login=False)
                await asyncio.sleep(self.cfg.poll_interval_s)
        except DeviceUnavailable:
            raise
        except NutError as exc:
            counter, reason = REFUSALS.get(exc.code, ("refused", f"upsd refused: {exc}"))
            self.health.count(counter)
            raise DeviceUnavailable(
                reason.format(ups=self.cfg.ups, where=self.where, user=self.cfg.username)
            ) from exc
        except NutProtocolError as exc:
            self.health.count("protocol")
            raise DeviceUnavailable(f"{self.where} does not speak NUT: {exc}") from exc
        except (OSError, EOFError) as exc:  # TimeoutError is an OSError
            if client is None:
                self.health.count("unreachable")
                raise DeviceUnavailable(
                    f"cannot reach the NUT server at {self.where}: {_describe(exc)}") from exc
            self.health.count("connection_lost")
            raise DeviceUnavailable(
                f"connection to the NUT server at {self.where} lost: {_describe(exc)}") from exc
        finally:
            if client is not None:
                await client.close()

    async def _open(self, *, login: bool) -> NutClient:
        client = await NutClient.connect(self.cfg.host, self.cfg.port, self.cfg.timeout_s)
        try:
            if login and self.cfg.username is not None:
                await client.login(self.cfg.ups, self.cfg.username, self._password())
        except BaseException:
            await client.close()
            raise
        return client

    def _password(self) -> str:
        try:
            password = self.cfg.read_password()
        except OSError as exc:
            self.health.count("password_file")
            raise DeviceUnavailable(
                f"cannot read password_file {self.cfg.password_file}: {exc.strerror}") from exc
        assert password is not None  # the config pairs username with a password
        return password

    def _readings(self, values: Mapping[str, str]) -> list[Reading]:
        ts = self.clock.time()
        readings: list[Reading] = []
        absent = tuple(v for v in self.cfg.variables if v not in values)
        if absent != self._absent:
            self._absent = absent
            self.health.stats["variables_absent"] = len(absent)
            if absent:
                self.log.info("nut.variables_absent", ups=self.cfg.ups, variables=list(absent))
        for variable in self.cfg.variables:
            text = values.get(variable)
            if text is None:
                continue
            if variable == STATUS:
                if not text.split() or "WAIT" in text.split():
                    continue  # upsd or its driver starting: no state yet, so no change either
                readings += status_readings(text, self.last_status, self.name, ts)
                self.last_status = " ".join(text.split())
                self._fsd = "FSD" in text.split()
                continue
            number = parse_number(text)
            if number is None:
                self._bad_value(variable, text)
                continue
            type_, unit = reading_type(variable)
            readings.append(Reading(self.name, type_, number, unit, ts, TELEMETRY))
        return readings

    def _bad_value(self, variable: str, text: str) -> None:
        self.health.count("bad_value")
        held = self._gates.open(variable)  # keys are configured variable names
        if held is not None:
            self.log.warning("nut.bad_value", variable=variable, value=text[:40],
                             suppressed=held)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timeout)"
    return str(exc) or type(exc).__name__


def build_sources(cfgs: Sequence[NutConfig], ctx: SourceContext) -> list[Source]:
    """One source per configured UPS."""
    return [NutSource(cfg, ctx.clock) for cfg in cfgs]


async def check_reachable(cfg: NutConfig) -> Reachability:
    """Connect once (log in when credentials are configured), list the UPS's variables, leave.
    Bounded by a few `timeout_s`; never raises."""
    where = f"{cfg.where} ups {cfg.ups!r}"
    try:
        password = cfg.read_password()
    except OSError as exc:
        return Reachability(False, f"password_file {cfg.password_file}: {exc.strerror}",
                            "make the file readable by the agent's user")
    client: NutClient | None = None
    try:
        client = await NutClient.connect(cfg.host, cfg.port, cfg.timeout_s)
        if cfg.username is not None and password is not None:
            await client.login(cfg.ups, cfg.username, password)
        values = await client.list_vars(cfg.ups)
    except NutError as exc:
        counter, reason = REFUSALS.get(exc.code, ("refused", f"upsd refused: {exc}"))
        detail = reason.format(ups=cfg.ups, where=cfg.where, user=cfg.username)
        return Reachability(False, f"{detail} (ERR {exc.code})",
                            ADVICE.get(counter, "see upsd's log on the NUT server"))
    except NutProtocolError as exc:
        return Reachability(False, f"{cfg.where} does not speak NUT: {exc}",
                            "check the port: upsd listens on TCP 3493")
    except (OSError, EOFError) as exc:  # TimeoutError is an OSError
        what = "cannot reach" if client is None else "connection lost to"
        return Reachability(False, f"{what} {cfg.where}: {_describe(exc)}",
                            ADVICE["unreachable"])
    finally:
        if client is not None:
            await client.close()
    status = values.get(STATUS, "?")
    login = f", logged in as {cfg.username!r}" if cfg.username is not None else ""
    return Reachability(True, f"{where}: {len(values)} variables, status {status}{login}")
