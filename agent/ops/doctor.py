"""`branch-agent doctor`: is everything right on this gateway? Each check passes, warns or
fails, and every warning or failure carries a one-line fix for the installer.

Checks, in order: the config is valid; the signing key is there with mode 0600; the state dir is
writable with free space above the outbox quota; the clock is synchronised; the GPIO chip is
accessible; each configured serial port is present and opens (pyserial); the BLE adapter is
present and powered (BlueZ over D-Bus); the MQTT broker is reachable, the TLS handshake succeeds
with the configured CA and client certificate, the certificate is in date (a warning 30 days
before it expires, and while a renewal waits in tls/next/), and an MQTT CONNECT is answered; the
CoAP platform answers a probe; the installed files match the integrity manifest written at
provisioning (agent.integrity). Exit code: 0 all pass, 1 warnings, 2 failures.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import glob
import json
import os
import shutil
import socket
import ssl
import stat
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.config import AgentConfig, load_config
from agent.core.clock import sync_probe
from agent.core.errors import ConfigError
from agent.security.integrity import MANIFEST_PATH, verify_manifest

__all__ = [
    "CERT_WARN_DAYS",
    "Check",
    "Status",
    "check_ble",
    "check_certificate",
    "check_clock",
    "check_coap",
    "check_gpio",
    "check_integrity",
    "check_mqtt",
    "check_serial",
    "check_signing_key",
    "check_state_dir",
    "exit_code",
    "run_checks",
]

log = structlog.get_logger(__name__)

CERT_WARN_DAYS = 30
RENEW_FIX = ("`branch-agent provision --renew`, then send tls/next/client.csr and "
             "client.csr.cose to the bank's CA (docs/OPERATIONS.md, certificate renewal)")
BLUEZ = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"


class Status(enum.StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"  # nothing configured that this check applies to


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        d = asdict(self)
        d["status"] = str(self.status)
        return d


def _ok(name: str, detail: str) -> Check:
    return Check(name, Status.PASS, detail)


def _warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, Status.WARN, detail, fix)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, Status.FAIL, detail, fix)


def exit_code(checks: Iterable[Check]) -> int:
    statuses = {c.status for c in checks}
    if Status.FAIL in statuses:
        return 2
    return 1 if Status.WARN in statuses else 0


# --------------------------------------------------------------------------- files and host


def _mode_problem(path: Path) -> int | None:
    """The file's mode if group or others have any access to it, else None."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode if mode & 0o077 else None


def check_config(path: Path) -> tuple[Check, AgentConfig | None]:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        problems = "; ".join(exc.problems[:5]) or str(exc)
        return _fail("config", f"{path}: {problems}",
                     f"edit {path} (every key: config/example.toml), then "
                     f"`branch-agent check-config {path}`"), None
    return _ok("config", f"{path} is valid (gateway {cfg.gateway.id})"), cfg


def check_signing_key(cfg: AgentConfig) -> Check:
    from agent.protocol import kid_for
    from agent.security.keys import KeyFileError, load_private_key

    path = cfg.gateway.key_file
    name = "signing key"
    if not path.exists():
        return _fail(name, f"{path} does not exist",
                     f"run `branch-agent provision` or `branch-agent keygen --dir {path.parent}`")
    bad = _mode_problem(path)
    if bad is not None:
        return _fail(name, f"{path} has mode {bad:04o}; the agent refuses it",
                     f"chmod 600 {path}")
    try:
        key = load_private_key(path)
    except KeyFileError as exc:
        return _fail(name, str(exc), "restore the gateway's key from its backup, or provision a "
                     "new identity and register it with the platform")
    return _ok(name, f"{path} (0600), kid {kid_for(key.public_key()).hex()}")


def check_state_dir(cfg: AgentConfig) -> Check:
    d = cfg.gateway.state_dir
    name = "state dir"
    probe = d if d.exists() else next((p for p in d.parents if p.exists()), Path("/"))
    try:
        if d.exists():
            with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-"):
                pass
        elif not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot create {d} in {probe}")
    except OSError as exc:
        return _fail(name, f"{d} is not writable: {exc}",
                     f"the unit's StateDirectory= creates it; else: install -d -m 0700 -o "
                     f"branch-agent {d}")
    free = shutil.disk_usage(probe).free
    db = cfg.outbox_path
    used = db.stat().st_size if db.exists() else 0
    quota = cfg.outbox.quota_bytes
    detail = f"{d}: {free // 2**20} MiB free, outbox quota {quota // 2**20} MiB"
    if free + used < quota:
        return _warn(name, detail + " (less free space than the quota)",
                     "free space on the SD card, or lower outbox.quota_bytes")
    return _ok(name, detail)


def check_clock(cfg: AgentConfig) -> Check:
    mode = cfg.gateway.time_sync
    if sync_probe(mode)():
        return _ok("clock", f"synchronised (time_sync = {mode})")
    return _fail("clock", f"not synchronised (time_sync = {mode}): events would carry "
                 "unsynchronised time",
                 "check NTP: `timedatectl timesync-status` (UDP 123 to the bank's NTP server "
                 "must be open)")


def check_gpio(cfg: AgentConfig) -> Check:
    gpio: Any = getattr(cfg.sources, "gpio", None)  # the GPIO driver's table, when configured
    name = "gpio"
    if gpio is None or not getattr(gpio, "enabled", True) or not getattr(gpio, "inputs", None):
        return Check(name, Status.SKIP, "no GPIO inputs configured")
    if getattr(gpio, "pin_factory", "default") == "mock":
        return _ok(name, "simulated (pin_factory = mock)")
    chips = sorted(glob.glob("/dev/gpiochip*"))
    if not chips:
        return _fail(name, "no /dev/gpiochip* on this machine",
                     "is this a Raspberry Pi with GPIO enabled? `ls /dev/gpiochip*`")
    denied = [c for c in chips if not os.access(c, os.R_OK | os.W_OK)]
    if denied:
        return _fail(name, f"cannot open {', '.join(denied)}",
                     "add the agent's user to the gpio group (the sysusers.d snippet does)")
    return _ok(name, f"{', '.join(chips)} accessible")


def _serial_ports(cfg: AgentConfig) -> list[tuple[str, Any]]:
    ser = cfg.sources.serial
    out: list[tuple[str, Any]] = []
    for kind in ("ups", "modbus", "line"):
        for dev in getattr(ser, kind, []):
            out.append((f"{kind}.{dev.name}", dev))
    return out


def check_serial(cfg: AgentConfig) -> list[Check]:
    import serial

    checks: list[Check] = []
    for source, dev in _serial_ports(cfg):
        name = f"serial {source}"
        port = str(dev.port)
        if "://" not in port and not os.path.exists(port):
            checks.append(_fail(name, f"{port} does not exist",
                                "plug the device's USB adapter in (`ls -l /dev/serial/by-id/`) "
                                f"or fix the port of {source} in the config"))
            continue
        try:
            s = serial.serial_for_url(port, baudrate=dev.baudrate, timeout=0)
            s.close()
        except (serial.SerialException, OSError, ValueError) as exc:
            denied = isinstance(exc, PermissionError) or "ermission" in str(exc)
            fix = ("add the agent's user to the dialout group (the sysusers.d snippet does)"
                   if denied else "check the cable and that no other program holds the port "
                   f"(`fuser {port}`)")
            checks.append(_fail(name, f"{port} does not open: {exc}", fix))
            continue
        checks.append(_ok(name, f"{port} opens at {dev.baudrate} baud"))
    if not checks:
        checks.append(Check("serial", Status.SKIP, "no serial devices configured"))
    return checks


# --------------------------------------------------------------------------- devices over IP


async def check_ip_devices(cfg: AgentConfig, limit: float = 5.0) -> list[Check]:
    """Each NUT server, SNMP agent and Modbus TCP device answers (concurrently: a dead device
    costs its own timeout, not the sum of all)."""
    jobs: list[tuple[str, Any]] = []
    if cfg.sources.nut:
        from drivers import nut

        jobs += [(f"nut {c.name}", nut.check_reachable(c)) for c in cfg.sources.nut]
    if cfg.sources.snmp:
        from drivers import snmp

        jobs += [(f"snmp {c.name}", snmp.check_reachable(c, limit)) for c in cfg.sources.snmp]
    if cfg.sources.modbus_tcp:
        from drivers.modbus_tcp import source as modbus_tcp

        jobs += [(f"modbus_tcp {c.name}", modbus_tcp.check_reachable(c))
                 for c in cfg.sources.modbus_tcp]
    if not jobs:
        return [Check("ip devices", Status.SKIP, "no NUT, SNMP or Modbus TCP devices configured")]
    found = await asyncio.gather(*(job for _, job in jobs))
    return [_ok(name, r.detail) if r.ok else _fail(name, r.detail, r.fix)
            for (name, _), r in zip(jobs, found, strict=True)]


# --------------------------------------------------------------------------- BLE


async def check_ble(ble: Any, limit: float = 5.0) -> Check:
    """The adapter (ble.adapter, or any) is on BlueZ's D-Bus and powered. `ble` is the BLE
    driver's config table, or None when BLE is not configured."""
    name = "ble adapter"
    if ble is None or not (getattr(ble, "sensors", None)
                           or getattr(getattr(ble, "presence", None), "enabled", False)):
        return Check(name, Status.SKIP, "no BLE sensors configured")
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    want: str | None = getattr(ble, "adapter", None)
    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), limit)
    except (OSError, TimeoutError, ValueError) as exc:
        return _fail(name, f"cannot reach the D-Bus system bus: {exc}",
                     "is dbus running? `systemctl status dbus`")
    try:
        reply = await asyncio.wait_for(bus.call(Message(
            destination=BLUEZ, path="/", interface="org.freedesktop.DBus.ObjectManager",
            member="GetManagedObjects")), limit)
    except TimeoutError:
        return _fail(name, "BlueZ did not answer", "`systemctl restart bluetooth`")
    finally:
        bus.disconnect()
    if reply is None or reply.message_type == MessageType.ERROR:
        err = reply.error_name if reply is not None else "no reply"
        return _fail(name, f"BlueZ is not on the system bus ({err})",
                     "`systemctl enable --now bluetooth`")
    adapters = {
        path.rsplit("/", 1)[-1]: ifaces[ADAPTER_IFACE]
        for path, ifaces in reply.body[0].items()
        if ADAPTER_IFACE in ifaces
    }
    if want is not None:
        adapters = {k: v for k, v in adapters.items() if k == want}
    if not adapters:
        return _fail(name, f"no Bluetooth adapter{f' {want}' if want else ''} found",
                     "check the adapter: `bluetoothctl list`, `rfkill list`, `dmesg | grep -i "
                     "bluetooth`")
    powered = [k for k, props in adapters.items() if props.get("Powered") is not None
               and bool(props["Powered"].value)]
    if not powered:
        return _fail(name, f"{', '.join(adapters)} present but not powered",
                     "`rfkill unblock bluetooth && bluetoothctl power on`")
    return _ok(name, f"{', '.join(powered)} present and powered")


# --------------------------------------------------------------------------- uplinks


def _tls_context(tls: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def check_certificate(tls: Any, now: dt.datetime) -> list[Check]:
    """The TLS files exist, the key is private, the certificate is for the key and in date
    (warning CERT_WARN_DAYS before expiry), and no renewal waits in tls/next/."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    checks: list[Check] = []
    for label, path in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
        if not Path(path).exists():
            checks.append(_fail(f"mqtt tls {label}", f"{path} does not exist",
                                "copy the bank's CA (ca.pem) and the certificate it issued for "
                                "tls/client.csr (client.pem) to /etc/branch-agent/tls/"))
    if checks:
        return checks
    bad = _mode_problem(Path(tls.key))
    if bad is not None:
        checks.append(_fail("mqtt tls key", f"{tls.key} has mode {bad:04o}",
                            f"chmod 600 {tls.key}"))
    cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    name = "mqtt certificate"
    left = cert.not_valid_after_utc - now
    subject = cert.subject.rfc4514_string()
    key = serialization.load_pem_private_key(Path(tls.key).read_bytes(), password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        checks.append(_fail(name, f"{tls.cert} was not issued for the key {tls.key}",
                            "install the certificate the CA issued for this gateway's CSR"))
    elif cert.not_valid_before_utc > now:
        checks.append(_fail(name, f"{subject} is not valid before {cert.not_valid_before_utc}",
                            "the clock is wrong, or the CA post-dated it: check `timedatectl`"))
    elif left.total_seconds() <= 0:
        checks.append(_fail(name, f"{subject} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                            RENEW_FIX))
    elif left.days < CERT_WARN_DAYS:
        checks.append(_warn(name, f"{subject} expires in {left.days} days", RENEW_FIX))
    else:
        checks.append(_ok(name, f"{subject} valid until {cert.not_valid_after_utc:%Y-%m-%d} "
                          f"({left.days} days)"))
    pending = Path(tls.key).parent / "next" / "client.key"
    if pending.exists():
        checks.append(_warn("mqtt renewal", f"a renewed key waits in {pending.parent}",
                            "install the certificate the CA issued for "
                            f"{pending.parent / 'client.csr'}: `branch-agent provision "
                            "--install-cert CERT`"))
    return checks


def _mqtt_connect(mq: Any, gw: str, ctx: ssl.SSLContext | None, timeout: float) -> str | None:
    """One MQTT CONNECT round trip; None on CONNACK success, else the reason."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    result: dict[str, str | None] = {"error": "no CONNACK within the timeout"}

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        result["error"] = None if not rc.is_failure else f"broker refused: {rc}"
        done.set()

    # A client id of its own: taking over the agent's session would disconnect the agent.
    client_id = f"{mq.client_id or f'branch-agent-{gw}'}-doctor"
    v5 = mq.protocol == "v5"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
    client.on_connect = on_connect
    if ctx is not None:
        client.tls_set_context(ctx)
    try:
        client.connect(mq.host, mq.port, keepalive=max(5, int(timeout) + 1))
        client.loop_start()
        done.wait(timeout)
    except (OSError, ssl.SSLError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        client.disconnect()
        client.loop_stop()
    return result["error"]


def check_mqtt(cfg: AgentConfig, timeout: float = 5.0) -> list[Check]:
    mq = cfg.uplink.mqtt
    if mq is None:
        return []
    where = f"{mq.host}:{mq.port}"
    checks: list[Check] = []
    ctx: ssl.SSLContext | None = None
    if mq.tls is not None:
        checks += check_certificate(mq.tls, dt.datetime.now(dt.UTC))
        if any(c.status is Status.FAIL and c.name.startswith("mqtt tls") for c in checks):
            return checks
        try:
            ctx = _tls_context(mq.tls)
        except (OSError, ssl.SSLError, ValueError) as exc:
            checks.append(_fail("mqtt tls files", f"cannot load CA/cert/key: {exc}",
                                "check uplink.mqtt.tls ca/cert/key are PEM files of this "
                                "gateway"))
            return checks
    elif mq.host not in ("127.0.0.1", "localhost", "::1"):
        checks.append(_warn("mqtt tls", f"plain TCP to {where} (insecure = true)",
                            "configure [uplink.mqtt.tls]: insecure is for the simulator only"))
    try:
        sock = socket.create_connection((mq.host, mq.port), timeout=timeout)
    except OSError as exc:
        checks.append(_fail("mqtt broker", f"{where} unreachable: {exc.strerror or exc}",
                            f"check the network, DNS (`getent hosts {mq.host}`) and that the "
                            f"firewall allows TCP {mq.port} outbound"))
        return checks
    with sock:
        checks.append(_ok("mqtt broker", f"{where} reachable"))
        if ctx is not None:
            try:
                with ctx.wrap_socket(sock, server_hostname=mq.host) as tls_sock:
                    version = tls_sock.version()
            except ssl.SSLCertVerificationError as exc:
                checks.append(_fail("mqtt tls handshake", f"broker certificate rejected: "
                                    f"{exc.verify_message}",
                                    f"uplink.mqtt.tls.ca ({mq.tls.ca if mq.tls else '?'}) must be "
                                    "the bank CA that issued the broker's certificate"))
                return checks
            except (ssl.SSLError, OSError) as exc:
                checks.append(_fail("mqtt tls handshake", f"failed: {exc}",
                                    "the broker may refuse this gateway's certificate: check "
                                    "tls.cert was issued by the bank's CA for this gateway"))
                return checks
            checks.append(_ok("mqtt tls handshake", f"{version} with {where}, broker "
                              "certificate verified, client certificate sent"))
    error = _mqtt_connect(mq, cfg.gateway.id, ctx, timeout)
    if error is not None:
        checks.append(_fail("mqtt connect", f"MQTT CONNECT to {where}: {error}",
                            "ask the platform team whether this gateway's certificate and "
                            "client id are authorised on the broker"))
    else:
        checks.append(_ok("mqtt connect", f"CONNACK from {where} ({mq.protocol})"))
    return checks


async def check_coap(cfg: AgentConfig, limit: float = 5.0) -> list[Check]:
    co = cfg.uplink.coap
    if co is None:
        return []
    import aiocoap

    name = "coap platform"
    uri = f"{co.base}/.well-known/core"
    ctx = await aiocoap.Context.create_client_context()
    try:
        resp = await asyncio.wait_for(
            ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response, limit)
    except (TimeoutError, OSError, aiocoap.error.Error) as exc:
        return [_fail(name, f"{uri}: no answer ({type(exc).__name__}: {exc})",
                      "check the network and that the firewall allows UDP to the platform")]
    finally:
        await ctx.shutdown()
    if not resp.code.is_successful():
        return [_fail(name, f"{uri}: {resp.code}", "ask the platform team (CoAP endpoint)")]
    return [_ok(name, f"{co.base} answers ({resp.code})")]


# --------------------------------------------------------------------------- integrity


def check_integrity(manifest: Path = MANIFEST_PATH, limit: int = 5) -> Check:
    """The installed files match the manifest written by `branch-agent provision`."""
    name = "integrity"
    reinstall = ("reinstall the release (`apt-get install --reinstall branch-agent`) and re-run "
                 "`branch-agent provision`; report an unexplained change to security")
    try:
        doc = json.loads(manifest.read_text())
    except FileNotFoundError:
        return _warn(name, f"no integrity manifest at {manifest}",
                     "run `branch-agent provision` (it writes the manifest)")
    except (OSError, ValueError) as exc:
        return _fail(name, f"cannot read the manifest {manifest}: {exc}", reinstall)
    try:
        rep = verify_manifest(doc)
    except (OSError, ValueError) as exc:
        return _fail(name, f"{manifest}: {exc}", reinstall)
    if rep.ok:
        return _ok(name, f"{rep.checked} files match {manifest} (version {doc.get('version')})")
    parts = []
    for what, paths in (("edited", rep.edited), ("missing", rep.missing), ("extra", rep.extra)):
        if paths:
            more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
            parts.append(f"{what}: {', '.join(paths[:limit])}{more}")
    return _fail(name, "; ".join(parts), reinstall)


# --------------------------------------------------------------------------- all


async def run_checks(config_path: Path, limit: float = 5.0,
                     manifest: Path = MANIFEST_PATH) -> list[Check]:
    first, cfg = check_config(config_path)
    if cfg is None:
        return [first]
    checks = [first, check_signing_key(cfg), check_state_dir(cfg), check_clock(cfg),
              check_gpio(cfg)]
    checks.append(await asyncio.to_thread(check_integrity, manifest))
    checks += await asyncio.to_thread(check_serial, cfg)
    checks += await check_ip_devices(cfg, limit)
    checks.append(await check_ble(getattr(cfg.sources, "ble", None), limit))
    checks += await asyncio.to_thread(check_mqtt, cfg, limit)
    checks += await check_coap(cfg, limit)
    for c in checks:
        log.debug("doctor.check", check=c.name, status=str(c.status), detail=c.detail)
    return checks
