"""The MQTT uplink's TLS against real peers that must be refused: a mosquitto whose certificate is
valid and from the pinned CA but names another host, and a server that speaks only TLS 1.1
(docs/SECURITY.md 5.5-1 "mutual TLS >= 1.2 with hostname verification", CR 4.3 "TLS >= 1.2").

The refusal tests first show that their peer is otherwise acceptable (a client that asks for the
name in the certificate, or allows TLS 1.1, completes a handshake with it), so that a refusal can
only come from the one property under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.uplink.base import UplinkDownError, UplinkFailure
from agent.uplink.mqtt import MqttUplink, MqttUplinkConfig
from tests.support.agentproc import AgentProcess, mqtt_uplink, until, wait_until
from tests.support.broker import Mosquitto
from tests.support.pki import Pki, certify

GW = "gw-tls"
OTHER_HOST = "broker.other.example"
TLS_1_2 = 0x0303  # the protocol version numbers on the wire (RFC 8446 4.2.1)


# --- peers ------------------------------------------------------------------------------------


@pytest.fixture
def other_host_broker(tmp_path: Path, pki: Pki,
                      mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A mosquitto with mutual TLS whose certificate, from the pinned test CA, is valid only for
    OTHER_HOST (subjectAltName DNS:broker.other.example), not for 127.0.0.1 or localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = tmp_path / "other-host.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert = certify(pki, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, OTHER_HOST)]),
                   key.public_key(), tmp_path / "other-host.crt", san=[x509.DNSName(OTHER_HOST)])
    return mosquitto_factory(tls=dataclasses.replace(pki, server_cert=cert, server_key=key_path))


def allow_only_tls_1_1(ctx: ssl.SSLContext) -> None:
    """Pin `ctx` to TLS 1.1. OpenSSL 3 refuses TLS 1.1's SHA-1 handshake signatures at security
    level 1 and above ("no suitable signature algorithm"), so this also drops to level 0."""
    with warnings.catch_warnings():  # what the test is about, not a mistake
        warnings.filterwarnings("ignore", "ssl.TLSVersion.TLSv1_1 is deprecated",
                                DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")


def supported_versions(record: bytes) -> list[int] | None:
    """The versions a ClientHello record offers in its supported_versions extension (RFC 8446
    4.2.1), or None without one: a client capped at TLS 1.2 or below sends only its highest
    version (legacy_version), so its lowest one is not visible on the wire."""
    if record[0] != 22 or record[5] != 1:
        raise ValueError(f"not a ClientHello: {record[:6].hex()}")
    hello = record[5 + 4:]  # after the record and handshake headers
    at = 2 + 32  # legacy_version, random
    at += 1 + hello[at]  # session id
    at += 2 + int.from_bytes(hello[at:at + 2])  # cipher suites
    at += 1 + hello[at]  # compression methods
    end = at + 2 + int.from_bytes(hello[at:at + 2])
    at += 2
    while at < end:
        kind, size = int.from_bytes(hello[at:at + 2]), int.from_bytes(hello[at + 2:at + 4])
        body = hello[at + 4:at + 4 + size]
        if kind == 43:
            return [int.from_bytes(body[i:i + 2]) for i in range(1, 1 + body[0], 2)]
        at += 4 + size
    return None


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return data


class Tls11Server:
    """A TLS server on a free loopback port that speaks only TLS 1.1, with the test broker's
    certificate (valid for 127.0.0.1) and a client certificate required, as mosquitto would.
    Per connection it records what the ClientHello offered (`offered`) and how the handshake
    ended (`outcomes`: the version, or "failed: <OpenSSL reason>")."""

    def __init__(self, pki: Pki) -> None:
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        allow_only_tls_1_1(self._ctx)
        self._ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self._ctx.load_verify_locations(pki.ca_cert)
        self._ctx.verify_mode = ssl.CERT_REQUIRED
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.offered: list[list[int] | None] = []
        self.outcomes: list[str] = []
        self._thread = threading.Thread(target=self._serve, name="tls11-server", daemon=True)

    def __enter__(self) -> Tls11Server:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self._sock.close()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the TLS 1.1 server thread did not stop"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # shut down by __exit__
            with conn:
                conn.settimeout(10)
                try:
                    self.outcomes.append(self._handshake(conn))
                except Exception as exc:  # reported to the test, which asserts on outcomes
                    self.outcomes.append(f"error: {type(exc).__name__}: {exc}")

    def _handshake(self, conn: socket.socket) -> str:
        # The ClientHello is read off the socket first (to record its versions), so OpenSSL
        # gets the bytes through memory BIOs instead of the socket.
        header = recv_exact(conn, 5)
        hello = header + recv_exact(conn, int.from_bytes(header[3:5]))
        self.offered.append(supported_versions(hello))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self._ctx.wrap_bio(incoming, outgoing, server_side=True)
        incoming.write(hello)
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                conn.sendall(outgoing.read())
                data = conn.recv(65536)
                if not data:
                    return "failed: closed by the client"
                incoming.write(data)
                continue
            except ssl.SSLError as exc:
                conn.sendall(outgoing.read())  # the alert: the client learns why
                return f"failed: {exc.reason}"
            conn.sendall(outgoing.read())
            return str(tls.version())


@pytest.fixture
def tls11_server(pki: Pki) -> Iterator[Tls11Server]:
    with Tls11Server(pki) as server:
        yield server


# --- clients ----------------------------------------------------------------------------------


def client_context(pki: Pki) -> ssl.SSLContext:
    """A verifying client with the gateway's certificate, independent of the uplink's code."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def handshake(port: int, ctx: ssl.SSLContext, server_hostname: str) -> str:
    """A TLS handshake with 127.0.0.1:port, asking for `server_hostname`: the version agreed."""
    with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
          ctx.wrap_socket(raw, server_hostname=server_hostname) as tls):
        return str(tls.version())


@contextlib.asynccontextmanager
async def running(uplink: MqttUplink) -> AsyncIterator[UplinkFailure]:
    """Run the uplink until its first connection attempt ends; yields that attempt's failure
    (fails the test if it connected) while the uplink keeps retrying; stops it on exit."""
    task = asyncio.create_task(uplink.run(lambda _raw: None, lambda _up: None), name="uplink")
    try:
        await until(lambda: uplink.last_error is not None or uplink.connected, 15,
                    "the first connection attempt to end")
        assert not uplink.connected, "the uplink connected: TLS accepted a peer it must refuse"
        assert uplink.last_error is not None
        yield uplink.last_error
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def uplink_for(port: int, pki: Pki, **over: Any) -> MqttUplink:
    """The uplink with the gateway's test config (host 127.0.0.1 unless `over` says else)."""
    return MqttUplink(MqttUplinkConfig.model_validate(
        mqtt_uplink(port, pki, connect_timeout=5.0, **over)), GW)


# --- hostname verification --------------------------------------------------------------------


@pytest.mark.parametrize("over", [{}, {"host": "localhost"}, {"insecure": True}],
                         ids=["ip-address", "dns-name", "insecure-flag-with-tls"])
async def test_broker_certificate_for_another_host_refused(
    over: dict[str, Any], other_host_broker: Mosquitto, pki: Pki,
) -> None:
    """A broker whose certificate is from the pinned CA but names another host is refused as a
    `tls` failure before any MQTT is sent, for an IP address or a DNS name in the config, and
    also with `insecure = true` (which only allows plain TCP when there is no [tls])."""
    control = await asyncio.to_thread(handshake, other_host_broker.port, client_context(pki),
                                      OTHER_HOST)
    assert control.startswith("TLSv1."), "the broker must be valid for the name in its cert"

    uplink = uplink_for(other_host_broker.port, pki, **over)
    async with running(uplink) as failure:
        assert failure.kind == "tls"
        assert "mismatch" in failure.message and "subjectAltName" in failure.message
        with pytest.raises(UplinkDownError):
            await uplink.send(1, b"a signed batch")
        # The broker saw the gateway abort the handshake, and never an MQTT CONNECT.
        await until(lambda: "alert bad certificate" in other_host_broker.log.read_text(), 10,
                    "the broker to log the gateway's bad_certificate alert")
    assert "New client connected" not in other_host_broker.log.read_text()


def test_hostname_mismatch_is_audited(tmp_path: Path, other_host_broker: Mosquitto,
                                      pki: Pki) -> None:
    """The agent process facing a broker whose certificate names another host records
    audit.tls_failure in its local audit log, naming the uplink and the mismatch."""
    up = mqtt_uplink(other_host_broker.port, pki, host="localhost")
    agent = AgentProcess(tmp_path / "gw", uplink={"order": ["mqtt"], "mqtt": up})

    def tls_failures() -> list[dict[str, Any]]:
        return agent.audit_records("audit.tls_failure")

    agent.start()
    try:
        wait_until(lambda: bool(tls_failures()) or "mqtt.connected" in agent.log_text(), 30,
                   "audit.tls_failure recorded", agent)
    finally:
        assert agent.stop() == 0
    assert "mqtt.connected" not in agent.log_text()
    [record] = tls_failures()
    assert record["attrs"]["uplink"] == f"mqtt:localhost:{other_host_broker.port}"
    assert "Hostname mismatch" in record["attrs"]["error"]


# --- protocol versions ------------------------------------------------------------------------


async def test_tls_1_1_server_refused(tls11_server: Tls11Server, pki: Pki) -> None:
    """A server that speaks only TLS 1.1 (a client allowing 1.1 completes a handshake with it)
    gets no handshake from the uplink: a `tls` failure, nothing agreed below TLS 1.2."""
    legacy = client_context(pki)
    allow_only_tls_1_1(legacy)
    assert await asyncio.to_thread(handshake, tls11_server.port, legacy, "127.0.0.1") == "TLSv1.1"
    await until(lambda: bool(tls11_server.outcomes), 10, "the server's end of the handshake")
    assert tls11_server.outcomes == ["TLSv1.1"]

    async with running(uplink_for(tls11_server.port, pki)) as failure:
        assert failure.kind == "tls"
        await until(lambda: len(tls11_server.outcomes) >= 2, 10, "the uplink's handshake")
    assert tls11_server.outcomes[1].startswith("failed:"), tls11_server.outcomes


async def test_uplink_offers_nothing_below_tls_1_2(tls11_server: Tls11Server, pki: Pki) -> None:
    """The uplink's ClientHello offers only TLS 1.2 and later (its supported_versions), so no
    server, however configured, can get it to agree on an older version."""
    async with running(uplink_for(tls11_server.port, pki)):
        await until(lambda: bool(tls11_server.offered), 10, "the uplink's ClientHello")
    offered = tls11_server.offered[0]
    assert offered is not None, "no supported_versions: the lowest version offered is unknown"
    assert TLS_1_2 in offered and min(offered) >= TLS_1_2, [hex(v) for v in offered]
