"""The platform's side of signed downlink commands (docs/COMMANDS.md): sign, send, await the ack.

`branch-platform command GW CMD [--arg k=v ...]` signs a command with the platform's command key,
publishes it on `{prefix}/{gw}/cmd` (QoS 1) and waits for the gateway's signed answer on
`{prefix}/{gw}/cmd-ack` (matched by the SHA-256 of the command bytes).

The command seq defaults to the current time in milliseconds: strictly increasing across runs
and across platform instances without shared state, as long as their clocks are synchronised.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol import decode_sign1, loads_exact
from agent.protocol.commands import CommandAck, CommandError, decode_ack, encode_command
from agent.protocol.cose import sign1
from agent.security.keys import KeyFileError, load_private_key, load_public_key
from branchsim.platform.mqtt_server import PlatformTls

__all__ = ["CommandTimeout", "main_command", "make_command", "send_command"]


class CommandTimeout(TimeoutError):
    """No acknowledgement arrived in time (the gateway may be offline; the broker keeps the
    command in the gateway's persistent session until it expires on the gateway's side)."""


def make_command(key: Ed25519PrivateKey, gw: str, cmd: str, args: Mapping[str, Any] | None = None,
                 *, seq: int | None = None, validity_s: float = 300.0,
                 now: float | None = None) -> bytes:
    """A signed command (COSE_Sign1 bytes)."""
    now = time.time() if now is None else now
    seq = int(now * 1000) if seq is None else seq
    return sign1(key, encode_command(gw=gw, seq=seq, iat=now, exp=now + validity_s, cmd=cmd,
                                     args=args))


def send_command(host: str, port: int, gw: str, data: bytes, *, tls: PlatformTls | None = None,
                 prefix: str = "bank/v1", gateway_key: Ed25519PublicKey | None = None,
                 timeout: float = 10.0) -> CommandAck:
    """Publish signed command bytes and wait for the ack that names them. Blocking (a paho
    network thread); from asyncio call it through `asyncio.to_thread`. With `gateway_key` the
    ack's signature is checked (CommandError if it does not verify)."""
    h = hashlib.sha256(data).digest()
    acks: list[bytes] = []
    subscribed, answered = threading.Event(), threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                         client_id=f"branch-platform-cmd-{uuid.uuid4().hex[:8]}")
    if tls is not None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        client.tls_set_context(ctx)

    def on_connect(c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if not rc.is_failure:
            c.subscribe(f"{prefix}/{gw}/cmd-ack", qos=1)

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        acks.append(bytes(msg.payload))
        answered.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    try:
        if not subscribed.wait(timeout):
            raise CommandTimeout(f"no subscription to {prefix}/{gw}/cmd-ack at {host}:{port}")
        client.publish(f"{prefix}/{gw}/cmd", data, qos=1).wait_for_publish(timeout)
        deadline = time.monotonic() + timeout
        while True:
            for raw in list(acks):
                ack = _match(raw, h, gateway_key)
                if ack is not None:
                    return ack
            acks.clear()
            left = deadline - time.monotonic()
            if left <= 0 or not answered.wait(left):
                raise CommandTimeout(f"no acknowledgement from {gw} within {timeout} s")
            answered.clear()
    finally:
        client.disconnect()
        client.loop_stop()


def _match(raw: bytes, h: bytes, gateway_key: Ed25519PublicKey | None) -> CommandAck | None:
    """The ack for our command, or None (an ack for another command, or unreadable)."""
    if gateway_key is not None:
        try:
            ack = decode_ack(raw, gateway_key)
        except CommandError:
            return None
        return ack if ack.h == h else None
    # Without the gateway's key: read the payload unverified (a lab convenience only), through
    # the one COSE_Sign1 parser.
    try:
        doc = loads_exact(decode_sign1(raw)[2], "cmd-ack")
        ack = CommandAck(gw=doc["gw"], seq=doc["seq"], h=doc["h"], ok=doc["ok"], t=doc["t"],
                         err=doc.get("err"), result=doc.get("result"))
    except Exception:  # hostile or unrelated bytes on the topic: not our ack
        return None
    return ack if ack.h == h else None


def _parse_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false; anything else is text
    except ValueError:
        return key, value


def main_command(argv: Sequence[str] | None = None) -> int:
    """`branch-platform command GW CMD ...`: exit 0 accepted, 1 refused, 2 usage/keys,
    3 no answer."""
    p = argparse.ArgumentParser(prog="branch-platform command",
                                description="sign and send a command to a gateway")
    p.add_argument("gw")
    p.add_argument("cmd", choices=["ping", "status", "doctor", "log-level", "rotate-key",
                                   "pulse", "arm", "disarm"])
    p.add_argument("--arg", action="append", default=[], type=_parse_arg, metavar="KEY=VALUE",
                   help="e.g. --arg level=debug --arg seconds=600, --arg output=door_strike")
    p.add_argument("--key", type=Path, required=True, help="the platform command key (PEM)")
    p.add_argument("--gateway-pub", type=Path, help="verify the ack with the gateway's key")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--ca", type=Path)
    p.add_argument("--cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--insecure", action="store_true", help="plain TCP (local tests only)")
    p.add_argument("--prefix", default="bank/v1")
    p.add_argument("--seq", type=int, help="default: now in milliseconds")
    p.add_argument("--validity", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    tls: PlatformTls | None = None
    if args.ca and args.cert and args.tls_key:
        tls = PlatformTls(args.ca, args.cert, args.tls_key)
    elif not args.insecure:
        print("branch-platform command: give --ca, --cert and --tls-key (mutual TLS), "
              "or --insecure for a local plain-TCP broker", file=sys.stderr)
        return 2
    try:
        key = load_private_key(args.key)
        gateway_key = load_public_key(args.gateway_pub) if args.gateway_pub else None
    except KeyFileError as exc:
        print(f"branch-platform command: {exc}", file=sys.stderr)
        return 2
    data = make_command(key, args.gw, args.cmd, dict(args.arg), seq=args.seq,
                        validity_s=args.validity)
    try:
        ack = send_command(args.host, args.port, args.gw, data, tls=tls, prefix=args.prefix,
                           gateway_key=gateway_key, timeout=args.timeout)
    except (CommandTimeout, OSError) as exc:
        print(f"branch-platform command: {exc}", file=sys.stderr)
        return 3
    print(json.dumps({"gw": ack.gw, "seq": ack.seq, "ok": ack.ok, "err": ack.err,
                      "result": ack.result, "verified": gateway_key is not None},
                     default=str, sort_keys=True))
    return 0 if ack.ok else 1


if __name__ == "__main__":
    sys.exit(main_command())
