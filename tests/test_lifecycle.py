"""Key and certificate lifecycle as an installer runs it: `provision --renew` with a test CA and a
real mTLS mosquitto, `provision --install-cert`, `wipe`, and the integrity manifest."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ops.doctor import Status, check_integrity
from agent.protocol.renewal import verify_renewal
from agent.security.audit import verify
from agent.security.integrity import build_manifest, installed_trees, write_manifest
from agent.security.keys import load_public_key
from tests.support.agentproc import AGENT, AgentProcess, mqtt_uplink, wait_until
from tests.support.broker import Mosquitto
from tests.support.pki import Pki, issue, make_pki

GW = "gw-test"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=60,
                          check=False, stdin=subprocess.DEVNULL)


def gateway(dir: Path, pki: Pki, port: int = 8883) -> AgentProcess:
    """A gateway whose TLS files are its own copies in dir/tls (as /etc/branch-agent/tls)."""
    tls = dir / "tls"
    tls.mkdir(parents=True)
    for src, name in ((pki.ca_cert, "ca.pem"), (pki.client_cert, "client.pem"),
                      (pki.client_key, "client.key")):
        shutil.copy(src, tls / name)
    (tls / "client.key").chmod(0o600)
    up = mqtt_uplink(port, pki)
    up["tls"] = {"ca": str(tls / "ca.pem"), "cert": str(tls / "client.pem"),
                 "key": str(tls / "client.key")}
    a = AgentProcess(dir, gw=GW, uplink={"order": ["mqtt"], "mqtt": up})
    a.write_config()
    return a


def test_renew_and_install_cert_switch_over_to_a_working_key(tmp_path: Path, pki: Pki,
                                                             mosquitto_tls: Mosquitto) -> None:
    """`--renew` leaves a 0600 key, a CSR and its signing-key authentication in tls/next/ while
    the old files stay in use; `--install-cert` refuses a certificate for another key or from
    another CA, installs the right one (old files kept as .prev), both steps are audited, and
    the agent then connects to the mTLS broker with the new key."""
    gw = gateway(tmp_path / "gw", pki, mosquitto_tls.port)
    tls = gw.dir / "tls"
    old_key, old_cert = (tls / "client.key").read_bytes(), (tls / "client.pem").read_bytes()
    res = cli("provision", "--renew", "--config", str(gw.config_path))
    assert res.returncode == 0, res.stderr
    nxt = tls / "next"
    assert stat.S_IMODE((nxt / "client.key").stat().st_mode) == 0o600
    assert (tls / "client.key").read_bytes() == old_key  # nothing switched yet
    again = cli("provision", "--renew", "--config", str(gw.config_path))
    assert again.returncode == 0 and "kept" in again.stdout  # a pending key is kept

    csr, auth = (nxt / "client.csr").read_bytes(), (nxt / "client.csr.cose").read_bytes()
    pub = load_public_key(gw.pubkey)
    claims = verify_renewal(csr, auth, pub, GW)
    assert claims["type"] == "mqtt-csr-renewal"  # tests/compat/test_cwt.py: cwt agrees

    other_csr = tmp_path / "other.csr"
    other_csr.write_bytes(_other_csr())
    for bad, why in ((issue(pki, other_csr, tmp_path / "other-key.pem"), "pending key"),
                     (issue(pki, nxt / "client.csr", tmp_path / "other-ca.pem",
                            ca_key_path=make_pki(tmp_path / "pki2").ca_key), "configured CA")):
        refused = cli("provision", "--install-cert", str(bad), "--config", str(gw.config_path))
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        assert (tls / "client.key").read_bytes() == old_key

    new_key = (nxt / "client.key").read_bytes()
    cert = issue(pki, nxt / "client.csr", tmp_path / "issued.pem")
    ok = cli("provision", "--install-cert", str(cert), "--config", str(gw.config_path))
    assert ok.returncode == 0, ok.stderr
    assert (tls / "client.key").read_bytes() == new_key
    assert (tls / "client.pem").read_bytes() == cert.read_bytes()
    assert (tls / "client.key.prev").read_bytes() == old_key
    assert (tls / "client.pem.prev").read_bytes() == old_cert
    assert stat.S_IMODE((tls / "client.key").stat().st_mode) == 0o600
    assert not nxt.exists()

    log = gw.state / "audit" / "audit.log"
    cmds = [json.loads(ln)["attrs"]["cmd"] for ln in log.read_text().splitlines()]
    assert cmds == ["renew", "renew", "install_cert"]
    assert verify(log).ok

    gw.start()
    try:
        wait_until(lambda: gw.status().get("uplinks", [{}])[0].get("connected") is True, 20,
                   "agent connected with the renewed certificate", gw)
    finally:
        assert gw.stop() == 0


def test_renewal_authentication_refuses_forgeries(tmp_path: Path, pki: Pki) -> None:
    """verify_renewal refuses another signer, another gateway id and a swapped CSR."""
    gw = gateway(tmp_path / "gw", pki)
    assert cli("provision", "--renew", "--config", str(gw.config_path)).returncode == 0
    nxt = gw.dir / "tls" / "next"
    csr, auth = (nxt / "client.csr").read_bytes(), (nxt / "client.csr.cose").read_bytes()
    pub = load_public_key(gw.pubkey)
    with pytest.raises(ValueError, match="another key"):
        verify_renewal(csr, auth, Ed25519PrivateKey.generate().public_key(), GW)
    with pytest.raises(ValueError, match="for gateway"):
        verify_renewal(csr, auth, pub, "gw-other")
    with pytest.raises(ValueError, match="another CSR"):
        verify_renewal(_other_csr(), auth, pub, GW)


def _other_csr() -> bytes:
    k = ec.generate_private_key(ec.SECP256R1())
    return x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, GW)])).sign(
        k, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- wipe


def test_wipe_refuses_without_confirmation_or_while_running(tmp_path: Path, pki: Pki) -> None:
    """Without a terminal and without --yes-i-am-sure, with the wrong id, or while status.json
    names a live process, wipe removes nothing."""
    gw = gateway(tmp_path / "gw", pki)
    gw.state.mkdir(parents=True)
    before = sorted(p for p in gw.dir.rglob("*"))
    no_tty = cli("wipe", "--config", str(gw.config_path))
    assert no_tty.returncode == 1 and "--yes-i-am-sure" in no_tty.stderr
    wrong = cli("wipe", "--config", str(gw.config_path), "--yes-i-am-sure", "gw-other")
    assert wrong.returncode == 1 and "nothing removed" in wrong.stderr
    gw.run.mkdir(parents=True)
    (gw.run / "status.json").write_text(json.dumps({"pid": os.getpid()}))
    running = cli("wipe", "--config", str(gw.config_path), "--yes-i-am-sure", GW)
    assert running.returncode == 1 and "running" in running.stderr
    assert sorted(p for p in gw.dir.rglob("*") if gw.run not in (p, *p.parents)) == before


def test_wipe_removes_keys_state_config_and_keeps_the_audit_log(tmp_path: Path,
                                                                pki: Pki) -> None:
    """wipe records itself first, then removes signing and TLS keys (pending and .prev too),
    the state and the config; the local audit log stays, intact, naming the wipe."""
    gw = gateway(tmp_path / "gw", pki)
    assert cli("provision", "--renew", "--config", str(gw.config_path)).returncode == 0
    gw.state.mkdir(parents=True, exist_ok=True)
    (gw.state / "outbox.db").write_bytes(b"x" * 100)
    (gw.state / "pseudonym.key").write_bytes(os.urandom(32))
    res = cli("wipe", "--config", str(gw.config_path), "--yes-i-am-sure", GW)
    assert res.returncode == 0, res.stderr
    log = gw.state / "audit" / "audit.log"
    left = sorted(str(p.relative_to(gw.dir)) for p in gw.dir.rglob("*") if p.is_file())
    assert left == ["state/audit/audit.log"]
    assert not (gw.dir / "keys").exists() and not (gw.dir / "tls").exists()
    assert verify(log).ok
    records = [json.loads(ln) for ln in log.read_text().splitlines()]
    wipes = [r for r in records if r["attrs"].get("cmd") == "wipe"]
    assert len(wipes) == 2 and wipes[1]["attrs"]["done"] is True
    assert f"audit log     kept: {log}" in res.stdout


def test_wipe_exports_the_audit_log_with_keep_audit(tmp_path: Path, pki: Pki) -> None:
    """With --keep-audit PATH the audit log (wipe record included) is exported to PATH,
    verifies there with `audit verify`, and nothing is left in the state dir."""
    gw = gateway(tmp_path / "gw", pki)
    gw.state.mkdir(parents=True)
    out = tmp_path / "export" / "audit.jsonl"
    res = cli("wipe", "--config", str(gw.config_path), "--yes-i-am-sure", GW,
              "--keep-audit", str(out))
    assert res.returncode == 0, res.stderr
    assert not gw.config_path.exists()
    assert not gw.state.exists() or list(gw.state.iterdir()) == []
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert lines[-1]["attrs"]["cmd"] == "wipe"
    check = cli("audit", "verify", "--file", str(out))
    assert check.returncode == 0 and "intact" in check.stdout


# --------------------------------------------------------------------------- integrity


def test_doctor_reports_an_edited_missing_or_extra_file(tmp_path: Path, pki: Pki) -> None:
    """A manifest of a copied installation verifies; after editing one file, deleting one and
    adding one, `doctor` fails the integrity check naming all three, with a fix."""
    trees = {}
    for name, src in installed_trees().items():
        trees[name] = tmp_path / "tree" / name
        shutil.copytree(src, trees[name], ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    manifest = tmp_path / "manifest.json"
    write_manifest(manifest, build_manifest(trees))
    clean = check_integrity(manifest)
    assert clean.status is Status.PASS, clean
    edited = trees["agent"] / "config.py"
    edited.write_text(edited.read_text() + "\n# changed\n")
    (trees["drivers"] / "base.py").unlink()
    (trees["drivers"] / "implant.py").write_text("print('hi')\n")
    gw = gateway(tmp_path / "gw", pki)
    res = cli("doctor", "--config", str(gw.config_path), "--json", "--timeout", "1",
              "--manifest", str(manifest))
    assert res.returncode == 2
    check = {c["name"]: c for c in json.loads(res.stdout)["checks"]}["integrity"]
    assert check["status"] == "fail", check
    assert f"edited: {edited}" in check["detail"]
    assert f"missing: {trees['drivers'] / 'base.py'}" in check["detail"]
    assert f"extra: {trees['drivers'] / 'implant.py'}" in check["detail"]
    assert "reinstall" in check["fix"]


def test_provision_manifest_covers_the_unit(tmp_path: Path) -> None:
    """provision writes a manifest that verifies at once; an edited unit file fails it."""
    root = tmp_path / "root"
    res = cli("provision", "--root", str(root), "--gateway-id", GW, "--broker",
              "127.0.0.1:8883", "--non-interactive", "--no-qr")
    assert res.returncode == 0, res.stderr
    manifest = root / "usr/lib/branch-agent/manifest.json"
    assert check_integrity(manifest).status is Status.PASS
    unit = root / "etc/systemd/system/branch-agent.service"
    unit.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=no"))
    bad = check_integrity(manifest)
    assert bad.status is Status.FAIL and f"edited: {unit}" in bad.detail
