"""BLE sensors through BlueZ: BTHome, RuuviTag and iBeacon tags on an allowlist, privacy by
default for everything else. See docs/BLE.md."""

from __future__ import annotations

from drivers.base import Source, SourceContext
from drivers.ble.config import BleConfig, BleSensorConfig, PresenceConfig
from drivers.ble.scanner import BleSource, classify_error

__all__ = [
    "BleConfig",
    "BleSensorConfig",
    "BleSource",
    "PresenceConfig",
    "build_sources",
    "classify_error",
]


def build_sources(cfg: BleConfig, ctx: SourceContext) -> list[Source]:
    """One scanner serves every BLE sensor (bleak keeps one BlueZ manager per event loop)."""
    return [BleSource(cfg, ctx)]
