"""sd_notify(3) over $NOTIFY_SOCKET: READY=1, WATCHDOG=1, STATUS=..., STOPPING=1.

A few lines, no library: one datagram per message to the socket systemd names (an abstract
socket when the path starts with '@'). Without NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier", "watchdog_interval"]


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop on the notify socket: a reader that stops reading
            # (a stuck supervisor, a test harness) would otherwise freeze the agent in sendto()
            # once the socket's queue is full. A dropped STATUS= or WATCHDOG=1 is harmless.
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str) -> bool:
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto(message.encode(), self._addr)
        except OSError:
            # systemd gone (shutdown), socket not there, or its queue full (EAGAIN): drop it
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of WatchdogSec (as systemd recommends), or None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None
