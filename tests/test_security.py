"""Least exposure and no secret leaks, checked on the real agent process: nothing listens unless
enabled, and no key material appears in logs, status, doctor or check-config output."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from branchsim.platform.receiver import Receiver
from tests.support.agentproc import AGENT, AgentProcess, mqtt_uplink, to_toml, wait_until
from tests.support.broker import Mosquitto, get_free_port
from tests.support.pki import Pki

SS = shutil.which("ss")


def secret_forms(pem: bytes) -> set[str]:
    """Every way a private key could show up in text: its PEM body lines, the private value in
    hex (both cases) and base64 (standard and URL-safe)."""
    forms = {line for line in pem.decode().splitlines()
             if line and not line.startswith("-----") and len(line) >= 16}
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    elif isinstance(key, rsa.RSAPrivateKey):
        d = key.private_numbers().d
        raw = d.to_bytes((d.bit_length() + 7) // 8, "big")[:32]
    else:
        raise AssertionError(f"unexpected key type {type(key).__name__}")
    b64 = base64.b64encode(raw).decode().rstrip("=")
    forms |= {raw.hex(), raw.hex().upper(), b64, base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    return forms


def leaks(text: str, secrets: dict[str, set[str]]) -> list[str]:
    squeezed = re.sub(r"\\n|\s", "", text)  # a PEM inside a JSON string or wrapped output
    return [f"{name}: {form[:8]}..." for name, forms in secrets.items() for form in forms
            if form in text or form in squeezed]


def run_cli(*args: str) -> str:
    out = subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=60,
                         check=False)
    return out.stdout + out.stderr


def test_no_key_material_in_logs_status_or_tools(tmp_path: Path, mosquitto_tls: Mosquitto,
                                                 tls_platform: Receiver, pki: Pki) -> None:
    """With debug logging, a TLS failure and a refused key file, neither the signing key, the
    TLS client keys (current and renewed), the pseudonym key nor a BTHome bindkey appears in the
    log, status.json, `status`, `doctor`, `check-config`, `config show` or `provision --renew`
    output."""
    agent = AgentProcess(
        tmp_path / "gw",
        log={"level": "debug", "format": "json"},
        uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(mosquitto_tls.port, pki)},
        sources={"synthetic": [{"name": "load", "rate_hz": 200.0, "count": 50,
                                "waveform": "counter"}]},
        privacy={"pseudonymise_attrs": ["mac"]},
    )
    tls_platform.register(agent.gw, agent.pubkey.read_bytes())
    agent.start()
    try:
        wait_until(lambda: len(tls_platform.events(agent.gw)) >= 50, 30, "events acked", agent)
        wait_until(lambda: bool(agent.status().get("forwarder")), 10, "status written", agent)
        outputs = {
            "status": run_cli("status", "--config", str(agent.config_path), "--json"),
            "doctor": run_cli("doctor", "--config", str(agent.config_path), "--json",
                              "--timeout", "3"),
            "check-config": run_cli("check-config", str(agent.config_path)),
        }
    finally:
        assert agent.stop() == 0
    # A failing TLS handshake (the broker's CA is not the one configured) and a key file
    # with unsafe permissions: the error paths log the most.
    agent.doc["uplink"]["mqtt"]["tls"]["ca"] = str(pki.other_ca_cert)
    agent.start()
    try:
        wait_until(lambda: "mqtt.connect_failed" in agent.log_text(), 20, "TLS failure logged",
                   agent)
    finally:
        agent.stop()
    # `config show` of the same config with a BTHome bindkey (a SecretStr), and a renewal,
    # which writes a new TLS client key.
    bindkey = "231d39c1d7cc1ab1aee224cd096db932"
    shown = tmp_path / "shown.toml"
    shown.write_text(to_toml({**agent.doc, "sources": {"ble": {"sensors": [
        {"name": "thermo", "address": "A4:C1:38:00:00:01", "decoder": "bthome",
         "bindkey": bindkey}]}}}))
    outputs["config-show"] = run_cli("config", "show", "--config", str(shown))
    outputs["config-show-json"] = run_cli("config", "show", "--config", str(shown), "--json")
    outputs["renew"] = run_cli("provision", "--renew", "--config", str(agent.config_path))
    renewed = pki.client_key.parent / "next" / "client.key"
    (agent.keys / "signing.key").chmod(0o644)
    outputs["refused-key"] = run_cli("run", "--config", str(agent.config_path))
    assert "chmod 600" in outputs["refused-key"]

    secrets = {
        "signing.key": secret_forms((agent.keys / "signing.key").read_bytes()),
        "tls client key": secret_forms(pki.client_key.read_bytes()),
        "renewed tls client key": secret_forms(renewed.read_bytes()),
        "bthome bindkey": {bindkey, bindkey.upper()},
    }
    pseudonym = (agent.state / "pseudonym.key").read_bytes()
    secrets["pseudonym.key"] = {pseudonym.hex(), pseudonym.hex().upper(),
                                base64.b64encode(pseudonym).decode().rstrip("=")}
    texts = {"agent log": agent.log_text(),
             "status.json": (agent.run / "status.json").read_text(), **outputs}
    assert "mqtt.connected" in texts["agent log"] and texts["doctor"].strip()  # not vacuous
    assert "thermo" in texts["config-show"] and "csr auth" in texts["renew"]
    assert leaks(pki.client_key.read_text(), secrets)  # the detector itself works
    found = {where: hit for where, text in texts.items() if (hit := leaks(text, secrets))}
    assert found == {}


def sockets_of(pid: int) -> list[str]:
    """`ss`: the listening TCP sockets and bound UDP sockets of one process, as
    "proto local-address:port"."""
    assert SS is not None
    out = subprocess.run([SS, "-H", "-n", "-l", "-t", "-u", "-p"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    found = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            cols = line.split()
            # aiocoap binds an IPv4 address as its v4-mapped form on an IPv6 socket: still
            # that one address, not a wildcard.
            local = re.sub(r"^\[::ffff:([0-9.]+)\]", r"\1", cols[4])
            found.append(f"{cols[0]} {local}")
    return sorted(found)


@pytest.mark.skipif(SS is None, reason="ss (iproute2) is not installed")
def test_nothing_listens_unless_enabled(tmp_path: Path, mosquitto_tls: Mosquitto,
                                        pki: Pki) -> None:
    """The agent opens no listening socket by default; with [sources.coap] it listens on
    exactly the configured address and port, and nothing else."""
    agent = AgentProcess(tmp_path / "gw",
                         uplink={"order": ["mqtt"], "mqtt": mqtt_uplink(mosquitto_tls.port, pki)})
    agent.start()
    try:
        wait_until(lambda: agent.status().get("uplinks", [{}])[0].get("connected") is True,
                   20, "agent up", agent)
        assert agent.proc is not None
        assert sockets_of(agent.proc.pid) == []
    finally:
        assert agent.stop() == 0
    port = get_free_port()
    agent.doc["sources"] = {"coap": {"bind": "127.0.0.1", "port": port}}
    agent.start()
    try:
        wait_until(lambda: agent.status().get("uplinks", [{}])[0].get("connected") is True,
                   20, "agent up with CoAP ingest", agent)
        assert agent.proc is not None
        assert sockets_of(agent.proc.pid) == [f"udp 127.0.0.1:{port}"]
    finally:
        assert agent.stop() == 0



def test_security_doc_names_only_existing_tests() -> None:
    """Every test docs/SECURITY.md points at exists (file and function)."""
    root = Path(__file__).resolve().parent.parent
    refs = re.findall(r"(tests/[\w/]+\.py)::(\w+)", (root / "docs" / "SECURITY.md").read_text())
    assert len(refs) > 30
    missing = [f"{f}::{name}" for f, name in refs
               if not re.search(rf"^(async )?def {name}\(", (root / f).read_text(), re.M)]
    assert missing == []


def test_tls_failure_is_audited(tmp_path: Path, mosquitto_tls: Mosquitto, pki: Pki) -> None:
    """An agent whose client certificate the broker refuses (issued by another CA) records
    audit.tls_failure in its local audit log, once, naming the uplink: the failure is
    classified by exception type, not found by a word in its message (the broker's close
    before CONNACK says nothing about TLS)."""
    up = mqtt_uplink(mosquitto_tls.port, pki)
    up["tls"] = {"ca": str(pki.ca_cert), "cert": str(pki.other_client_cert),
                 "key": str(pki.other_client_key)}
    agent = AgentProcess(tmp_path / "gw", uplink={"order": ["mqtt"], "mqtt": up})

    def tls_failures() -> list[dict[str, Any]]:
        return agent.audit_records("audit.tls_failure")

    agent.start()
    try:
        wait_until(lambda: bool(tls_failures()), 30, "audit.tls_failure recorded", agent)
    finally:
        assert agent.stop() == 0
    [record] = tls_failures()
    assert record["attrs"]["uplink"].startswith("mqtt:") and "tls.cert" in record["attrs"]["error"]
