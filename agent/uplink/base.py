"""What every uplink (MQTT, CoAP) offers the forwarder: move signed bytes, report acks.

Uplinks know no outbox and no protocol semantics: they hand over bytes and pass the platform's
raw ack bytes back (the forwarder decodes them with agent.protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["Uplink", "UplinkDownError"]


class UplinkDownError(ConnectionError):
    """The uplink is not connected, or the connection dropped before the transport accepted
    the batch. The forwarder keeps the batch and sends the identical bytes again later."""


@runtime_checkable
class Uplink(Protocol):
    name: str

    @property
    def connected(self) -> bool: ...

    async def run(
        self, on_ack: Callable[[bytes], None], on_state: Callable[[bool], None]
    ) -> None:
        """Connect, keep connected (jittered backoff), call on_state(True/False) on changes and
        on_ack(raw ack bytes) for every ack received. Lives until cancelled."""

    async def send(self, seq: int, data: bytes) -> None:
        """Hand one signed batch to the transport; returns when the transport accepted it (MQTT:
        PUBACK received). Raises UplinkDownError when not connected or the connection drops."""

    async def publish_status(self, doc: Mapping[str, Any]) -> None:
        """Publish the gateway's retained status document; returns when the transport accepted
        it. Raises UplinkDownError when not connected."""
