"""Provisioning an image: turn a blank root file system (a mounted SD image, or `/`) into a
gateway that only needs the bank's certificate and a first boot. Existing keys and an existing
config are never overwritten: provisioning twice is safe and prints the same identity."""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import parse_config
from agent.core.atomic import write_atomic
from agent.core.errors import OperatorError
from agent.ops.provision.clientkey import client_key, make_csr, write_new
from agent.ops.provision.egress import (
    EGRESS_DROPIN,
    egress_allowlist,
    nameservers_of,
    render_egress,
)
from agent.ops.provision.units import DEFAULT_EXEC, SNIPPET, UNIT_NAME, unit_text, units_dir
from agent.security.integrity import MANIFEST_PATH, build_manifest, installed_trees, write_manifest
from agent.security.keys import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    KeyInfo,
    generate_keypair,
    key_info,
    load_public_key,
)

__all__ = [
    "ProvisionResult",
    "Target",
    "parse_broker",
    "provision",
    "registration_text",
    "render_config",
]


@dataclass(frozen=True)
class Target:
    """Where things go on the gateway (absolute paths as the gateway sees them)."""

    etc: Path = Path("/etc/branch-agent")
    state: Path = Path("/var/lib/branch-agent")

    @property
    def config(self) -> Path:
        return self.etc / "agent.toml"

    @property
    def keys(self) -> Path:
        return self.etc / "keys"

    @property
    def tls(self) -> Path:
        return self.etc / "tls"


@dataclass
class ProvisionResult:
    gateway_id: str
    info: KeyInfo
    config: Path  # under root
    csr: Path  # under root
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_broker(text: str) -> tuple[str, int]:
    """`host`, `host:port` or `[v6addr]:port` -> (host, port); 8883 by default."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "8883"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, "8883"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OperatorError(f"broker {text!r}: expected HOST or HOST:PORT (port 1-65535)")
    return host, int(port)


def _q(v: str | Path) -> str:
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def render_config(gateway_id: str, broker: str, coap: str | None, t: Target = Target()) -> str:
    """The gateway's agent.toml; validated before it is written (it must pass check-config)."""
    host, port = parse_broker(broker)
    order = ["mqtt", "coap"] if coap else ["mqtt"]
    text = f"""\
# branch-agent configuration written by `branch-agent provision`.
# Every key is documented in config/example.toml. Validate: branch-agent check-config {t.config}
# Then run: branch-agent doctor

[gateway]
id = {_q(gateway_id)}
state_dir = {_q(t.state)}
key_file = {_q(t.keys / PRIVATE_NAME)}
time_sync = "auto"

[log]
level = "info"
format = "auto"

[uplink]
order = {json.dumps(order)}

[uplink.mqtt]
host = {_q(host)}
port = {port}

[uplink.mqtt.tls]
# ca.pem and client.pem come from the bank's CA (send it tls/client.csr); client.key stays here.
ca = {_q(t.tls / "ca.pem")}
cert = {_q(t.tls / "client.pem")}
key = {_q(t.tls / "client.key")}
"""
    if coap:
        text += f"""
[uplink.coap]
base = {_q(coap)}
# Batches are signed end to end, but plain CoAP is not confidential.
insecure = true
"""
    text += """
# Sources: add the branch's sensors here (see config/example.toml, docs/HARDWARE.md, docs/BLE.md).
"""
    parse_config(tomllib.loads(text), "generated config")  # ConfigError if the input was bad
    return text


def _under(root: Path, p: Path) -> Path:
    return root / p.relative_to(p.anchor)


def _replace_file(path: Path, data: bytes) -> bool:
    """Write `path` (0644) unless it already holds `data`; True if it was written."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data, 0o644)


def provision(root: Path, gateway_id: str, broker: str, coap: str | None = None, *,
              exec_path: str = DEFAULT_EXEC, t: Target = Target(),
              allow_ips: Sequence[str] = ()) -> ProvisionResult:
    """Provision `root` (see the package docstring). Raises ValueError/ConfigError on bad input,
    OSError when `root` cannot be written."""
    config_text = render_config(gateway_id, broker, coap, t)  # validate before writing anything
    for item in allow_ips:
        ipaddress.ip_network(item)  # ValueError before anything is written
    root = Path(root)
    created: list[Path] = []
    kept: list[Path] = []
    warnings: list[str] = []

    def note(path: Path, new: bool) -> None:
        (created if new else kept).append(path)

    for d in (t.etc, t.keys, t.tls):
        _under(root, d).mkdir(parents=True, exist_ok=True, mode=0o750)
    _under(root, t.state).mkdir(parents=True, exist_ok=True, mode=0o700)

    cfg_path = _under(root, t.config)
    note(cfg_path, write_new(cfg_path, config_text.encode(), 0o640))
    _readable_by_agent(root, cfg_path)

    keys = _under(root, t.keys)
    if (keys / PRIVATE_NAME).exists():
        info = key_info(load_public_key(keys / PUBLIC_NAME))
        note(keys / PRIVATE_NAME, False)
    else:
        info = generate_keypair(keys)
        note(keys / PRIVATE_NAME, True)

    tls = _under(root, t.tls)
    ckey, new = client_key(tls / "client.key")
    note(tls / "client.key", new)
    csr_path = tls / "client.csr"
    # A CSR from a kept key is the same request again: keep the file the installer may have sent.
    note(csr_path, write_new(csr_path, make_csr(ckey, gateway_id), 0o644))

    # The egress allowlist follows the config as it is on the card (the installer may have
    # edited a kept one), with names resolved now.
    cfg = parse_config(tomllib.loads(cfg_path.read_text()), str(cfg_path))
    allow, unresolved = egress_allowlist(cfg, nameservers=nameservers_of(root / "etc/resolv.conf"),
                                         extra=allow_ips)
    warnings += [f"could not resolve {h}: the service may not reach it (re-run provision where "
                 "it resolves, or pass --allow-ip)" for h in unresolved]
    dropin = root / EGRESS_DROPIN
    packaged = packaged_unit(root)
    files = {dropin: render_egress(allow, unresolved, str(t.config)).encode()}
    if packaged is not None:
        # Installed from the Debian package, which owns the unit and the sysusers and tmpfiles
        # snippets (and enabled the unit): a copy in /etc would hide the package's next unit.
        unit = packaged
        if exec_path != DEFAULT_EXEC:
            warnings.append(f"--exec-path {exec_path} ignored: the packaged unit runs "
                            f"{DEFAULT_EXEC}")
    else:
        unit = root / "etc/systemd/system" / UNIT_NAME
        files |= {
            unit: unit_text(exec_path),
            root / "usr/lib/sysusers.d" / SNIPPET:
                (units_dir() / "sysusers.d" / SNIPPET).read_bytes(),
            root / "usr/lib/tmpfiles.d" / SNIPPET:
                (units_dir() / "tmpfiles.d" / SNIPPET).read_bytes(),
        }
    for path, data in files.items():
        # Shipped and generated files follow the installed agent and the config: replace them.
        note(path, _replace_file(path, data))

    # What `systemctl enable` does: a symlink in the target's wants directory (works offline on an
    # image, where systemctl cannot talk to a running systemd).
    wants = root / "etc/systemd/system/multi-user.target.wants" / UNIT_NAME
    wants.parent.mkdir(parents=True, exist_ok=True)
    if not wants.is_symlink():
        wants.symlink_to(f"/{unit.relative_to(root)}")
        note(wants, True)
    else:
        note(wants, False)

    manifest = _under(root, MANIFEST_PATH)
    doc = build_manifest(installed_trees(), {"unit": unit, "egress": dropin})
    try:
        old = json.loads(manifest.read_text())
    except (OSError, ValueError):
        old = None
    same = isinstance(old, dict) and {**old, "created": None} == {**doc, "created": None}
    if not same:
        write_manifest(manifest, doc)
    note(manifest, not same)
    return ProvisionResult(gateway_id, info, cfg_path, csr_path, created, kept, warnings)


SERVICE_USER = "branch-agent"  # the unit's User= and Group=, made by the sysusers snippet


def _readable_by_agent(root: Path, path: Path) -> None:
    """Group `branch-agent` (of the target's /etc/group) on `path`, which is 0640: the service
    runs as that user. Without the group yet (an image provisioned before its first boot) the
    tmpfiles snippet sets it at boot."""
    try:
        groups = (root / "etc/group").read_text().splitlines()
    except OSError:
        return
    gid = next((int(f[2]) for f in (line.split(":") for line in groups)
                if len(f) > 2 and f[0] == SERVICE_USER and f[2].isdigit()), None)
    if gid is not None and os.geteuid() == 0:
        os.chown(path, 0, gid)


def packaged_unit(root: Path) -> Path | None:
    """The unit the Debian package installed under `root`, if it did (docs/OPERATIONS.md)."""
    for d in ("lib/systemd/system", "usr/lib/systemd/system"):
        if (root / d / UNIT_NAME).is_file():
            return root / d / UNIT_NAME
    return None


def registration_text(gateway_id: str, info: KeyInfo) -> str:
    """What the platform registers, compact enough for a terminal QR code."""
    return json.dumps({"gw": gateway_id, "kid": info.kid.hex(), "fp": info.fingerprint},
                      separators=(",", ":"))
