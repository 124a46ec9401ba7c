"""pytest fixtures for the WAN end: a real mosquitto (plain TCP) and the reference platform
(a Receiver with its MQTT server) subscribed to it. Import them into a test module:
`from tests.support.wan import broker, platform`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from branchsim.broker import Mosquitto
from branchsim.platform.mqtt_server import MqttPlatformServer
from branchsim.platform.receiver import Receiver

__all__ = ["broker", "platform"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto on a free loopback port (plain TCP: for tests where TLS is not the point)."""
    m = Mosquitto(tmp_path / "broker").start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def platform(tmp_path: Path, broker: Mosquitto) -> Iterator[Receiver]:
    """The reference platform's store, fed and acking through `broker`."""
    rx = Receiver(tmp_path / "platform.db")
    server = MqttPlatformServer(rx, "127.0.0.1", broker.port, client_id="platform-test")
    server.start()
    try:
        assert server.ready.wait(10), "platform never subscribed"
        yield rx
    finally:
        server.stop()
        rx.close()
