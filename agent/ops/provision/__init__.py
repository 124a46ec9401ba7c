"""`branch-agent provision`: turn a blank root file system (a mounted SD image, or `/`) into a
gateway that only needs the bank's certificate and a first boot, and the rest of the key
lifecycle.

Provisioning writes, under `root`: the config from a template (etc/branch-agent/agent.toml),
the Ed25519 signing key (0600), an MQTT client key (EC P-256, 0600) and a CSR for the bank's CA,
the systemd unit enabled for multi-user.target with an egress allowlist drop-in generated from
the config (`branch-agent.service.d/10-egress.conf`), the sysusers.d / tmpfiles.d snippets that
create the `branch-agent` user and fix key ownership at first boot, and the integrity manifest
(usr/lib/branch-agent/manifest.json, agent.integrity). Existing keys and an existing config are
never overwritten: provisioning twice is safe and prints the same identity.

- `image`: `provision` itself, the config template, the registration text;
- `units`: the shipped systemd unit and snippets, and where they are installed;
- `egress`: the egress allowlist and its drop-in;
- `clientkey`: the MQTT client key and its CSR, shared by provisioning and renewal;
- `renewal`: `renew` (a new client key and a CSR authenticated by the gateway's signing key,
  waiting in tls/next/) and `install_cert` (checks and switches over to the certificate the CA
  returned);
- `wiping`: `wipe_check` and `wipe` (removes keys, state and config; keeps or exports the
  audit log).
"""

from agent.ops.provision.egress import EGRESS_DROPIN, egress_allowlist, render_egress
from agent.ops.provision.image import (
    ProvisionResult,
    Target,
    parse_broker,
    provision,
    registration_text,
    render_config,
)
from agent.ops.provision.renewal import InstallResult, RenewResult, install_cert, renew
from agent.ops.provision.units import DEFAULT_EXEC, UNIT_NAME, units_dir
from agent.ops.provision.wiping import WipeResult, agent_pid, wipe, wipe_check

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
