"""Stopping the real daemons the simulator and the tests start (mosquitto, upsd, snmpd...)."""

from __future__ import annotations

import subprocess

__all__ = ["terminate"]


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM (a daemon saves its state and exits), SIGKILL if it is not gone within
    `timeout`; nothing for a process never started or already ended."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
