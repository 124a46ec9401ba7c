"""`branch-agent provision`: turn a blank root file system (a mounted SD image, or `/`) into a
gateway that only needs the bank's certificate and a first boot.

It writes, under `root`: the config from a template (etc/branch-agent/agent.toml), the Ed25519
signing key (0600), an MQTT client key (EC P-256, 0600) and a CSR for the bank's CA, the systemd
unit enabled for multi-user.target, and the sysusers.d / tmpfiles.d snippets that create the
`branch-agent` user and fix key ownership at first boot. Existing keys and an existing config are
never overwritten: provisioning twice is safe and prints the same identity.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import parse_config
from agent.keys import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    KeyInfo,
    generate_keypair,
    key_info,
    load_public_key,
)

__all__ = [
    "DEFAULT_EXEC",
    "UNIT_NAME",
    "ProvisionResult",
    "Target",
    "parse_broker",
    "provision",
    "registration_text",
    "render_config",
    "units_dir",
]

UNIT_NAME = "branch-agent.service"
DEFAULT_EXEC = "/opt/branch-agent/bin/branch-agent"
SNIPPET = "branch-agent.conf"


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


def units_dir() -> Path:
    """The shipped systemd/ directory (beside the agent package in a checkout or an editable
    install, which is how gateways get the agent: a venv in /opt/branch-agent)."""
    return Path(__file__).resolve().parents[1] / "systemd"


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
        raise ValueError(f"broker {text!r}: expected HOST or HOST:PORT (port 1-65535)")
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


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create `path` with `mode` from the first byte on (O_EXCL); False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have removed bits (0644 files)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return True


def _client_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key; move it aside and provision again")
        return key, False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return key, _write_new(path, pem, 0o600)


def _csr(key: ec.EllipticCurvePrivateKey, gateway_id: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, gateway_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "branch gateways"),
        ]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _unit_text(exec_path: str) -> bytes:
    return (units_dir() / UNIT_NAME).read_text().replace(DEFAULT_EXEC, exec_path).encode()


def provision(root: Path, gateway_id: str, broker: str, coap: str | None = None, *,
              exec_path: str = DEFAULT_EXEC, t: Target = Target()) -> ProvisionResult:
    """Provision `root` (see the module docstring). Raises ValueError/ConfigError on bad input,
    OSError when `root` cannot be written."""
    config_text = render_config(gateway_id, broker, coap, t)  # validate before writing anything
    root = Path(root)
    created: list[Path] = []
    kept: list[Path] = []

    def note(path: Path, new: bool) -> None:
        (created if new else kept).append(path)

    for d in (t.etc, t.keys, t.tls):
        _under(root, d).mkdir(parents=True, exist_ok=True, mode=0o750)
    _under(root, t.state).mkdir(parents=True, exist_ok=True, mode=0o700)

    cfg_path = _under(root, t.config)
    note(cfg_path, _write_new(cfg_path, config_text.encode(), 0o640))

    keys = _under(root, t.keys)
    if (keys / PRIVATE_NAME).exists():
        info = key_info(load_public_key(keys / PUBLIC_NAME))
        note(keys / PRIVATE_NAME, False)
    else:
        info = generate_keypair(keys)
        note(keys / PRIVATE_NAME, True)

    tls = _under(root, t.tls)
    ckey, new = _client_key(tls / "client.key")
    note(tls / "client.key", new)
    csr_path = tls / "client.csr"
    # A CSR from a kept key is the same request again: keep the file the installer may have sent.
    note(csr_path, _write_new(csr_path, _csr(ckey, gateway_id), 0o644))

    files = {
        root / "etc/systemd/system" / UNIT_NAME: _unit_text(exec_path),
        root / "usr/lib/sysusers.d" / SNIPPET: (units_dir() / "sysusers.d" / SNIPPET).read_bytes(),
        root / "usr/lib/tmpfiles.d" / SNIPPET: (units_dir() / "tmpfiles.d" / SNIPPET).read_bytes(),
    }
    for path, data in files.items():
        # Shipped files follow the installed agent version: replace them when they differ.
        if path.exists() and path.read_bytes() == data:
            note(path, False)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        os.replace(tmp, path)
        note(path, True)

    # What `systemctl enable` does: a symlink in the target's wants directory (works offline on an
    # image, where systemctl cannot talk to a running systemd).
    wants = root / "etc/systemd/system/multi-user.target.wants" / UNIT_NAME
    wants.parent.mkdir(parents=True, exist_ok=True)
    if not wants.is_symlink():
        wants.symlink_to(f"/etc/systemd/system/{UNIT_NAME}")
        note(wants, True)
    else:
        note(wants, False)
    return ProvisionResult(gateway_id, info, cfg_path, csr_path, created, kept)


def registration_text(gateway_id: str, info: KeyInfo) -> str:
    """What the platform registers, compact enough for a terminal QR code."""
    return json.dumps({"gw": gateway_id, "kid": info.kid.hex(), "fp": info.fingerprint},
                      separators=(",", ":"))
