"""SNMP poller (pysnmp's asyncio API): a UPS on the UPS-MIB (RFC 1628), an APC rack PDU's
outlet table (PowerNet-MIB rPDUOutletStatusTable), or a configured list of OIDs.

One UPS vocabulary: where a UPS-MIB object means what a Megatec/Q1 flag or value means, the
reading type is the one drivers/serial/megatec.py emits (``ups.on_battery``,
``ups.battery_low``, ``ups.input_voltage`` ...), so the platform's rules do not care how the UPS
is wired. State readings (on battery, battery low, alarms, an outlet on/off) are emitted on
change and at the first poll, at ALERT priority; measurements every poll as TELEMETRY with
their SenML unit.

Failures, as SNMP shows them: no answer (the agent is down, or a wrong v2c community, which an
agent silently drops, or a wrong v3 priv key, which net-snmp also drops) is ``timeout``; a USM
report (usmStatsWrongDigests, usmStatsUnknownUserNames ...) is ``auth_failed``; both make the
source offline (`DeviceUnavailable`) until it answers again. An object the device does not have
(noSuchObject / noSuchInstance) is counted and logged once per OID: a config or firmware
matter, not an outage. Values of the wrong type are counted as ``bad_value`` and skipped.

pysnmp (~15 MB with pyasn1) is imported inside the functions that talk SNMP, so loading a config
imports none of it. Keys are handed to pysnmp only; its `UsmUserData` and our `CommunityData`
(given an index that is not the community) print them masked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.core.clock import Clock
from agent.core.types import ALERT, DIAGNOSTIC, TELEMETRY, Reading, Value
from drivers.base import Source, SourceContext
from drivers.ratelimit import LogGates
from drivers.snmp.config import SnmpConfig
from drivers.supervised import DeviceUnavailable, Reachability, SupervisedSource

if TYPE_CHECKING:
    # pysnmp ships no type information (no py.typed, no stubs): its names are Any to mypy
    from pysnmp.hlapi.v3arch.asyncio import (  # type: ignore[import-untyped]
        CommunityData,
        SnmpEngine,
        UdpTransportTarget,
        UsmUserData,
    )

__all__ = [
    "Reachability",
    "SnmpAuthFailed",
    "SnmpSource",
    "SnmpUnavailable",
    "build_sources",
    "check_reachable",
    "pdu_readings",
    "ups_readings",
]

# ---------------------------------------------------------------------------- the MIBs

SYS_DESCR = "1.3.6.1.2.1.1.1.0"
SYS_UPTIME = "1.3.6.1.2.1.1.3.0"

UPS = "1.3.6.1.2.1.33.1"  # UPS-MIB upsObjects (RFC 1628)
UPS_BATTERY_STATUS = f"{UPS}.2.1.0"  # unknown(1) batteryNormal(2) batteryLow(3) batteryDepleted(4)
UPS_OUTPUT_SOURCE = f"{UPS}.4.1.0"  # other(1) none(2) normal(3) bypass(4) battery(5) ...
UPS_ALARMS_PRESENT = f"{UPS}.6.1.0"
UPS_ALARM_DESCR = f"{UPS}.6.2.1.2"  # column: a upsWellKnownAlarms OID per present alarm
UPS_WELL_KNOWN_ALARMS = (1, 3, 6, 1, 2, 1, 33, 1, 6, 3)

# (OID, reading type, scale, unit): TELEMETRY every poll. Line tables: line 1 (a single-phase
# UPS, which is what a branch has).
UPS_TELEMETRY: Final = (
    (f"{UPS}.3.3.1.3.1", "ups.input_voltage", 1, "V"),  # upsInputVoltage.1, RMS V
    (f"{UPS}.4.4.1.2.1", "ups.output_voltage", 1, "V"),  # upsOutputVoltage.1, RMS V
    (f"{UPS}.4.4.1.5.1", "ups.load", 1, "%"),  # upsOutputPercentLoad.1
    (f"{UPS}.3.3.1.2.1", "ups.frequency", 0.1, "Hz"),  # upsInputFrequency.1, 0.1 Hz
    (f"{UPS}.2.5.0", "ups.battery_voltage", 0.1, "V"),  # upsBatteryVoltage, 0.1 V DC
    (f"{UPS}.2.7.0", "ups.temperature", 1, "Cel"),  # upsBatteryTemperature, C
    (f"{UPS}.2.4.0", "ups.battery_charge", 1, "%"),  # upsEstimatedChargeRemaining
    (f"{UPS}.2.3.0", "ups.runtime", 60, "s"),  # upsEstimatedMinutesRemaining, minutes
    (f"{UPS}.2.2.0", "ups.seconds_on_battery", 1, "s"),  # upsSecondsOnBattery
)
UPS_GET: Final = (UPS_BATTERY_STATUS, UPS_OUTPUT_SOURCE, UPS_ALARMS_PRESENT,
                  *(t[0] for t in UPS_TELEMETRY))
# upsWellKnownAlarms number -> reading type (several alarms may mean one flag)
UPS_ALARM_FLAGS: Final[dict[int, str]] = {
    1: "ups.replace_battery",  # upsAlarmBatteryBad: batteries need replacing
    18: "ups.fault",  # upsAlarmGeneralFault
    22: "ups.shutdown_active",  # upsShutdownPending
    23: "ups.shutdown_active",  # upsShutdownImminent
    24: "ups.test",  # upsTestInProgress
}
FLAG_PRIORITY: Final[dict[str, int]] = {
    "ups.on_battery": ALERT,
    "ups.battery_low": ALERT,
    "ups.battery_depleted": ALERT,
    "ups.bypass": TELEMETRY,  # as the Megatec source: a bypass is not an outage
    "ups.alarms": ALERT,
    "ups.replace_battery": ALERT,
    "ups.fault": ALERT,
    "ups.shutdown_active": ALERT,
    "ups.test": DIAGNOSTIC,
}

APC = "1.3.6.1.4.1.318.1.1.12"  # PowerNet-MIB rPDU (APC switched / metered rack PDUs)
PDU_TELEMETRY: Final = (
    (f"{APC}.1.16.0", "pdu.power", 1, "W"),  # rPDUIdentDevicePowerWatts
    (f"{APC}.2.3.1.1.2.1", "pdu.current", 0.1, "A"),  # rPDULoadStatusLoad.1, 0.1 A
)
OUTLET_NAME = f"{APC}.3.5.1.1.2"  # rPDUOutletStatusOutletName
OUTLET_STATE = f"{APC}.3.5.1.1.4"  # rPDUOutletStatusOutletState: on(1) off(2)
OUTLET_LOAD = f"{APC}.3.5.1.1.7"  # rPDUOutletStatusLoad, 0.1 A; -1 where not metered
OUTLET_COLUMNS: Final = (OUTLET_NAME, OUTLET_STATE, OUTLET_LOAD)

# The values the MIBs allow for the scalars the profiles read (RFC 1628's NonNegativeInteger,
# PositiveInteger, the percentages' ranges, the enumerations). Anything else from the agent (an
# OctetString, a Null, an enum number the MIB does not define, a negative voltage) is counted
# as ``bad_value``, logged, and left out: one bad object costs its readings, never the poll.
INT32_MAX = 2**31 - 1
RANGES: Final[dict[str, tuple[int, int]]] = {
    UPS_BATTERY_STATUS: (1, 4),
    UPS_OUTPUT_SOURCE: (1, 7),  # ... booster(6) reducer(7)
    UPS_ALARMS_PRESENT: (0, 2**32 - 1),  # Gauge32
    f"{UPS}.3.3.1.3.1": (0, INT32_MAX),
    f"{UPS}.4.4.1.2.1": (0, INT32_MAX),
    f"{UPS}.4.4.1.5.1": (0, 200),  # upsOutputPercentLoad: above 100 is an overload
    f"{UPS}.3.3.1.2.1": (0, INT32_MAX),
    f"{UPS}.2.5.0": (0, INT32_MAX),
    f"{UPS}.2.7.0": (-(2**31), INT32_MAX),  # Integer32: below freezing is a value
    f"{UPS}.2.4.0": (0, 100),
    f"{UPS}.2.3.0": (0, INT32_MAX),  # PositiveInteger, but cards report 0 when depleted
    f"{UPS}.2.2.0": (0, INT32_MAX),
    f"{APC}.1.16.0": (0, INT32_MAX),
    f"{APC}.2.3.1.1.2.1": (0, 2**32 - 1),  # Gauge32
}
LABEL_MAX = 64  # outlet names come from the device: bounded before they become attrs

GET_CHUNK = 24  # varbinds per GET request: well inside one UDP datagram and any agent's limit

# pysnmp error indications (class names) that are USM reports: the agent answered and refused
AUTH_REPORTS: Final[dict[str, str]] = {
    "WrongDigest": "usmStatsWrongDigests: wrong auth_key or auth_protocol",
    "UnknownUserName": "usmStatsUnknownUserNames: the agent has no such user",
    "DecryptionError": "usmStatsDecryptionErrors: wrong priv_key or priv_protocol",
    "UnsupportedSecurityLevel": "usmStatsUnsupportedSecLevels: the user is not set up for "
                                "authPriv",
    "UnknownSecurityName": "unknown security name",
    "AuthenticationFailure": "authentication failure",
    "AuthenticationError": "authentication error",
    "UnknownCommunityName": "unknown community name",
}
NO_ANSWER_HINT = {
    "2c": "no answer (agent down, unreachable, or a wrong community: agents drop those)",
    "3": "no answer (agent down, unreachable, or a wrong priv_key: net-snmp drops those)",
}


class SnmpUnavailable(DeviceUnavailable):
    """The agent does not answer, cannot be addressed, or refuses us; `counter` is the health
    counter it is counted under."""

    def __init__(self, message: str, counter: str = "timeout") -> None:
        super().__init__(message)
        self.counter = counter


class SnmpAuthFailed(SnmpUnavailable):
    """The agent answered with a USM report: the credentials are wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "auth_failed")


class _Missing:
    """An object the agent does not have (noSuchObject / noSuchInstance / endOfMibView)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


# ---------------------------------------------------------------------------- pure decoding


def _number(raw: int, scale: float) -> int | float:
    value = raw * scale if scale != 1 else raw
    return round(value, 9) if isinstance(value, float) else value


def _in_range(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _int(values: Mapping[str, Any], oid: str) -> int | None:
    value = values.get(oid)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _telemetry(values: Mapping[str, Any], table: Iterable[tuple[str, str, float, str]],
               source: str, ts: float | None) -> list[Reading]:
    return [Reading(source, type_, _number(raw, scale), unit, ts, TELEMETRY)
            for oid, type_, scale, unit in table if (raw := _int(values, oid)) is not None]


def _changes(state: Mapping[str, tuple[Value, int]], previous: dict[str, Value],
             source: str, ts: float | None) -> list[Reading]:
    """Readings for the states that differ from `previous` (all at the first poll); updates
    `previous`."""
    out: list[Reading] = []
    for type_, (value, priority) in state.items():
        if type_ not in previous or previous[type_] != value:
            out.append(Reading(source, type_, value, None, ts, priority))
            previous[type_] = value
    return out


def ups_readings(values: Mapping[str, Any], alarms: frozenset[int] | None,
                 previous: dict[str, Value], source: str, ts: float | None) -> list[Reading]:
    """Pure apart from `previous` (the states last reported, updated): telemetry for every
    object present, state flags where they changed. `alarms` is the set of upsWellKnownAlarms
    numbers present, None when the alarm table could not be read (its flags are then left as
    they were)."""
    flags: dict[str, Value] = {}
    if (out_src := _int(values, UPS_OUTPUT_SOURCE)) is not None:
        flags["ups.on_battery"] = out_src == 5
        flags["ups.bypass"] = out_src == 4
    if (battery := _int(values, UPS_BATTERY_STATUS)) is not None:
        flags["ups.battery_low"] = battery in (3, 4)
        flags["ups.battery_depleted"] = battery == 4
    if (present := _int(values, UPS_ALARMS_PRESENT)) is not None:
        flags["ups.alarms"] = present
    if alarms is not None:
        for number, type_ in UPS_ALARM_FLAGS.items():
            flags[type_] = bool(flags.get(type_)) or number in alarms
    state = {t: (v, FLAG_PRIORITY[t]) for t, v in flags.items()}
    return _telemetry(values, UPS_TELEMETRY, source, ts) + _changes(state, previous, source, ts)


@dataclass(frozen=True, slots=True)
class OutletRow:
    index: int
    name: str | None
    state: int | None
    load: int | None


def pdu_readings(values: Mapping[str, Any], outlets: Sequence[OutletRow],
                 previous: dict[str, Value], source: str, ts: float | None) -> list[Reading]:
    """Pure apart from `previous`: PDU totals and per-outlet current as telemetry, each
    outlet's on/off (``pdu.outlet.<n>.on``) at ALERT when it changed. The outlet's name on the
    device goes along in the reading's attrs."""
    readings = _telemetry(values, PDU_TELEMETRY, source, ts)
    for row in outlets:
        attrs = {"outlet": row.index, **({"label": row.name} if row.name else {})}
        if row.load is not None and row.load >= 0:  # -1: this PDU does not meter outlets
            readings.append(Reading(source, f"pdu.outlet.{row.index}.current",
                                    _number(row.load, 0.1), "A", ts, TELEMETRY, attrs))
        if row.state in (1, 2):
            type_ = f"pdu.outlet.{row.index}.on"
            on = row.state == 1
            if previous.get(type_) != on or type_ not in previous:
                previous[type_] = on
                readings.append(Reading(source, type_, on, None, ts, ALERT, attrs))
    return readings


def _label(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return None
    text = "".join(c for c in raw if c.isprintable()).strip()
    return text[:LABEL_MAX] or None


# ---------------------------------------------------------------------------- SNMP I/O


def _read_secret(inline: Any, path: Path | None, what: str) -> str:
    """The secret's value, from the config or its file (first line). Errors name the key and
    the file, never the value."""
    if inline is not None:
        value = str(inline.get_secret_value())
    else:
        assert path is not None  # the config requires one of the two
        try:
            value = path.read_text(encoding="utf-8").splitlines()[0].strip() \
                if path.stat().st_size else ""
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            raise SnmpUnavailable(f"cannot read {what}_file {path}: "
                                  f"{getattr(exc, 'strerror', None) or type(exc).__name__}",
                                  "credentials") from None
    if not value:
        raise SnmpUnavailable(f"{what} is empty", "credentials")
    return value


def _credentials(cfg: SnmpConfig) -> CommunityData | UsmUserData:
    """pysnmp's auth data for `cfg`. Raises `SnmpUnavailable` (counted as ``credentials``)
    when a key file cannot be read or a v3 key is shorter than RFC 3414's 8 characters."""
    from pysnmp.hlapi.v3arch import asyncio as hl  # type: ignore[import-untyped]  # untyped

    if cfg.version == "2c":
        # The index is what pysnmp prints; the community itself stays masked (<COMMUNITY>).
        community = _read_secret(cfg.community, cfg.community_file, "community")
        return hl.CommunityData(f"snmp-{cfg.name}", community, mpModel=1)
    auth_key = _read_secret(cfg.auth_key, cfg.auth_key_file, "auth_key")
    priv_key = _read_secret(cfg.priv_key, cfg.priv_key_file, "priv_key")
    for what, key in (("auth_key", auth_key), ("priv_key", priv_key)):
        if len(key) < 8:
            raise SnmpUnavailable(f"{what} is shorter than 8 characters (RFC 3414)",
                                  "credentials")
    auth = {
        "MD5": hl.usmHMACMD5AuthProtocol,
        "SHA": hl.usmHMACSHAAuthProtocol,
        "SHA-224": hl.usmHMAC128SHA224AuthProtocol,
        "SHA-256": hl.usmHMAC192SHA256AuthProtocol,
        "SHA-384": hl.usmHMAC256SHA384AuthProtocol,
        "SHA-512": hl.usmHMAC384SHA512AuthProtocol,
    }[cfg.auth_protocol]
    priv = {
        "DES": hl.usmDESPrivProtocol,
        "3DES": hl.usm3DESEDEPrivProtocol,
        "AES": hl.usmAesCfb128Protocol,
        "AES-192": hl.usmAesBlumenthalCfb192Protocol,
        "AES-256": hl.usmAesBlumenthalCfb256Protocol,
        "AES-192-C": hl.usmAesCfb192Protocol,
        "AES-256-C": hl.usmAesCfb256Protocol,
    }[cfg.priv_protocol]
    assert cfg.user is not None  # the config requires it for version 3
    return hl.UsmUserData(cfg.user, auth_key, priv_key, authProtocol=auth, privProtocol=priv)


def _plain(value: Any) -> Any:
    """A pysnmp value as a Python one: int, str (text) or bytes, a dotted OID tuple, or
    MISSING."""
    from pyasn1.type import univ  # type: ignore[import-untyped]  # no stubs installed
    from pysnmp.proto import rfc1902, rfc1905  # type: ignore[import-untyped]  # untyped

    if isinstance(value, (rfc1905.NoSuchObject, rfc1905.NoSuchInstance, rfc1905.EndOfMibView)):
        return MISSING
    if isinstance(value, univ.Integer):  # Integer32, Gauge32, Counter32, TimeTicks ...
        return int(value)
    if isinstance(value, univ.ObjectIdentifier):
        return tuple(value)
    if isinstance(value, (univ.OctetString, rfc1902.IpAddress)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    return None  # Null, Opaque ...: nothing a reading is made of


class SnmpClient:
    """One pysnmp engine + target + credentials: `get` and `walk`, every failure mapped to
    `SnmpUnavailable` / `SnmpAuthFailed` here, in one place."""

    def __init__(self, cfg: SnmpConfig, engine: SnmpEngine, target: UdpTransportTarget,
                 auth: CommunityData | UsmUserData) -> None:
        self.cfg = cfg
        self._engine = engine
        self._target = target
        self._auth = auth

    @classmethod
    async def open(cls, cfg: SnmpConfig) -> SnmpClient:
        from pysnmp.error import PySnmpError  # type: ignore[import-untyped]  # untyped
        from pysnmp.hlapi.v3arch import asyncio as hl

        auth = _credentials(cfg)
        engine = hl.SnmpEngine()
        try:
            target = await hl.UdpTransportTarget.create(
                (cfg.host, cfg.port), timeout=cfg.timeout_s, retries=cfg.retries)
        except PySnmpError as exc:  # DNS: the name does not resolve (now)
            engine.close_dispatcher()
            raise SnmpUnavailable(f"cannot resolve {cfg.host}: {exc}", "unreachable") from None
        return cls(cfg, engine, target, auth)

    async def aclose(self) -> None:
        """Close the engine and its socket; idempotent, and safe while a request is in flight.

        pysnmp hands each datagram read to its dispatcher through ``loop.call_soon``; one read
        in the loop turn before the dispatcher closes (a duplicated answer: an agent answering
        both a request and its retry) then meets an unregistered transport, and asyncio logs a
        CarrierError. So: stop reading first, let what was already read through while the
        transport is registered (one loop turn), then close."""
        carrier = getattr(self._target, "transport", None)  # set once a request was sent
        udp = getattr(carrier, "transport", None)  # its asyncio DatagramTransport
        try:
            if udp is not None:
                udp.close()
            await asyncio.sleep(0)
        finally:
            self._engine.close_dispatcher()

    def _check(self, error_indication: Any) -> None:
        if not error_indication:
            return
        kind = type(error_indication).__name__
        if kind in AUTH_REPORTS:
            raise SnmpAuthFailed(f"SNMPv{self.cfg.version} authentication failed "
                                 f"({AUTH_REPORTS[kind]})")
        if kind == "RequestTimedOut":
            raise SnmpUnavailable(NO_ANSWER_HINT[self.cfg.version])
        raise SnmpUnavailable(f"SNMP error: {error_indication}", "snmp_error")

    async def _request(self, kind: str, oids: Sequence[str]) -> tuple[int, list[tuple[str, Any]]]:
        """One GET or GETNEXT: (errorStatus, [(oid, plain value)])."""
        from pysnmp.hlapi.v3arch import asyncio as hl

        command = hl.get_cmd if kind == "get" else hl.next_cmd
        objects = [hl.ObjectType(hl.ObjectIdentity(oid)) for oid in oids]
        try:
            error_indication, error_status, _index, var_binds = await command(
                self._engine, self._auth, self._target, hl.ContextData(), *objects,
                lookupMib=False)
        except OSError as exc:  # the socket: network unreachable, ...
            raise SnmpUnavailable(f"SNMP request failed: {exc}", "unreachable") from None
        self._check(error_indication)
        return int(error_status or 0), [(str(name), _plain(value)) for name, value in var_binds]

    async def get(self, oids: Sequence[str]) -> tuple[int, dict[str, Any]]:
        """GET in chunks: (first non-zero errorStatus or 0, {oid: value})."""
        values: dict[str, Any] = {}
        status = 0
        for start in range(0, len(oids), GET_CHUNK):
            err, pairs = await self._request("get", oids[start:start + GET_CHUNK])
            status = status or err
            if not err:
                values.update(pairs)
        return status, values

    async def walk(self, columns: Sequence[str], max_rows: int
                   ) -> tuple[int, dict[tuple[int, ...], list[Any]], bool]:
        """Walk table columns side by side with GETNEXT (one request per row): (errorStatus,
        {row index: [value per column]}, truncated). Rows stop where the first column ends."""
        rows: dict[tuple[int, ...], list[Any]] = {}
        prefixes = [tuple(int(p) for p in c.split(".")) for c in columns]
        cursor = list(columns)
        while len(rows) < max_rows:
            status, pairs = await self._request("next", cursor)
            if status or len(pairs) != len(columns):
                return status, rows, False
            first = tuple(int(p) for p in pairs[0][0].split("."))
            if first[:len(prefixes[0])] != prefixes[0] or pairs[0][1] is MISSING:
                return 0, rows, False
            index = first[len(prefixes[0]):]
            row: list[Any] = []
            for (oid, value), prefix in zip(pairs, prefixes, strict=True):
                parts = tuple(int(p) for p in oid.split("."))
                same = parts[:len(prefix)] == prefix and parts[len(prefix):] == index
                row.append(value if same else MISSING)
            if index in rows or not index:  # not increasing: a broken agent; stop here
                return 0, rows, False
            rows[index] = row
            cursor = [f"{c}.{'.'.join(map(str, index))}" for c in columns]
        status, pairs = await self._request("next", cursor[:1])
        more = not status and bool(pairs) and \
            pairs[0][0].startswith(columns[0] + ".") and pairs[0][1] is not MISSING
        return 0, rows, more


# ---------------------------------------------------------------------------- the source


class SnmpSource(SupervisedSource):
    """Polls one SNMP agent every `poll_interval_s`; id ``snmp.<name>``."""

    kind = "snmp"
    log_ns = "snmp"

    def __init__(self, cfg: SnmpConfig, clock: Clock) -> None:
        super().__init__(cfg.name, clock, where=cfg.where, backoff_base_s=cfg.backoff_base_s,
                         backoff_cap_s=cfg.backoff_cap_s)
        self.cfg = cfg
        self._previous: dict[str, Value] = {}  # states last reported, kept across sessions
        self._missing_logged: set[str] = set()  # OIDs whose absence was logged (bounded by cfg)
        self._gates = LogGates(clock.monotonic)

    async def session(self) -> None:
        try:
            client = await SnmpClient.open(self.cfg)
            try:
                while True:
                    readings = await self.poll(client)
                    await self.connected()
                    await self.emit_many(readings)
                    await asyncio.sleep(self.cfg.poll_interval_s)
            finally:
                await client.aclose()
        except SnmpUnavailable as exc:
            self.health.count(exc.counter)
            raise

    async def poll(self, client: SnmpClient) -> list[Reading]:
        """One round of requests -> the readings of this poll (raises `SnmpUnavailable`)."""
        cfg = self.cfg
        wanted: list[str] = [o.oid for o in cfg.oids]
        if cfg.profile == "ups-mib":
            wanted += UPS_GET
        elif cfg.profile == "pdu-outlets":
            wanted += [t[0] for t in PDU_TELEMETRY]
        values = await self._get(client, wanted)
        readings = self._configured(values, self.clock.time())
        if cfg.profile == "ups-mib":
            alarms = await self._ups_alarms(client, values)
            readings += ups_readings(values, alarms, self._previous, self.name,
                                     self.clock.time())
        elif cfg.profile == "pdu-outlets":
            outlets = await self._outlets(client)
            readings += pdu_readings(values, outlets, self._previous, self.name,
                                     self.clock.time())
        return readings

    async def _get(self, client: SnmpClient, oids: list[str]) -> dict[str, Any]:
        status, values = await client.get(oids)
        if status:
            self._error_status(status, "get")
        present: dict[str, Any] = {}
        for oid, value in values.items():
            if value is MISSING:
                self._missing(oid)
            elif oid in RANGES and not _in_range(value, *RANGES[oid]):
                self._bad_value(oid, value)
            else:
                present[oid] = value
        return present

    def _configured(self, values: Mapping[str, Any], ts: float | None) -> list[Reading]:
        readings: list[Reading] = []
        for o in self.cfg.oids:
            if o.oid not in values:
                continue
            raw = values[o.oid]
            if isinstance(raw, int):
                readings.append(Reading(self.name, o.name, _number(raw, o.scale), o.unit, ts,
                                        o.priority))
            elif isinstance(raw, str):
                readings.append(Reading(self.name, o.name, raw[:256], None, ts, o.priority))
            else:
                self._bad_value(o.oid, raw)
        return readings

    async def _ups_alarms(self, client: SnmpClient, values: Mapping[str, Any]
                          ) -> frozenset[int] | None:
        """The upsWellKnownAlarms present; empty without a walk when upsAlarmsPresent is 0."""
        if _int(values, UPS_ALARMS_PRESENT) == 0:
            return frozenset()
        status, rows, _more = await client.walk([UPS_ALARM_DESCR], max_rows=64)
        if status:
            self._error_status(status, "upsAlarmTable")
            return None
        found: set[int] = set()
        for (descr,) in rows.values():
            if isinstance(descr, tuple) and descr[:-1] == UPS_WELL_KNOWN_ALARMS:
                found.add(descr[-1])
            elif descr is not MISSING and not isinstance(descr, tuple):
                self._bad_value(UPS_ALARM_DESCR, descr)
        return frozenset(found)

    async def _outlets(self, client: SnmpClient) -> list[OutletRow]:
        status, rows, more = await client.walk(OUTLET_COLUMNS, self.cfg.max_outlets)
        if status:
            self._error_status(status, "rPDUOutletStatusTable")
        if more:
            self.health.count("truncated")
            self._log_gated("truncated", "snmp.outlets_truncated", max_outlets=self.cfg.max_outlets)
        if not rows and not status:
            self._missing(OUTLET_STATE)
        outlets: list[OutletRow] = []
        for index, (name, state, load) in rows.items():
            if len(index) != 1:
                self._bad_value(OUTLET_STATE, index)
                continue
            if state is MISSING:
                self._missing(f"{OUTLET_STATE}.{index[0]}")
                state = None
            elif not _in_range(state, 1, 2):  # on(1) off(2)
                self._bad_value(f"{OUTLET_STATE}.{index[0]}", state)
                state = None
            if load is not MISSING and not _in_range(load, -1, INT32_MAX):  # -1: not metered
                self._bad_value(f"{OUTLET_LOAD}.{index[0]}", load)
                load = None
            outlets.append(OutletRow(index[0], _label(name), state,
                                     load if isinstance(load, int) else None))
        return outlets

    # -- counted, bounded logging -------------------------------------------------------------

    def _missing(self, oid: str) -> None:
        self.health.count("no_such_object")
        if oid not in self._missing_logged:
            self._missing_logged.add(oid)
            self.log.warning("snmp.no_such_object", oid=oid, at=self.where)

    def _bad_value(self, oid: str, value: Any) -> None:
        self.health.count("bad_value")
        # one gate per OID (a fixed or configured set): each faulty object gets named
        self._log_gated(f"bad_value {oid}", "snmp.bad_value", oid=oid, value=repr(value)[:80])

    def _error_status(self, status: int, what: str) -> None:
        # e.g. authorizationError(16): the view does not include the object; genErr(5)
        self.health.count("error_status")
        self._log_gated("error_status", "snmp.error_status", status=status, request=what)

    def _log_gated(self, key: str, event: str, **fields: Any) -> None:
        held = self._gates.open(key)
        if held is not None:
            self.log.warning(event, at=self.where, suppressed=held, **fields)


def build_sources(configs: Sequence[SnmpConfig], ctx: SourceContext) -> list[Source]:
    """One source per configured SNMP agent."""
    return [SnmpSource(c, ctx.clock) for c in configs]


# ---------------------------------------------------------------------------- doctor


async def check_reachable(cfg: SnmpConfig, limit: float = 5.0) -> Reachability:
    """One GET of sysDescr.0 and sysUpTime.0 with the configured credentials: is the agent
    reachable and does it accept them? Never raises; never names a secret."""
    where = f"snmp.{cfg.name} ({cfg.where}, SNMPv{cfg.version})"
    try:
        async with asyncio.timeout(limit):
            client = await SnmpClient.open(cfg)
            try:
                status, values = await client.get([SYS_DESCR, SYS_UPTIME])
            finally:
                await client.aclose()
    except SnmpAuthFailed as exc:
        return Reachability(False, f"{where}: {exc}",
                            "check user, auth/priv protocols and keys against the device's "
                            "SNMPv3 settings")
    except SnmpUnavailable as exc:
        return Reachability(False, f"{where}: {exc}",
                            "check host/port, that SNMP is enabled on the device, the "
                            "community (v2c) or priv key (v3), and the egress rules (UDP)")
    except TimeoutError:
        return Reachability(False, f"{where}: no answer within {limit:g} s",
                            "check host/port and that SNMP is enabled on the device")
    if status:
        return Reachability(False, f"{where}: answered with error-status {status}",
                            "give the community/user read access to the system group")
    descr = values.get(SYS_DESCR)
    uptime = values.get(SYS_UPTIME)
    text = _label(descr) or "?"
    up = f", up {uptime // 100} s" if isinstance(uptime, int) else ""
    return Reachability(True, f"{where}: {text}{up}")
