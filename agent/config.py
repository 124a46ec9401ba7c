"""The agent's configuration: one TOML file, validated on load.

Every problem is reported at once, each as ``key.path: got VALUE, expected WHAT``; unknown keys
are errors with a did-you-mean. Each driver owns its config model (drivers/ is the ground floor);
this module composes them. config/example.toml documents every key.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from agent.core.config import StrictModel
from agent.core.errors import ConfigError
from agent.core.paths import StateLayout
from agent.rules.config import (
    ArmingConfig,
    HeldOpenConfig,
    SequenceConfig,
    SilenceConfig,
)
from agent.rules.config import problems as arming_problems
from agent.runtime.pipeline import Rule, Threshold
from agent.security.config import AuditConfig, CommandsConfig
from agent.uplink.config import CoapUplinkConfig, MqttUplinkConfig
from drivers.ble import BleConfig
from drivers.coap.config import CoapIngestConfig
from drivers.gpio.config import GpioConfig
from drivers.modbus_tcp.config import ModbusTcpConfigs
from drivers.nut.config import NutSourceList
from drivers.serial import SerialConfig
from drivers.snmp import SnmpList
from drivers.synthetic import SyntheticConfig

__all__ = ["DEFAULT_CONFIG_PATH", "AgentConfig", "format_errors", "load_config", "parse_config"]

DEFAULT_CONFIG_PATH = Path("/etc/branch-agent/agent.toml")

GatewayId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")]


class GatewayConfig(StrictModel):
    id: GatewayId
    state_dir: Path = Path("/var/lib/branch-agent")
    runtime_dir: Path = Field(
        default=Path("/run/branch-agent"),
        description="advisory files rewritten while the agent runs (status.json): a tmpfs "
        "(the unit's RuntimeDirectory=), so that they cost the SD card nothing",
    )
    key_file: Path = Path("/etc/branch-agent/keys/signing.key")
    time_sync: str = Field(
        default="auto",
        description="auto | synced | unsynced | file:PATH (synchronised while PATH exists)",
    )

    @field_validator("time_sync")
    @classmethod
    def _time_sync(cls, v: str) -> str:
        if v in ("auto", "synced", "unsynced") or (v.startswith("file:") and len(v) > 5):
            return v
        raise ValueError("expected auto, synced, unsynced or file:PATH")


class LogConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class OutboxConfig(StrictModel):
    quota_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    low_watermark: float = Field(default=0.9, gt=0.1, lt=1.0)
    commit_interval_ms: float = Field(default=5.0, ge=0, le=1000)
    commit_max_events: int = Field(default=500, ge=1, le=100_000)
    telemetry_window_ms: float = Field(
        default=10_000.0, ge=0, le=60_000,
        description="how long locally produced telemetry and diagnostics may wait to be "
        "committed together (one fsync per window, not per reading: SD card wear). A power "
        "cut loses at most this much of them; alarms, alerts and CoAP readings commit at "
        "once and take the waiting telemetry with them. 0 = commit every reading at once",
    )
    reserve_bytes: int = Field(
        default=1024 * 1024, ge=0,
        description="space kept allocated beside the store and released when the disk fills, "
        "so alarms can still be committed; 0 = none",
    )


class ForwarderConfig(StrictModel):
    batch_max_events: int = Field(default=500, ge=1, le=10_000)
    batch_max_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    ack_mode: Literal["platform", "broker"] = "platform"
    ack_timeout_s: float = Field(default=15.0, gt=0)
    window: int = Field(default=4, ge=1, le=64, description="signed batches in flight at once")
    compression: Literal["none", "zstd"] = Field(
        default="none",
        description="zstd: each batch's signed payload compressed (docs/PROTOCOL.md 3.1; about "
        "a sixth of the bytes on the wire). The batch says so in its header; a platform that "
        "does not support it refuses such batches as malformed, so turn it on once yours does",
    )
    batch_linger_ms: float = Field(
        default=250.0, ge=0, le=60_000,
        description="wait up to this long for a batch to fill; alarms never wait",
    )
    alarm_lane: bool = Field(
        default=True,
        description="alarms on a hash chain and MQTT topic of their own (docs/PROTOCOL.md 3.2), "
        "so that they never wait behind a backlog's batches. A platform without lanes refuses "
        "them as malformed: the agent then turns the lane off by itself (the alarms go again "
        "with the rest, after three refusals); set false for such a platform",
    )
    drain_rate_bytes_per_s: int = Field(default=0, ge=0, description="0 = unlimited")
    status_interval_s: float = Field(default=30.0, gt=0)


class UplinkConfig(StrictModel):
    order: list[Literal["mqtt", "coap"]] = Field(default=["mqtt"], min_length=1)
    failover_after_s: float = Field(default=30.0, ge=0)
    mqtt: MqttUplinkConfig | None = None
    coap: CoapUplinkConfig | None = None

    @model_validator(mode="after")
    def _listed_have_tables(self) -> UplinkConfig:
        for name in self.order:
            if getattr(self, name) is None:
                raise ValueError(f"expected an [uplink.{name}] table, since uplink.order lists "
                                 f"{name!r}")
        return self


class ThresholdConfig(StrictModel):
    above: float | None = None
    below: float | None = None
    hysteresis: float = Field(default=0.0, ge=0)
    type: str | None = None
    priority: int = Field(default=1, ge=0, le=3)

    @model_validator(mode="after")
    def _one_side(self) -> ThresholdConfig:
        if (self.above is None) == (self.below is None):
            raise ValueError("expected exactly one of above or below")
        return self


class RuleConfig(StrictModel):
    source: str = "*"
    type: str = "*"
    debounce_ms: float = Field(default=0.0, ge=0)
    on_change_only: bool = False
    deadband: float | None = Field(default=None, ge=0)
    min_interval_s: float = Field(default=0.0, ge=0)
    max_interval_s: float | None = Field(default=None, gt=0)
    priority: int | None = Field(default=None, ge=0, le=3)
    priority_armed: int | None = Field(
        default=None, ge=0, le=3, description="the priority while the branch is armed "
        "(needs [arming]); e.g. a vault contact: an alarm while armed")
    priority_disarmed: int | None = Field(
        default=None, ge=0, le=3, description="the priority while disarmed (needs [arming]); "
        "e.g. a vault contact: telemetry during opening hours")
    drop: bool = False
    thresholds: list[ThresholdConfig] = Field(default_factory=list)

    def to_rule(self) -> Rule:
        return Rule(
            source=self.source,
            type=self.type,
            debounce_s=self.debounce_ms / 1000.0,
            on_change_only=self.on_change_only,
            deadband=self.deadband,
            min_interval_s=self.min_interval_s,
            max_interval_s=self.max_interval_s,
            priority=self.priority,
            priority_armed=self.priority_armed,
            priority_disarmed=self.priority_disarmed,
            drop=self.drop,
            thresholds=tuple(
                Threshold(t.above, t.below, t.hysteresis, t.type, t.priority)
                for t in self.thresholds
            ),
        )


class PrivacyConfig(StrictModel):
    strip_attrs: list[str] = Field(default_factory=list)
    pseudonymise_attrs: list[str] = Field(default_factory=list)


class MetricsConfig(StrictModel):
    """Optional Prometheus endpoint; off unless enabled, and on localhost unless told."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(default=9108, ge=1, le=65535)


class SourcesConfig(StrictModel):
    synthetic: list[SyntheticConfig] = Field(default_factory=list)
    gpio: GpioConfig | None = None
    serial: SerialConfig = SerialConfig()
    coap: CoapIngestConfig | None = Field(
        default=None, description="CoAP ingest for IP sensors; off unless this table is present"
    )
    ble: BleConfig | None = Field(
        default=None, description="BLE scanner through BlueZ; off unless this table is present"
    )
    nut: NutSourceList = Field(default_factory=list,
                               description="UPSs on NUT servers (upsd, TCP 3493)")
    snmp: SnmpList = Field(default_factory=list,
                           description="UPS network cards and PDUs over SNMP (v2c, v3 authPriv)")
    modbus_tcp: ModbusTcpConfigs = Field(
        default_factory=list, description="Modbus TCP meters, PLCs and TCP-to-RTU gateways")


class AgentConfig(StrictModel):
    gateway: GatewayConfig
    log: LogConfig = LogConfig()
    outbox: OutboxConfig = OutboxConfig()
    forwarder: ForwarderConfig = ForwarderConfig()
    uplink: UplinkConfig
    sources: SourcesConfig = SourcesConfig()
    rules: list[RuleConfig] = Field(default_factory=list)
    privacy: PrivacyConfig = PrivacyConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    commands: CommandsConfig | None = Field(
        default=None, description="signed downlink commands; off unless this table is present"
    )
    arming: ArmingConfig | None = Field(
        default=None, description="when the branch is armed (docs/RULES.md); off unless this "
        "table is present"
    )
    held_open: list[HeldOpenConfig] = Field(default_factory=list)
    silence: list[SilenceConfig] = Field(default_factory=list)
    sequence: list[SequenceConfig] = Field(default_factory=list)

    @property
    def outbox_path(self) -> Path:
        return StateLayout(self.gateway.state_dir).outbox


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (for did-you-mean suggestions)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    args = getattr(tp, "__args__", None)
    if args:
        for a in args:
            inner = _unwrap(a)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return tp


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_errors(exc: ValidationError, root: type[BaseModel] = AgentConfig) -> list[str]:
    """One line per problem: `key.path: got VALUE, expected WHAT`."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1)
                if close:
                    hint = f"; did you mean '{close[0]}'?"
            lines.append(f"{path}: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"{path}: missing, expected a value (this key is required)")
        else:
            msg = str(err["msg"])
            for prefix in ("Value error, ", "Assertion failed, ", "Input should be ",
                           "expected "):
                msg = msg.removeprefix(prefix)
            msg = msg.replace("String should match pattern", "text matching")
            msg = msg.replace("String should have", "text with")
            expected = msg[0].lower() + msg[1:] if msg else kind
            lines.append(f"{path}: got {_show(err.get('input'))}, expected {expected}")
    return lines


def cross_problems(cfg: AgentConfig) -> list[str]:
    """What no single key shows: overlapping periods and exception dates given twice in
    [arming], armed-state priorities without [arming]. Same line format as `format_errors`."""
    out = arming_problems(cfg.arming)
    if cfg.arming is None:
        for i, r in enumerate(cfg.rules):
            for key in ("priority_armed", "priority_disarmed"):
                if getattr(r, key) is not None:
                    out.append(f"rules[{i}].{key}: got {getattr(r, key)!r}, expected an [arming] "
                               "table (the arm state decides this priority)")
    return out


def parse_config(data: dict[str, Any], origin: str = "<config>") -> AgentConfig:
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = format_errors(exc)
        raise ConfigError(f"{origin}: {len(problems)} problem(s)", problems) from None
    problems = cross_problems(cfg)
    if problems:
        raise ConfigError(f"{origin}: {len(problems)} problem(s)", problems)
    return cfg


def load_config(path: Path) -> AgentConfig:
    """Read and validate `path`; ConfigError lists every problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", [f"{path}: {exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML", [f"{path}: {exc}"]) from None
    return parse_config(data, str(path))
