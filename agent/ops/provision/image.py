"""`branch-agent provision`: turn a blank root file system (a mounted SD image, or `/`) into a
gateway that only needs the bank's certificate and a first boot.

It writes, under `root`: the config from a template (etc/branch-agent/agent.toml), the Ed25519
signing key (0600), an MQTT client key (EC P-256, 0600) and a CSR for the bank's CA, the systemd
unit enabled for multi-user.target with an egress allowlist drop-in generated from the config
(`branch-agent.service.d/10-egress.conf`), the sysusers.d / tmpfiles.d snippets that create the
`branch-agent` user and fix key ownership at first boot, and the integrity manifest
(usr/lib/branch-agent/manifest.json, agent.integrity). Existing keys and an existing config are
never overwritten: provisioning twice is safe and prints the same identity.

The rest of the key lifecycle lives here too: `renew` (a new MQTT client key and a CSR
authenticated by the gateway's signing key, waiting in tls/next/), `install_cert` (checks and
switches over to the certificate the CA returned) and `wipe` (removes keys, state and config).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import ipaddress
import json
import os
import shutil
import socket
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import AgentConfig, parse_config
from agent.core.atomic import write_atomic
from agent.core.errors import OperatorError
from agent.core.paths import StateLayout
from agent.security.integrity import MANIFEST_PATH, build_manifest, installed_trees, write_manifest
from agent.security.keys import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    KeyInfo,
    generate_keypair,
    key_info,
    load_private_key,
    load_public_key,
)

__all__ = [
    "DEFAULT_EXEC",
    "EGRESS_DROPIN",
    "UNIT_NAME",
    "InstallResult",
    "ProvisionResult",
    "RenewResult",
    "Target",
    "WipeResult",
    "agent_pid",
    "egress_allowlist",
    "install_cert",
    "parse_broker",
    "provision",
    "registration_text",
    "render_config",
    "render_egress",
    "renew",
    "units_dir",
    "wipe",
    "wipe_check",
]

UNIT_NAME = "branch-agent.service"
DEFAULT_EXEC = "/opt/branch-agent/bin/branch-agent"
SNIPPET = "branch-agent.conf"
EGRESS_DROPIN = Path("etc/systemd/system") / f"{UNIT_NAME}.d" / "10-egress.conf"


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


DIST_NAME = "branch-gateway-agent"


def units_dir() -> Path:
    """The shipped systemd/ directory: beside the agent package in a checkout or an editable
    install; else where the wheel put it (``<prefix>/share/branch-agent/systemd``, found through
    the distribution's file list, so any prefix or venv works). Raises FileNotFoundError."""
    here = Path(__file__).resolve().parents[1] / "systemd"
    if (here / UNIT_NAME).is_file():
        return here
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DIST_NAME)
    except PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if f.name == UNIT_NAME and "systemd" in f.parts:
                found = Path(str(dist.locate_file(f))).resolve().parent
                if (found / UNIT_NAME).is_file():
                    return found
    raise FileNotFoundError(
        f"the agent's systemd units are not installed (looked in {here} and in the files of "
        f"the {DIST_NAME} distribution); reinstall it with pip"
    )


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


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create `path` with `mode` from the first byte on (O_EXCL); False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data, mode, exclusive=True)


def _client_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise OperatorError(
                f"{path} is not an EC private key; move it aside and provision again")
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


def _resolve(host: str) -> list[str]:
    """The addresses of `host` now (an address literal is itself); [] if it does not resolve."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({str(ipaddress.ip_address(str(i[4][0]).split("%")[0])) for i in infos})


def _nameservers(resolv_conf: Path) -> list[str]:
    """Non-loopback `nameserver` lines of resolv.conf (loopback is allowed anyway)."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    addr = ipaddress.ip_address(parts[1].split("%")[0])
                    if not addr.is_loopback:
                        out.append(str(addr))
    return out


def egress_allowlist(cfg: AgentConfig, *, nameservers: Iterable[str] = (),
                     extra: Iterable[str] = (),
                     resolve: Callable[[str], list[str]] = _resolve,
                     ) -> tuple[list[tuple[str, str]], list[str]]:
    """([(address or prefix, why)], [unresolved hosts]) the agent's unit may exchange IP packets
    with: the uplinks' hosts (resolved now), the DNS servers, the CoAP sensors' networks (only
    those configured) and `extra` (`provision --allow-ip`). Loopback is always allowed."""
    allow: list[tuple[str, str]] = []
    unresolved: list[str] = []
    hosts: list[tuple[str, str]] = []
    if cfg.uplink.mqtt is not None:
        mq = cfg.uplink.mqtt
        hosts.append((mq.host, f"mqtt broker {mq.host}:{mq.port}"))
    if cfg.uplink.coap is not None:
        host = urlsplit(cfg.uplink.coap.base).hostname
        if host:
            hosts.append((host, f"coap platform {cfg.uplink.coap.base}"))
    for host, why in hosts:
        addrs = resolve(host)
        if not addrs:
            unresolved.append(f"{host} ({why})")
        allow += [(a, why) for a in addrs]
    allow += [(ns, "DNS server (resolv.conf)") for ns in nameservers]
    if cfg.sources.coap is not None:
        for sensor in cfg.sources.coap.sensors:
            allow += [(str(net), f"CoAP sensor {sensor.name}") for net in sensor.allow]
    for item in extra:
        allow.append((str(ipaddress.ip_network(item)), "--allow-ip"))
    first: dict[str, str] = {}
    for addr, why in allow:
        first.setdefault(addr, why)
    return list(first.items()), unresolved


def render_egress(allow: Sequence[tuple[str, str]], unresolved: Sequence[str],
                  origin: str) -> str:
    """The drop-in: everything denied but loopback and `allow` (deterministic text)."""
    lines = [
        "# Egress allowlist of branch-agent, generated by `branch-agent provision` from",
        f"# {origin}. Do not edit: re-run provision after a change of the config or of the",
        "# platform's DNS records (names are resolved at provisioning; docs/OPERATIONS.md).",
        "[Service]",
        "IPAddressDeny=any",
        "# loopback (systemd-resolved, a local broker)",
        "IPAddressAllow=localhost",
    ]
    for addr, why in allow:
        lines += [f"# {why}", f"IPAddressAllow={addr}"]
    for host in unresolved:
        lines.append(f"# NOT RESOLVED at provisioning: {host}; blocked until provision is re-run "
                     "where it resolves (or given with --allow-ip)")
    return "\n".join(lines) + "\n"


def _replace_file(path: Path, data: bytes) -> bool:
    """Write `path` (0644) unless it already holds `data`; True if it was written."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data, 0o644)


def provision(root: Path, gateway_id: str, broker: str, coap: str | None = None, *,
              exec_path: str = DEFAULT_EXEC, t: Target = Target(),
              allow_ips: Sequence[str] = ()) -> ProvisionResult:
    """Provision `root` (see the module docstring). Raises ValueError/ConfigError on bad input,
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

    # The egress allowlist follows the config as it is on the card (the installer may have
    # edited a kept one), with names resolved now.
    cfg = parse_config(tomllib.loads(cfg_path.read_text()), str(cfg_path))
    allow, unresolved = egress_allowlist(cfg, nameservers=_nameservers(root / "etc/resolv.conf"),
                                         extra=allow_ips)
    warnings += [f"could not resolve {h}: the service may not reach it (re-run provision where "
                 "it resolves, or pass --allow-ip)" for h in unresolved]
    unit = root / "etc/systemd/system" / UNIT_NAME
    dropin = root / EGRESS_DROPIN
    files = {
        unit: _unit_text(exec_path),
        dropin: render_egress(allow, unresolved, str(t.config)).encode(),
        root / "usr/lib/sysusers.d" / SNIPPET: (units_dir() / "sysusers.d" / SNIPPET).read_bytes(),
        root / "usr/lib/tmpfiles.d" / SNIPPET: (units_dir() / "tmpfiles.d" / SNIPPET).read_bytes(),
    }
    for path, data in files.items():
        # Shipped and generated files follow the installed agent and the config: replace them.
        note(path, _replace_file(path, data))

    # What `systemctl enable` does: a symlink in the target's wants directory (works offline on an
    # image, where systemctl cannot talk to a running systemd).
    wants = root / "etc/systemd/system/multi-user.target.wants" / UNIT_NAME
    wants.parent.mkdir(parents=True, exist_ok=True)
    if not wants.is_symlink():
        wants.symlink_to(f"/etc/systemd/system/{UNIT_NAME}")
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


# --------------------------------------------------------------------------- certificate renewal


@dataclass(frozen=True)
class RenewResult:
    key: Path  # tls/next/client.key
    csr: Path  # tls/next/client.csr: send it to the bank's CA ...
    auth: Path  # ... with tls/next/client.csr.cose (COSE_Sign1 by the gateway's signing key)
    new_key: bool
    kid: str


@dataclass(frozen=True)
class InstallResult:
    cert: Path
    key: Path
    subject: str
    serial: str
    not_after: str
    sha256: str
    kept_prev: list[Path]


def _mqtt_tls(cfg: AgentConfig) -> Any:
    mq = cfg.uplink.mqtt
    if mq is None or mq.tls is None:
        raise OperatorError("certificate renewal needs [uplink.mqtt.tls] (ca, cert, key) in the "
                         "config")
    return mq.tls


def _next_dir(tls: Any) -> Path:
    return Path(tls.key).parent / "next"


def _der_of_pem_cert(path: Path) -> bytes | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.public_bytes(serialization.Encoding.DER)


def renew(cfg: AgentConfig, now: Callable[[], float] = time.time) -> RenewResult:
    """A new MQTT client key (EC P-256, 0600) and its CSR in tls/next/, with
    tls/next/client.csr.cose: a COSE_Sign1 (EdDSA, kid of the gateway's registered signing key)
    over the canonical CBOR map {"type": "mqtt-csr-renewal", "gw": id, "csr": SHA-256 of the
    CSR's DER, "cur": SHA-256 of the current certificate's DER or null, "iat": seconds}.
    Running it again keeps a pending key and its CSR (the CA may already have them)."""
    from agent.protocol.renewal import renewal_request

    tls = _mqtt_tls(cfg)
    signing = load_private_key(cfg.gateway.key_file)  # KeyFileError (ValueError) if unsafe
    nxt = _next_dir(tls)
    nxt.mkdir(parents=True, exist_ok=True, mode=0o750)
    key, new_key = _client_key(nxt / "client.key")
    csr_path, auth_path = nxt / "client.csr", nxt / "client.csr.cose"
    if new_key or not csr_path.exists() or not auth_path.exists():
        csr_pem = _csr(key, cfg.gateway.id)
        der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
        cur = _der_of_pem_cert(Path(tls.cert))
        write_atomic(csr_path, csr_pem, 0o644)
        write_atomic(auth_path, renewal_request(signing, cfg.gateway.id, der, cur, now()),
                     0o644)
    from agent.protocol import kid_for

    return RenewResult(nxt / "client.key", csr_path, auth_path, new_key,
                       kid_for(signing.public_key()).hex())




def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _chains_to(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
               anchors: Sequence[x509.Certificate], at: dt.datetime) -> bool:
    """Signature path from `leaf` through `intermediates` to one of `anchors`, each certificate
    in date. (cryptography's PolicyBuilder client verifier insists on a subjectAltName, which
    gateway client certificates issued for our CSR do not carry.)"""
    cert = leaf
    for _ in range(len(intermediates) + 1):
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            return False
        for issuer in anchors:
            with contextlib.suppress(ValueError, TypeError, InvalidSignature):
                cert.verify_directly_issued_by(issuer)
                return issuer.not_valid_before_utc <= at <= issuer.not_valid_after_utc
        for issuer in intermediates:
            with contextlib.suppress(ValueError, TypeError, InvalidSignature):
                cert.verify_directly_issued_by(issuer)
                cert = issuer
                break
        else:
            return False
    return False


def _keep_prev(path: Path, mode: int) -> Path | None:
    if not path.exists():
        return None
    prev = path.with_name(path.name + ".prev")
    write_atomic(prev, path.read_bytes(), mode)
    return prev


def install_cert(cfg: AgentConfig, cert_path: Path,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
                 ) -> InstallResult:
    """Check that `cert_path` (PEM, leaf first, optional intermediates) is for the pending key
    in tls/next/ and chains to the configured CA, then switch over: the current key and
    certificate are kept as `.prev`, each new file replaces the old one with one atomic rename
    (key first: the agent reads both at its next connect). Raises ValueError when the
    certificate is wrong; running it again after an interruption completes the switch."""
    tls = _mqtt_tls(cfg)
    try:
        chain = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except ValueError:
        raise OperatorError(f"{cert_path}: not a PEM certificate") from None
    leaf, intermediates = chain[0], chain[1:]
    key_path, cur_cert = Path(tls.key), Path(tls.cert)
    pending = _next_dir(tls) / "client.key"
    want = _spki(leaf.public_key())

    def key_spki(p: Path) -> bytes | None:
        try:
            return _spki(serialization.load_pem_private_key(p.read_bytes(), None).public_key())
        except (OSError, ValueError, TypeError):
            return None

    if pending.exists() and key_spki(pending) == want:
        new_key: Path | None = pending
    elif key_spki(key_path) == want:
        new_key = None  # the key is already in place (an interrupted or repeated install)
    else:
        raise OperatorError(f"{cert_path} was not issued for the pending key {pending} (was it "
                         f"issued for {pending.parent / 'client.csr'}?)")
    try:
        anchors = x509.load_pem_x509_certificates(Path(tls.ca).read_bytes())
    except (OSError, ValueError) as exc:
        raise OperatorError(f"cannot read the configured CA {tls.ca}: {exc}") from None
    if not _chains_to(leaf, intermediates, anchors, now()):
        raise OperatorError(f"{cert_path} does not chain to the configured CA {tls.ca}, or is not "
                         "in date")
    kept = [p for p in (_keep_prev(key_path, 0o600) if new_key else None,
                        _keep_prev(cur_cert, 0o644)) if p is not None]
    if new_key is not None:
        os.replace(new_key, key_path)  # same directory tree and file system: atomic
    write_atomic(cur_cert, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
                 0o644)
    nxt = _next_dir(tls)
    if nxt.exists():
        for name in ("client.csr", "client.csr.cose"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(nxt / name, key_path.parent / name)
        shutil.rmtree(nxt)
    return InstallResult(cur_cert, key_path, leaf.subject.rfc4514_string(),
                         format(leaf.serial_number, "x"),
                         leaf.not_valid_after_utc.isoformat(timespec="seconds"),
                         hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
                         kept)


# --------------------------------------------------------------------------- wipe


@dataclass
class WipeResult:
    removed: list[Path] = field(default_factory=list)
    audit_kept: Path | None = None  # the local audit log, left in place
    audit_export: Path | None = None  # or exported here, then removed


# Directories `wipe` never removes as a whole, whatever the config says.
_SYSTEM_DIRS = frozenset(Path(p) for p in (
    "/", "/etc", "/var", "/var/lib", "/usr", "/usr/lib", "/opt", "/home", "/root", "/tmp",
    "/srv", "/run", "/boot", "/mnt", "/media"))


def _owned_dir(d: Path) -> bool:
    d = d.resolve()
    return len(d.parts) >= 3 and d not in _SYSTEM_DIRS and d != Path.home().resolve()


def agent_pid(cfg: AgentConfig) -> int | None:
    """The pid in the state dir's status.json if that process is alive, else None."""
    try:
        pid = int(json.loads(StateLayout(cfg.gateway.state_dir).status.read_text()).get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # exists, owned by the agent's user
    return pid


def _audit_path(cfg: AgentConfig) -> Path:
    return cfg.audit.path or StateLayout(cfg.gateway.state_dir).audit_log


def wipe_check(cfg: AgentConfig, keep_audit: Path | None = None) -> None:
    """The refusals of `wipe`, made before anything is touched, so that the caller records a
    wipe only once it is going ahead. Raises ValueError naming the reason."""
    from agent.security import audit

    state = cfg.gateway.state_dir
    if state.exists() and not _owned_dir(state):
        raise OperatorError(f"refusing to wipe {state}: gateway.state_dir must be the agent's own "
                         "directory")
    log_path = _audit_path(cfg)
    if keep_audit is not None and log_path.exists():
        checked = audit.verify(log_path)
        if not checked.ok:
            raise OperatorError(f"the audit log {log_path} does not verify ({checked.problems[0]});"
                             " nothing wiped: `branch-agent audit verify` names the damage")


def wipe(cfg: AgentConfig, config_path: Path, keep_audit: Path | None = None) -> WipeResult:
    """Remove the gateway's keys (signing, TLS, pending ones, `.prev`), its trust anchors and
    OSCORE context, everything in its state dir, and its config. The local audit log is kept
    in place, or exported to `keep_audit` (JSON lines, verified) and then removed too. The
    caller checks the agent is not running (`agent_pid`), runs `wipe_check`, then records
    `audit.operator_command` before calling this (which checks again)."""
    from agent.security import audit

    wipe_check(cfg, keep_audit)
    res = WipeResult()
    state = cfg.gateway.state_dir
    log_path = _audit_path(cfg)
    if keep_audit is not None and log_path.exists():
        keep_audit.parent.mkdir(parents=True, exist_ok=True)
        out = io.StringIO()
        checked = audit.export(log_path, out)
        write_atomic(keep_audit, out.getvalue().encode(), 0o640)
        if not checked.ok:
            raise OperatorError(f"the audit log {log_path} does not verify ({checked.problems[0]});"
                             f" exported to {keep_audit}, nothing wiped")
        res.audit_export = keep_audit
    keeping = keep_audit is None and log_path.exists()
    if keeping:
        res.audit_kept = log_path
    log_real = log_path.resolve()

    def is_audit(p: Path) -> bool:
        """`p` is the audit log, one of its rotated files, or a directory holding them."""
        real = p.resolve()
        return real in log_real.parents or (real.parent == log_real.parent
                                            and real.name.startswith(log_real.name))

    def remove(p: Path) -> None:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            return
        res.removed.append(p)

    key_file = cfg.gateway.key_file
    files = [key_file, key_file.with_name(PUBLIC_NAME), key_file.parent / "next"]
    mq = cfg.uplink.mqtt
    if mq is not None and mq.tls is not None:
        key, cert = Path(mq.tls.key), Path(mq.tls.cert)
        files += [key, cert, Path(mq.tls.ca), key.with_name(key.name + ".prev"),
                  cert.with_name(cert.name + ".prev"), key.parent / "client.csr",
                  key.parent / "client.csr.cose", _next_dir(mq.tls)]
    if cfg.commands is not None:
        files.append(cfg.commands.platform_key)
    co = cfg.uplink.coap
    if co is not None and co.oscore is not None and _owned_dir(co.oscore.context):
        files.append(co.oscore.context)
    for p in files:
        remove(p)
    if state.exists():
        for child in sorted(state.iterdir()):
            if not (keeping and is_audit(child)):
                remove(child)
    if keep_audit is not None:
        rotated = [p for p in log_path.parent.glob(log_path.name + ".*")
                   if p.name.rsplit(".", 1)[1].isdigit()]
        for p in [log_path, *rotated]:
            remove(p)
    remove(config_path)
    # Directories left empty (keys/, tls/, the config dir) go too; non-empty ones stay.
    for d in {key_file.parent, *(Path(p).parent for p in files), config_path.parent}:
        with contextlib.suppress(OSError):
            if d.is_dir() and _owned_dir(d) and not any(d.iterdir()):
                d.rmdir()
                res.removed.append(d)
    return res


def registration_text(gateway_id: str, info: KeyInfo) -> str:
    """What the platform registers, compact enough for a terminal QR code."""
    return json.dumps({"gw": gateway_id, "kid": info.kid.hex(), "fp": info.fingerprint},
                      separators=(",", ":"))
