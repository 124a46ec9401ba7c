"""The notifier never blocks: a notify socket nobody reads must not freeze the event loop."""

from __future__ import annotations

import socket
from pathlib import Path

from agent.runtime.sdnotify import Notifier


def test_full_notify_socket_drops_messages_instead_of_blocking(tmp_path: Path) -> None:
    """With the receiver never reading, thousands of notifications return at once (the
    later ones dropped) instead of blocking in sendto() once the queue is full."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(path))
        n = Notifier(str(path))
        # A blocking socket would hang in sendto() here (pytest-timeout would end the test).
        sent = [n.notify("STATUS=" + "x" * 200) for _ in range(5000)]
        n.close()
        assert sent[0] is True
        assert sent.count(False) > 0, "the queue filled up and later messages were dropped"
        assert rx.recv(4096).startswith(b"STATUS=")


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    """Outside systemd (no NOTIFY_SOCKET) nothing is sent and nothing fails."""
    n = Notifier("")
    assert not n.enabled
    assert n.notify("READY=1") is False
