"""`branch-agent doctor` against a healthy gateway (mTLS mosquitto, keys 0600, a pty as serial
port, clock synced) and a deliberately broken one; the BLE check against a fake BlueZ."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.ops.doctor import CERT_WARN_DAYS, Status, check_ble, check_certificate
from agent.security.integrity import build_manifest, installed_trees, write_manifest
from agent.uplink.mqtt import MqttTlsConfig
from branchsim.bluez import FakeBluez, PrivateSystemBus
from drivers.ble import BleConfig
from tests.support.agentproc import AgentProcess, mqtt_uplink, to_toml
from tests.support.broker import Mosquitto
from tests.support.pki import Pki, certify

AGENT = [sys.executable, "-m", "agent.ops.cli"]


@pytest.fixture
def pty_port() -> Iterator[str]:
    """A real pty: its slave path stands in for /dev/ttyUSB0."""
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


def client_cert(pki: Pki, dir: Path, days: int) -> Path:
    """The gateway's certificate re-issued by the test CA for `days` (make_pki's lasts a day)."""
    old = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    return certify(pki, old.subject, old.public_key(), dir / f"client-{days}d.crt", days=days)


def gateway(dir: Path, broker: Mosquitto, pki: Pki, port: str, **gw: Any) -> AgentProcess:
    """A gateway config: mTLS to `broker` with a year-long client certificate, a UPS on `port`."""
    up = mqtt_uplink(broker.port, pki)
    up["tls"]["cert"] = str(client_cert(pki, dir.parent, days=365))
    a = AgentProcess(dir, gateway=gw, uplink={"order": ["mqtt"], "mqtt": up},
                     sources={"serial": {"ups": [{"name": "main", "port": port}]}})
    a.write_config()
    return a


def doctor(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, "doctor", "--config", str(config), "--timeout", "5", *extra],
                          capture_output=True, text=True, timeout=60, check=False)


def by_name(out: str) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in json.loads(out)["checks"]}


def test_healthy_gateway_passes(tmp_path: Path, mosquitto_tls: Mosquitto, pki: Pki,
                                pty_port: str) -> None:
    """Every check passes (or does not apply) on a healthy setup, the installed files matching
    their manifest; exit code 0."""
    gw = gateway(tmp_path / "gw", mosquitto_tls, pki, pty_port)
    manifest = tmp_path / "manifest.json"
    write_manifest(manifest, build_manifest(installed_trees()))
    res = doctor(gw.config_path, "--json", "--manifest", str(manifest))
    checks = by_name(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {c["status"] for c in checks.values()} <= {"pass", "skip"}
    for name in ("config", "signing key", "state dir", "clock", "serial ups.main", "integrity",
                 "mqtt certificate", "mqtt broker", "mqtt tls handshake", "mqtt connect"):
        assert checks[name]["status"] == "pass", checks[name]
    assert "CONNACK" in checks["mqtt connect"]["detail"]


def test_broken_gateway_reports_each_failure_with_a_fix(tmp_path: Path, mosquitto_tls: Mosquitto,
                                                        pki: Pki) -> None:
    """Wrong CA, missing serial port, key mode 0644 and an unsynchronised clock each fail with
    a fix; exit code 2; the human output shows the fixes too."""
    gw = gateway(tmp_path / "gw", mosquitto_tls, pki, "/dev/ttyDOESNOTEXIST", time_sync="unsynced")
    gw.doc["uplink"]["mqtt"]["tls"]["ca"] = str(pki.other_ca_cert)
    gw.write_config()
    (gw.keys / "signing.key").chmod(0o644)
    res = doctor(gw.config_path, "--json")
    assert res.returncode == 2, res.stdout + res.stderr
    checks = by_name(res.stdout)
    expected = {
        "signing key": "chmod 600",
        "clock": "timedatectl",
        "serial ups.main": "USB adapter",
        "mqtt tls handshake": "uplink.mqtt.tls.ca",
    }
    for name, fix in expected.items():
        assert checks[name]["status"] == "fail", checks[name]
        assert fix in checks[name]["fix"], checks[name]
    assert checks["config"]["status"] == "pass"
    human = doctor(gw.config_path)
    assert human.returncode == 2
    assert "chmod 600" in human.stdout and "fix:" in human.stdout


def test_warning_gives_exit_code_1(tmp_path: Path, mosquitto_tls: Mosquitto, pki: Pki,
                                   pty_port: str) -> None:
    """A certificate close to expiry is a warning, not a failure: exit code 1."""
    gw = gateway(tmp_path / "gw", mosquitto_tls, pki, pty_port)
    gw.doc["uplink"]["mqtt"]["tls"]["cert"] = str(client_cert(pki, tmp_path, days=10))
    gw.write_config()
    res = doctor(gw.config_path, "--json")
    checks = by_name(res.stdout)
    assert checks["mqtt certificate"]["status"] == "warn", checks["mqtt certificate"]
    assert "expires in" in checks["mqtt certificate"]["detail"]
    assert res.returncode == 1, res.stdout


def test_certificate_warning_starts_30_days_before_expiry(tmp_path: Path, pki: Pki) -> None:
    """The certificate check passes 31 days before expiry, warns 29 days before (fix: renew),
    fails once expired, and warns while a renewed key waits in tls/next/."""
    cert_path = client_cert(pki, tmp_path, days=365)
    end = x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc
    tls = MqttTlsConfig(ca=pki.ca_cert, cert=cert_path, key=pki.client_key)

    def at(days_left: float) -> dict[str, Any]:
        return {c.name: c for c in check_certificate(tls, end - dt.timedelta(days=days_left))}
    assert CERT_WARN_DAYS == 30
    assert at(31)["mqtt certificate"].status is Status.PASS
    warn = at(29)["mqtt certificate"]
    assert warn.status is Status.WARN and "expires in 29 days" in warn.detail
    assert "provision --renew" in warn.fix
    assert at(-1)["mqtt certificate"].status is Status.FAIL
    (pki.client_key.parent / "next").mkdir()
    (pki.client_key.parent / "next" / "client.key").write_bytes(b"pending")
    pending = at(31)["mqtt renewal"]
    assert pending.status is Status.WARN and "--install-cert" in pending.fix


def test_invalid_config_fails_first(tmp_path: Path) -> None:
    """An invalid config is the one failure reported, with its problems and exit code 2."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(to_toml({"gateway": {"id": "gw", "colour": "red"}}))
    res = doctor(cfg, "--json")
    checks = json.loads(res.stdout)["checks"]
    assert res.returncode == 2
    assert [c["name"] for c in checks] == ["config"]
    assert "gateway.colour: unknown key" in checks[0]["detail"]


async def test_ble_adapter_powered_and_unpowered(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The BLE check passes with a powered adapter on BlueZ's D-Bus, fails when it is
    unpowered, and fails when BlueZ is not on the bus at all."""
    ble = BleConfig.model_validate({"sensors": [
        {"name": "thermo", "address": "A4:C1:38:00:00:01", "decoder": "bthome"}]})
    (tmp_path / "dbus").mkdir()
    bus = PrivateSystemBus(tmp_path / "dbus")
    await bus.start()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    bluez = FakeBluez(bus.address)
    try:
        no_bluez = await check_ble(ble)
        assert no_bluez.status is Status.FAIL and "bluetooth" in no_bluez.fix
        await bluez.start()
        ok = await check_ble(ble)
        assert ok.status is Status.PASS, ok
        assert "hci0" in ok.detail
        bluez.power(False)
        off = await check_ble(ble)
        assert off.status is Status.FAIL and "power on" in off.fix, off
        assert (await check_ble(None)).status is Status.SKIP
    finally:
        await bluez.stop()
        await bus.stop()
