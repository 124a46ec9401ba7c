"""BLE driver configuration (the `[ble]` table; composed into the agent config by agent.config)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.core.config import StrictModel

__all__ = ["BleConfig", "BleSensorConfig", "PresenceConfig"]

_MAC = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")


class BleSensorConfig(StrictModel):
    """One allowlisted sensor. Readings come out as source `ble.<name>`."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    address: str
    decoder: Literal["bthome", "ruuvi", "ibeacon"]
    bindkey: SecretStr | None = None  # BTHome AES key, 32 hex digits; never logged
    missing_after_s: float = Field(default=900.0, gt=0)
    battery_low_pct: float = Field(default=20.0, ge=0, le=100)
    battery_low_v: float = Field(default=2.5, ge=0)
    rate_limit_hz: float | None = Field(default=None, gt=0, le=10_000)  # None: the scanner's
    rate_burst: int | None = Field(default=None, ge=1, le=100_000)  # None: the scanner's

    @field_validator("address")
    @classmethod
    def _mac(cls, value: str) -> str:
        value = value.strip().upper().replace("-", ":")
        if not _MAC.match(value):
            raise ValueError(f"not a Bluetooth address (AA:BB:CC:DD:EE:FF): {value!r}")
        return value

    @field_validator("bindkey")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", value.get_secret_value()):
            raise ValueError("bindkey must be 32 hex digits (a 128-bit AES key)")
        return value

    @model_validator(mode="after")
    def _key_only_for_bthome(self) -> BleSensorConfig:
        if self.bindkey is not None and self.decoder != "bthome":
            raise ValueError("bindkey is only used by the bthome decoder")
        return self

    def bindkey_bytes(self) -> bytes | None:
        return bytes.fromhex(self.bindkey.get_secret_value()) if self.bindkey else None


class PresenceConfig(StrictModel):
    """Opt-in people counting: distinct non-allowlisted devices per window, as a count only."""

    enabled: bool = False
    window_s: float = Field(default=60.0, gt=0)


class BleConfig(StrictModel):
    """``[sources.ble]``. The rate limits are checked in the scanner callback, before an advert
    is queued or decoded: ``rate_limit_hz``/``rate_burst`` per allowlisted sensor (anyone can
    send adverts with a sensor's address), ``global_rate_hz``/``global_burst`` for all the
    allowlisted sensors together. Real sensors send about one advert a second (BTHome, Ruuvi;
    iBeacon tags up to ten), and BlueZ reports an advert again on every RSSI change and scan
    response, so the defaults leave a wide margin."""

    adapter: str | None = None  # "hci0"; None = the first powered adapter with the central role
    sensors: list[BleSensorConfig] = Field(default_factory=list)
    presence: PresenceConfig = Field(default_factory=PresenceConfig)
    watchdog_s: float = Field(default=60.0, gt=0)  # no advert at all for this long: restart scan
    start_timeout_s: float = Field(default=10.0, gt=0)
    lost_after_failures: int = Field(default=3, ge=1)  # failed starts before ble.adapter_lost
    reset_after_failures: int = Field(default=5, ge=0)  # power-cycle the adapter; 0 = never
    backoff_base_s: float = Field(default=1.0, gt=0)
    backoff_cap_s: float = Field(default=60.0, gt=0)
    queue_size: int = Field(default=1000, ge=1)
    rate_limit_hz: float = Field(default=20.0, gt=0, le=10_000)
    rate_burst: int = Field(default=100, ge=1, le=100_000)
    global_rate_hz: float = Field(default=200.0, gt=0, le=100_000)
    global_burst: int = Field(default=500, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _unique(self) -> BleConfig:
        for attr in ("name", "address"):
            values = [getattr(s, attr) for s in self.sensors]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"duplicate sensor {attr}: {', '.join(dupes)}")
        return self
