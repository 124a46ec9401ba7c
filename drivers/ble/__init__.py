"""BLE sensors through BlueZ: BTHome, RuuviTag and iBeacon tags on an allowlist, privacy by
default for everything else. See docs/BLE.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drivers.base import Source, SourceContext
from drivers.ble.config import BleConfig, BleSensorConfig, PresenceConfig

if TYPE_CHECKING:
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
    from drivers.ble.scanner import BleSource

    return [BleSource(cfg, ctx)]


def __getattr__(name: str) -> Any:
    # bleak, dbus-fast and the decoders cost ~40 MB: import them when BLE is used, not when a
    # config that merely could name BLE is loaded.
    if name in ("BleSource", "classify_error"):
        from drivers.ble import scanner

        return getattr(scanner, name)
    raise AttributeError(name)
