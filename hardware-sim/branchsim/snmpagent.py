"""A simulated SNMP UPS + PDU: Debian's real snmpd on 127.0.0.1:<free UDP port>, serving the
UPS-MIB (RFC 1628) and APC's PowerNet rPDU outlet status table from a JSON file the simulator
rewrites, so a test or a scenario changes what the device reports while snmpd runs.

Real snmpd, not a Python agent: the driver then meets net-snmp's own SNMPv3 engine (engine id
discovery, USM reports such as usmStatsWrongDigests, community checks that just drop the
request), which is what a UPS network card or a PDU runs.

snmpd runs with only our config (``-C -c snmpd.conf``), in the foreground (``-f``), logging to a
file (``-Lf``), with its persistent dir (engine boots, the v3 user) in `dir`. The two subtrees
are served by ``pass_persist`` with this very file run as a script (``--pass-persist``): it
reads ``values.json`` (OID -> [type, value]) on every request, so a write by `set_ups` /
`set_outlet` (atomic: temp file + rename) shows at the next poll.

Served objects (numeric OIDs; units as the MIBs define them):

- UPS-MIB ``1.3.6.1.2.1.33.1``: upsIdentManufacturer/Model, upsBatteryStatus (2 normal,
  3 low, 4 depleted), upsSecondsOnBattery (s), upsEstimatedMinutesRemaining (min),
  upsEstimatedChargeRemaining (%), upsBatteryVoltage (0.1 V), upsBatteryTemperature (C),
  upsInputFrequency.1 (0.1 Hz), upsInputVoltage.1 (V), upsOutputSource (3 normal, 4 bypass,
  5 battery), upsOutputVoltage.1 (V), upsOutputPercentLoad.1 (%), upsAlarmsPresent and the
  upsAlarmTable (upsAlarmDescr = a well-known alarm OID, e.g. upsAlarmBatteryBad).
- PowerNet-MIB (APC rack PDU, ``1.3.6.1.4.1.318.1.1.12``): rPDUIdentDevicePowerWatts.0 (W),
  rPDULoadStatusLoad.1 (0.1 A), and rPDUOutletStatusTable: OutletName (.2), OutletState (.4:
  1 on, 2 off), Load (.7, 0.1 A).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from branchsim.procs import terminate

__all__ = [
    "OUTLETS",
    "SNMPD",
    "UPS_ALARMS",
    "Outlet",
    "SnmpAgentSim",
    "find_snmpd",
    "free_udp_port",
]

SNMPD = "/usr/sbin/snmpd"
OUTLETS = 8  # the simulated PDU's outlets, numbered from 1

UPS_MIB = "1.3.6.1.2.1.33.1"
APC_RPDU = "1.3.6.1.4.1.318.1.1.12"
# RFC 1628 upsWellKnownAlarms (1.3.6.1.2.1.33.1.6.3.N): the ones the simulator can raise.
UPS_ALARMS: dict[str, int] = {
    "battery_bad": 1,  # upsAlarmBatteryBad: a battery needs replacing
    "on_battery": 2,
    "low_battery": 3,
    "general_fault": 18,
    "shutdown_pending": 22,
    "test_in_progress": 24,
}

DEFAULT_UPS: dict[str, Any] = {
    "manufacturer": "SimPower",
    "model": "SP-1500",
    "battery_status": 2,  # batteryNormal
    "seconds_on_battery": 0,
    "minutes_remaining": 42,
    "charge_remaining": 100,
    "battery_voltage_dv": 272,  # 27.2 V
    "battery_temperature": 31,
    "input_frequency_dhz": 500,  # 50.0 Hz
    "input_voltage": 230,
    "output_source": 3,  # normal
    "output_voltage": 230,
    "output_load": 35,
    "alarms": [],  # names from UPS_ALARMS
}


def find_snmpd() -> str | None:
    """snmpd's path when Debian's snmpd is installed."""
    return SNMPD if os.access(SNMPD, os.X_OK) else None


def free_udp_port() -> int:
    """A UDP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Outlet:
    name: str
    on: bool = True
    current_da: int = 5  # 0.5 A, in tenths of an ampere as rPDUOutletStatusLoad


@dataclass
class SnmpAgentSim:
    """snmpd serving a UPS and an 8-outlet PDU. `community` is the v2c read community; `user`
    has SHA-256 authentication and AES-128 privacy with `auth_key` / `priv_key`."""

    dir: Path
    port: int = 0
    community: str = "branch-ro"
    user: str = "agent"
    auth_key: str = "auth-secret-1"
    priv_key: str = "priv-secret-1"
    ups: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_UPS))
    outlets: list[Outlet] = field(
        default_factory=lambda: [Outlet(f"outlet-{i}") for i in range(1, OUTLETS + 1)]
    )
    # OIDs left out on purpose (a device that lacks an object): served as noSuchObject
    hidden: set[str] = field(default_factory=set)
    # OIDs served as given (type, value) whatever the device state says: a device that gets it
    # wrong (a string where the MIB says INTEGER, an enum number the MIB does not define)
    served: dict[str, tuple[str, Any]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_udp_port()
        (self.dir / "persist").mkdir(exist_ok=True)
        self.values = self.dir / "values.json"
        self.log = self.dir / "snmpd.log"
        self.conf = self.dir / "snmpd.conf"
        helper = f"{sys.executable} {Path(__file__).resolve()} --pass-persist {self.values}"
        self.conf.write_text("\n".join([
            f"agentaddress udp:127.0.0.1:{self.port}",
            f"rocommunity {self.community} 127.0.0.1",
            f'createUser {self.user} SHA-256 "{self.auth_key}" AES "{self.priv_key}"',
            f"rouser {self.user} authpriv",
            "sysDescr branchsim UPS/PDU (net-snmp)",
            "sysLocation branch lab",
            "sysContact ops@example.invalid",
            f"pass_persist .{UPS_MIB} {helper}",
            f"pass_persist .{APC_RPDU} {helper}",
            "",
        ]))
        self.write_values()

    # -- what the device reports -------------------------------------------------------------

    def set_ups(self, **changes: Any) -> None:
        """Change UPS values (keys of DEFAULT_UPS); the next poll sees them."""
        unknown = set(changes) - set(DEFAULT_UPS)
        if unknown:
            raise ValueError(f"unknown UPS values: {sorted(unknown)}; known: {sorted(DEFAULT_UPS)}")
        self.ups.update(changes)
        self.write_values()

    def set_outlet(self, number: int, *, on: bool | None = None,
                   current_da: int | None = None) -> None:
        """Switch outlet `number` (1-based) or change its current (tenths of an ampere)."""
        outlet = self.outlets[number - 1]
        if on is not None:
            outlet.on = on
        if current_da is not None:
            outlet.current_da = current_da
        self.write_values()

    def hide(self, *oids: str) -> None:
        """Stop serving these OIDs (the device does not have them: noSuchObject)."""
        self.hidden.update(o.lstrip(".") for o in oids)
        self.write_values()

    def serve(self, oid: str, type_: str, value: Any) -> None:
        """Serve `oid` as this pass_persist type (integer, gauge, string, objectid ...) and
        value, in place of what the simulated state says."""
        self.served[oid.lstrip(".")] = (type_, value)
        self.write_values()

    def apply(self, step: Mapping[str, Any]) -> None:
        """A scenario step: ``{"set": {ups values}, "outlets": {"3": {"on": false}}}``, and
        ``"snmpd": "stop" | "start"`` (no answer meanwhile; starting a running one is a no-op)."""
        if "set" in step:
            self.set_ups(**step["set"])
        for number, change in dict(step.get("outlets", {})).items():
            self.set_outlet(int(number), **change)
        if step.get("snmpd") == "stop":
            self.stop()
        elif step.get("snmpd") == "start" and not self.running:
            self.start()

    def oid_values(self) -> dict[str, tuple[str, Any]]:
        """OID -> (pass_persist type, value) for everything served."""
        u = self.ups
        v: dict[str, tuple[str, Any]] = {
            f"{UPS_MIB}.1.1.0": ("string", u["manufacturer"]),
            f"{UPS_MIB}.1.2.0": ("string", u["model"]),
            f"{UPS_MIB}.2.1.0": ("integer", u["battery_status"]),
            f"{UPS_MIB}.2.2.0": ("integer", u["seconds_on_battery"]),
            f"{UPS_MIB}.2.3.0": ("integer", u["minutes_remaining"]),
            f"{UPS_MIB}.2.4.0": ("integer", u["charge_remaining"]),
            f"{UPS_MIB}.2.5.0": ("integer", u["battery_voltage_dv"]),
            f"{UPS_MIB}.2.7.0": ("integer", u["battery_temperature"]),
            f"{UPS_MIB}.3.2.0": ("integer", 1),  # upsInputNumLines
            f"{UPS_MIB}.3.3.1.1.1": ("integer", 1),  # upsInputLineIndex.1
            f"{UPS_MIB}.3.3.1.2.1": ("integer", u["input_frequency_dhz"]),
            f"{UPS_MIB}.3.3.1.3.1": ("integer", u["input_voltage"]),
            f"{UPS_MIB}.4.1.0": ("integer", u["output_source"]),
            f"{UPS_MIB}.4.3.0": ("integer", 1),  # upsOutputNumLines
            f"{UPS_MIB}.4.4.1.1.1": ("integer", 1),  # upsOutputLineIndex.1
            f"{UPS_MIB}.4.4.1.2.1": ("integer", u["output_voltage"]),
            f"{UPS_MIB}.4.4.1.5.1": ("integer", u["output_load"]),
            f"{UPS_MIB}.6.1.0": ("gauge", len(u["alarms"])),
        }
        for i, name in enumerate(u["alarms"], start=1):
            v[f"{UPS_MIB}.6.2.1.1.{i}"] = ("integer", i)
            v[f"{UPS_MIB}.6.2.1.2.{i}"] = ("objectid", f".{UPS_MIB}.6.3.{UPS_ALARMS[name]}")
            v[f"{UPS_MIB}.6.2.1.3.{i}"] = ("timeticks", 100 * i)
        total = sum(o.current_da for o in self.outlets if o.on)
        v[f"{APC_RPDU}.1.16.0"] = ("integer", total * 23)  # rPDUIdentDevicePowerWatts, 230 V
        v[f"{APC_RPDU}.2.3.1.1.2.1"] = ("gauge", total)  # rPDULoadStatusLoad.1
        row = f"{APC_RPDU}.3.5.1.1"
        for n, o in enumerate(self.outlets, start=1):
            v[f"{row}.1.{n}"] = ("integer", n)
            v[f"{row}.2.{n}"] = ("string", o.name)
            v[f"{row}.4.{n}"] = ("integer", 1 if o.on else 2)
            v[f"{row}.7.{n}"] = ("gauge", o.current_da if o.on else 0)
        v.update(self.served)
        return {k: x for k, x in v.items() if k not in self.hidden}

    def write_values(self) -> None:
        doc = {oid: list(tv) for oid, tv in self.oid_values().items()}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".values-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.values)

    # -- the process ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> SnmpAgentSim:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {
            **os.environ,
            "SNMP_PERSISTENT_DIR": str(self.dir / "persist"),
            "SNMPCONFPATH": str(self.dir),  # never /etc/snmp
            "MIBS": "",  # numeric OIDs only: no MIB parsing at start
        }
        mark = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            # -A: append to the log; without it snmpd truncates the file at start, so after a
            # restart the version line sits before `mark` and the wait below never sees it
            [SNMPD, "-f", "-A", "-C", "-c", str(self.conf), "-Lf", str(self.log),
             "-p", str(self.dir / "snmpd.pid")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + timeout
        # snmpd logs its version line once its listening sockets are open
        while b"NET-SNMP version" not in self._log_bytes(mark):
            if self.proc.poll() is not None:
                raise RuntimeError(f"snmpd exited with {self.proc.returncode}:\n"
                                   + self._log_bytes(mark).decode(errors="replace"))
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"snmpd did not start on udp:127.0.0.1:{self.port}")
            time.sleep(0.02)  # polling interval of a condition wait, not a fixed delay
        return self

    def _log_bytes(self, mark: int) -> bytes:
        try:
            with self.log.open("rb") as f:
                f.seek(mark)
                return f.read()
        except FileNotFoundError:
            return b""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (snmpd saves its persistent state), SIGKILL if it hangs; idempotent."""
        terminate(self.proc, timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def agent_config(self, version: str = "2c") -> dict[str, Any]:
        """A ``[[sources.snmp]]`` entry (without name/profile) that reaches this agent."""
        base: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "version": version}
        if version == "2c":
            return {**base, "community": self.community}
        return {**base, "user": self.user, "auth_protocol": "SHA-256",
                "auth_key": self.auth_key, "priv_protocol": "AES", "priv_key": self.priv_key}

    def __enter__(self) -> SnmpAgentSim:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- the pass_persist helper (runs inside snmpd, one process per subtree) ------------------------


def _oid_key(oid: str) -> tuple[int, ...]:
    return tuple(int(p) for p in oid.strip(".").split(".") if p)


def pass_persist(values: Path) -> None:
    """net-snmp's pass_persist protocol on stdin/stdout: PING -> PONG; get/getnext + OID ->
    OID, type, value (or NONE); set -> not-writable."""
    stdin, out = sys.stdin, sys.stdout
    while line := stdin.readline():
        cmd = line.strip().lower()
        if cmd == "ping":
            out.write("PONG\n")
        elif cmd in ("get", "getnext"):
            oid = _oid_key(stdin.readline())
            try:
                table = {_oid_key(k): v for k, v in json.loads(values.read_text()).items()}
            except (OSError, ValueError):
                table = {}
            if cmd == "get":
                found = oid if oid in table else None
            else:
                found = min((k for k in table if k > oid), default=None)
            if found is None:
                out.write("NONE\n")
            else:
                type_, value = table[found]
                out.write(f".{'.'.join(map(str, found))}\n{type_}\n{value}\n")
        elif cmd == "set":
            stdin.readline()
            stdin.readline()
            out.write("not-writable\n")
        else:
            out.write("NONE\n")
        out.flush()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--pass-persist":
        pass_persist(Path(sys.argv[2]))
    else:
        sys.exit("usage: snmpagent.py --pass-persist VALUES_JSON")
