"""A private D-Bus "system" bus: a real `dbus-daemon` on a socket in a directory of our own.

The fake BlueZ service owns `org.bluez` on it and bleak, unmodified, finds it through
`DBUS_SYSTEM_BUS_ADDRESS`. The generated config is permissive on purpose: the real system bus
restricts who may own `org.bluez`, a private test bus has nobody to protect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import structlog

__all__ = ["DBUS_DAEMON", "PrivateSystemBus", "bus_config"]

DBUS_DAEMON = shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"

log = structlog.get_logger(__name__)


def bus_config(socket_path: Path) -> str:
    """The daemon config: system-bus type, one unix socket, everyone may own and call anything."""
    return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket_path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow send_destination="*"/>
  </policy>
</busconfig>
"""


class PrivateSystemBus:
    """A `dbus-daemon` process on `unix:path=<dir>/system_bus_socket`.

    `stop()` then `start()` brings the bus back on the same address (the "bus went away" fault).
    Use as an async context manager; `stop` is idempotent.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="branchsim-dbus-"))
        self.socket_path = self.directory / "system_bus_socket"
        self.config_path = self.directory / "bus.conf"
        self.address = f"unix:path={self.socket_path}"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> str:
        if self.running:
            return self.address
        self.config_path.write_text(bus_config(self.socket_path))
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._proc = await asyncio.create_subprocess_exec(
            DBUS_DAEMON,
            f"--config-file={self.config_path}",
            "--nofork",
            "--nopidfile",
            "--print-address",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )
        assert self._proc.stdout is not None
        try:
            # The daemon prints its address once it listens: no polling for the socket file.
            line = await asyncio.wait_for(self._proc.stdout.readline(), 10.0)
        except BaseException:
            await self.stop()
            raise
        if not line:
            await self.stop()
            raise RuntimeError(f"dbus-daemon exited at start (config {self.config_path})")
        log.debug("dbus.started", address=self.address, pid=self._proc.pid)
        return self.address

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.debug("dbus.stopped", address=self.address)

    def environ(self) -> dict[str, str]:
        """Environment for a client process (bleak reads `DBUS_SYSTEM_BUS_ADDRESS`)."""
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    async def close(self) -> None:
        await self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def __aenter__(self) -> PrivateSystemBus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
