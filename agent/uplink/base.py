"""What every uplink (MQTT, CoAP) offers the forwarder: move signed bytes, report acks.

Uplinks know no outbox and no protocol semantics: they hand over bytes and pass the platform's
raw ack bytes back (the forwarder decodes them with agent.protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["CommandChannel", "FailureKind", "HeartbeatChannel", "Uplink", "UplinkDownError",
           "UplinkFailure"]

FailureKind = Literal["tls", "network", "other"]


@dataclass(frozen=True)
class UplinkFailure:
    """Why the last connection attempt failed. `kind` is classified where the error is caught
    (by exception type, never by its text): "tls" (a certificate or handshake problem, audited
    as `audit.tls_failure`), "network" (refused, unreachable, timed out, DNS) or "other"."""

    kind: FailureKind
    message: str  # with the advice for the operator

    def __str__(self) -> str:
        return self.message


class UplinkDownError(ConnectionError):
    """The uplink is not connected, or the connection dropped before the transport accepted
    the batch. The forwarder keeps the batch and sends the identical bytes again later."""


@runtime_checkable
class Uplink(Protocol):
    name: str
    last_error: UplinkFailure | None  # None while connected, or before the first failure
    counters: dict[str, int]  # what the uplink refused or dropped, for status.json

    @property
    def connected(self) -> bool: ...

    async def run(
        self, on_ack: Callable[[bytes], None], on_state: Callable[[bool], None]
    ) -> None:
        """Connect, keep connected (jittered backoff), call on_state(True/False) on changes and
        on_ack(raw ack bytes) for every ack received. Lives until cancelled."""

    async def send(self, seq: int, data: bytes, lane: int = 0) -> None:
        """Hand one signed batch to the transport, on `lane`'s path (MQTT: the alarm lane's
        topic for ALARM_LANE); returns when the transport accepted it (MQTT: PUBACK received).
        Raises UplinkDownError when not connected or the connection drops."""

    async def publish_status(self, doc: Mapping[str, Any]) -> None:
        """Publish the gateway's retained status document; returns when the transport accepted
        it. Raises UplinkDownError when not connected."""


@runtime_checkable
class CommandChannel(Protocol):
    """An uplink that also carries the platform's signed commands (MQTT does; CoAP does not)."""

    def set_command_handler(self, on_command: Callable[[bytes], None]) -> None: ...

    async def publish_command_ack(self, data: bytes) -> None: ...


@runtime_checkable
class HeartbeatChannel(Protocol):
    """An uplink that carries path supervision heartbeats (docs/PROTOCOL.md 7): MQTT and CoAP.
    The forwarder signs them and checks the answers; the uplink only moves the bytes."""

    heartbeat_interval_s: float
    heartbeat_timeout_s: float

    async def heartbeat(self, data: bytes, accept: Callable[[bytes], bool]) -> bytes:
        """Send one signed heartbeat on this path, even while it carries no batches, and return
        the first answer that `accept` takes (stale answers to earlier heartbeats are skipped).
        Raises UplinkDownError when it cannot be sent or no answer comes within
        `heartbeat_timeout_s`."""
