"""Opening a serial port, and the one supervision loop every serial source runs.

A USB-serial adapter that is pulled out makes the device path vanish (open fails with
ENOENT) and an open port report EOF/EIO on read; a pty whose master side closed behaves the
same. Both are mapped to `PortUnavailable` here, in one place, and `PortSource.run` (the
supervision every device source shares, drivers/supervised.py) turns them into one
``source.offline`` reading, a jittered backoff, and ``source.online`` on return.
"""

from __future__ import annotations

import asyncio

from agent.core.clock import Clock
from drivers.serial.config import SerialPortConfig
from drivers.supervised import DeviceUnavailable, SupervisedSource

__all__ = [
    "PortSource",
    "PortUnavailable",
    "SerialPortConfig",
    "open_port",
]


class PortUnavailable(DeviceUnavailable):
    """The port cannot be opened or stopped working (unplugged, hung up, not answering)."""


async def open_port(
    cfg: SerialPortConfig, *, limit: int = 65536
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open `cfg.port` without blocking the loop; every open failure is `PortUnavailable`."""
    # Here, not at module level: loading a config imports no serial stack (tests/test_layering)
    from serial_asyncio_fast import open_serial_connection

    try:
        return await open_serial_connection(
            url=cfg.port,
            baudrate=cfg.baudrate,
            bytesize=cfg.bytesize,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
            limit=limit,
        )
    except (OSError, ValueError) as exc:  # serial.SerialException is an OSError
        raise PortUnavailable(f"cannot open {cfg.port}: {exc}") from exc


async def read_some(reader: asyncio.StreamReader, wait_s: float) -> bytes | None:
    """Read what is there; None on timeout. EOF/EIO (the device went away) raise
    `PortUnavailable`."""
    try:
        async with asyncio.timeout(wait_s):
            data = await reader.read(4096)
    except TimeoutError:
        return None
    except OSError as exc:
        raise PortUnavailable(f"read failed: {exc}") from exc
    if not data:
        raise PortUnavailable("port closed (EOF)")
    return data


class PortSource(SupervisedSource):
    """A serial source: `session` talks to the device while it is there (raising
    `PortUnavailable` when it is lost); `run` supervises (drivers/supervised.py)."""

    kind: str = "serial"
    log_ns = "serial"

    def __init__(self, cfg: SerialPortConfig, clock: Clock) -> None:
        super().__init__(cfg.name, clock, where=cfg.port, backoff_base_s=cfg.backoff_base_s,
                         backoff_cap_s=cfg.backoff_cap_s)
        self.cfg = cfg
