"""pytest fixtures for a real mosquitto per test (the launcher is branchsim.broker).

Use them from a test module or conftest: `from tests.support.broker import free_port,
mosquitto, mosquitto_tls, pki`.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from branchsim.broker import MOSQUITTO, Mosquitto, get_free_port, wait_port
from branchsim.pki import Pki, make_pki

__all__ = [
    "MOSQUITTO",
    "Mosquitto",
    "free_port",
    "get_free_port",
    "mosquitto",
    "mosquitto_factory",
    "mosquitto_tls",
    "pki",
    "wait_port",
]


def free_udp_port() -> int:
    """A free UDP port on 127.0.0.1 (CoAP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return get_free_port()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh test PKI (CA, broker, gateway and platform certificates, an unrelated CA)."""
    return make_pki(tmp_path / "pki")


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start any number of brokers: `mosquitto_factory(tls=pki_or_None)`; all stopped after."""
    started: list[Mosquitto] = []

    def start(tls: Pki | None = None, port: int | None = None) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(started)}", tls=tls, port=port)
        started.append(broker)
        return broker.start()

    try:
        yield start
    finally:
        for broker in started:
            with contextlib.suppress(Exception):
                broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A plain-TCP broker (for tests where TLS is not the feature)."""
    return mosquitto_factory()


@pytest.fixture
def mosquitto_tls(mosquitto_factory: Callable[..., Mosquitto], pki: Pki) -> Mosquitto:
    """A broker with mutual TLS (client certificate required) using the `pki` fixture."""
    return mosquitto_factory(tls=pki)
