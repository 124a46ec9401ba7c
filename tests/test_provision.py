"""`branch-agent provision --root DIR`: config, keys, CSR and unit on an empty root; idempotent."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from agent.protocol import kid_for
from agent.security.keys import load_public_key

ROOT = Path(__file__).resolve().parents[1]

AGENT = [sys.executable, "-m", "agent.ops.cli"]


def provision(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, "provision", "--root", str(root), "--gateway-id", "branch-0042",
         "--broker", "mqtt.bank.example:8883", "--non-interactive", *extra],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_provision_empty_root(tmp_path: Path) -> None:
    """An empty root gets a config that passes check-config, keys with mode 0600, a CSR for the
    gateway id, the unit (enabled, ExecStart rewritten) and the sysusers/tmpfiles snippets; the
    registration details and a QR code are printed."""
    root = tmp_path / "root"
    res = provision(root, "--coap", "coap://coap.bank.example", "--exec-path", "/usr/bin/ba")
    assert res.returncode == 0, res.stderr
    etc = root / "etc" / "branch-agent"
    cfg = etc / "agent.toml"
    check = subprocess.run([*AGENT, "check-config", str(cfg)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    assert "uplinks       mqtt, coap" in check.stdout
    assert mode(etc / "keys" / "signing.key") == 0o600
    assert mode(etc / "tls" / "client.key") == 0o600
    csr = x509.load_pem_x509_csr((etc / "tls" / "client.csr").read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "branch-0042"
    unit = root / "etc" / "systemd" / "system" / "branch-agent.service"
    assert "ExecStart=/usr/bin/ba run --config /etc/branch-agent/agent.toml" in unit.read_text()
    wants = unit.parent / "multi-user.target.wants" / "branch-agent.service"
    assert wants.is_symlink()
    assert str(wants.readlink()) == "/etc/systemd/system/branch-agent.service"
    assert (root / "usr/lib/sysusers.d/branch-agent.conf").exists()
    assert (root / "usr/lib/tmpfiles.d/branch-agent.conf").exists()
    assert (root / "var/lib/branch-agent").is_dir()
    kid = kid_for(load_public_key(etc / "keys" / "signing.pub")).hex()
    assert f"kid          {kid}" in res.stdout
    assert "gateway id   branch-0042" in res.stdout
    assert "fingerprint  SHA256:" in res.stdout
    assert "█" in res.stdout  # the QR code


def test_provision_on_a_packaged_install_leaves_the_units_to_the_package(tmp_path: Path) -> None:
    """Installed from the Debian package (its unit in /lib/systemd/system, enabled by its
    postinst): provision writes the config, the keys and the egress drop-in, but no copy of the
    unit in /etc (it would hide the package's next unit) and no sysusers/tmpfiles snippets
    (the package's); an unenabled unit is enabled where the package put it."""
    root = tmp_path / "root"
    packaged = root / "lib/systemd/system/branch-agent.service"
    packaged.parent.mkdir(parents=True)
    packaged.write_text((ROOT / "systemd" / "branch-agent.service").read_text())
    res = provision(root)
    assert res.returncode == 0, res.stderr
    assert not (root / "etc/systemd/system/branch-agent.service").exists()
    assert not (root / "usr/lib/sysusers.d/branch-agent.conf").exists()
    assert (root / "etc/systemd/system/branch-agent.service.d/10-egress.conf").exists()
    wants = root / "etc/systemd/system/multi-user.target.wants/branch-agent.service"
    assert str(wants.readlink()) == "/lib/systemd/system/branch-agent.service"
    assert packaged.read_text() == (ROOT / "systemd" / "branch-agent.service").read_text()
    assert (root / "etc/branch-agent/agent.toml").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_the_config_is_readable_by_the_service_group(tmp_path: Path) -> None:
    """The service runs as branch-agent: the config (0640) gets that group of the target's
    /etc/group (the tmpfiles snippet sets it at boot for an image provisioned before the group
    exists)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_text("root:x:0:\nbranch-agent:x:4242:\n")
    assert provision(root).returncode == 0
    cfg = root / "etc/branch-agent/agent.toml"
    assert (cfg.stat().st_gid, mode(cfg)) == (4242, 0o640)
    snippet = (ROOT / "systemd/tmpfiles.d/branch-agent.conf").read_text()
    assert "z /etc/branch-agent/agent.toml 0640 root branch-agent -" in snippet


def test_provision_twice_keeps_keys(tmp_path: Path) -> None:
    """A second run keeps the signing key, the client key, the CSR and the config byte for byte
    and prints the same kid."""
    root = tmp_path / "root"
    first = provision(root, "--no-qr")
    assert first.returncode == 0, first.stderr
    files = ["keys/signing.key", "keys/signing.pub", "tls/client.key", "tls/client.csr",
             "agent.toml"]
    before = {f: (root / "etc/branch-agent" / f).read_bytes() for f in files}
    second = provision(root, "--no-qr")
    assert second.returncode == 0, second.stderr
    after = {f: (root / "etc/branch-agent" / f).read_bytes() for f in files}
    assert after == before
    assert "created" not in second.stdout
    kid_line = [ln for ln in first.stdout.splitlines() if ln.strip().startswith("kid")]
    assert kid_line and kid_line[0] in second.stdout


def test_provision_refuses_bad_input(tmp_path: Path) -> None:
    """A bad gateway id or broker is refused before anything is written; a missing option
    without a terminal is an error, not a prompt."""
    root = tmp_path / "root"
    bad = subprocess.run(
        [*AGENT, "provision", "--root", str(root), "--gateway-id", "bad id!", "--broker",
         "mqtt.bank.example", "--non-interactive"],
        capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "gateway.id" in bad.stderr
    assert not root.exists()
    missing = subprocess.run([*AGENT, "provision", "--root", str(root), "--gateway-id", "gw1"],
                             capture_output=True, text=True, timeout=60, check=False,
                             stdin=subprocess.DEVNULL)
    assert missing.returncode == 2 and "--broker" in missing.stderr
    port = subprocess.run(
        [*AGENT, "provision", "--root", str(root), "--gateway-id", "gw1", "--broker",
         "host:99999", "--non-interactive"],
        capture_output=True, text=True, timeout=60, check=False)
    assert port.returncode == 1 and "HOST:PORT" in port.stderr


def test_egress_dropin_follows_the_config(tmp_path: Path) -> None:
    """The egress drop-in denies everything but loopback, the resolved broker, the DNS servers
    of the image, --allow-ip and, once configured, the CoAP sensors' networks; a name that does
    not resolve is a warning and a comment, never an allowed address; the manifest is kept
    when nothing changed."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/resolv.conf").write_text("nameserver 127.0.0.53\nnameserver 192.0.2.53\n")
    first = provision(root, "--no-qr", "--allow-ip", "198.51.100.0/24")  # mqtt.bank.example
    assert first.returncode == 0, first.stderr
    assert "could not resolve mqtt.bank.example" in first.stderr
    dropin = root / "etc/systemd/system/branch-agent.service.d/10-egress.conf"
    allowed = [ln.split("=", 1)[1] for ln in dropin.read_text().splitlines()
               if ln.startswith("IPAddressAllow=")]
    assert allowed == ["localhost", "192.0.2.53", "198.51.100.0/24"]
    assert "IPAddressDeny=any" in dropin.read_text()
    assert "NOT RESOLVED at provisioning: mqtt.bank.example" in dropin.read_text()

    cfg = root / "etc/branch-agent/agent.toml"
    text = cfg.read_text().replace('host = "mqtt.bank.example"', 'host = "127.0.0.1"')
    text += ('\n[sources.coap]\nbind = "192.168.10.1"\n[[sources.coap.sensors]]\n'
             'name = "atm1"\nallow = ["192.168.10.20", "fd00:10::/64"]\n')
    cfg.write_text(text)
    second = provision(root, "--no-qr")
    assert second.returncode == 0, second.stderr
    assert "could not resolve" not in second.stderr
    allowed = [ln.split("=", 1)[1] for ln in dropin.read_text().splitlines()
               if ln.startswith("IPAddressAllow=")]
    assert allowed == ["localhost", "127.0.0.1", "192.0.2.53", "192.168.10.20/32",
                       "fd00:10::/64"]
    assert f"created       {dropin}" in second.stdout
    third = provision(root, "--no-qr")
    assert "created" not in third.stdout  # drop-in and manifest unchanged
