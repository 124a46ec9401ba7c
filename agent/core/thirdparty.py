"""Every private API of a third-party library the project relies on, in one place.

A private name can change in any release; the dependency ranges in pyproject.toml (aiocoap
< 0.5, paho-mqtt < 3) and the lock hold the versions these were written against, and
tests/test_thirdparty.py checks that each one is still there, so an upgrade that removes one
fails a test instead of a gateway. The libraries are imported by the callers, never here:
this module stays light.

- aiocoap 0.4 `Context._append_tokenmanaged_messagemanaged_transport`: how
  `Context.create_server_context` adds a udp6 transport; CoAP ingest uses it to add a transport
  of its own that drops flood datagrams before aiocoap parses them (drivers.coap.server).
- aiocoap 0.4 `MessageInterfaceUDP6.datagram_msg_received`: where that transport hooks in.
- paho-mqtt 2 `Client._sock_close`: the only way to close a socket that never got a CONNACK
  (agent.uplink.mqtt).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRIVATE_APIS", "add_transport", "close_unconnected_socket"]

# (module, class, attribute)
PRIVATE_APIS = (
    ("aiocoap", "Context", "_append_tokenmanaged_messagemanaged_transport"),
    ("aiocoap.transports.udp6", "MessageInterfaceUDP6", "datagram_msg_received"),
    ("paho.mqtt.client", "Client", "_sock_close"),
)


async def add_transport(ctx: Any, factory: Any) -> None:
    """Add a server transport made by `factory(message_manager)` to an aiocoap Context."""
    await ctx._append_tokenmanaged_messagemanaged_transport(factory)


def close_unconnected_socket(client: Any) -> None:
    """Close a paho client's socket, also before CONNACK (idempotent)."""
    client._sock_close()
