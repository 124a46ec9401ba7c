"""pytest fixtures for the WAN end: the reference platform (a Receiver with its MQTT server)
subscribed to a real mosquitto from tests/support/broker.py, over plain TCP (`broker`,
`platform`) or mutual TLS (`mosquitto_tls`, `tls_platform`). A pytest plugin (tests/conftest.py
lists it in `pytest_plugins`, with tests/support/broker.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from branchsim.platform.mqtt_server import MqttPlatformServer, PlatformTls
from branchsim.platform.receiver import Receiver
from tests.support.broker import Mosquitto
from tests.support.pki import Pki

__all__ = ["broker", "platform", "tls_platform"]


@pytest.fixture
def broker(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A mosquitto on a free loopback port (plain TCP: for tests where TLS is not the point)."""
    return mosquitto_factory()


def _serve(rx: Receiver, port: int, tls: PlatformTls | None) -> Iterator[Receiver]:
    server = MqttPlatformServer(rx, "127.0.0.1", port, tls=tls, client_id="platform-test")
    server.start()
    try:
        assert server.ready.wait(10), "platform never subscribed"
        yield rx
    finally:
        server.stop()
        rx.close()


@pytest.fixture
def platform(tmp_path: Path, broker: Mosquitto) -> Iterator[Receiver]:
    """The reference platform's store, fed and acking through `broker`."""
    yield from _serve(Receiver(tmp_path / "platform.db"), broker.port, None)


@pytest.fixture
def tls_platform(tmp_path: Path, mosquitto_tls: Mosquitto, pki: Pki) -> Iterator[Receiver]:
    """The same through `mosquitto_tls`, with the platform's certificate from `pki`."""
    yield from _serve(Receiver(tmp_path / "platform.db"), mosquitto_tls.port,
                      PlatformTls(ca=pki.ca_cert, cert=pki.platform_cert, key=pki.platform_key))
