"""`branch-platform`: the reference platform (serve, register, verify, events)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.keys import KeyFileError, load_public_key
from agent.protocol import ProtocolError, kid_for, verify_batch
from branchsim.platform.mqtt_server import PlatformTls, serve_mqtt
from branchsim.platform.receiver import Receiver

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branch-platform",
                                description="Reference platform for the branch gateway agent")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="take batches from the MQTT broker and ack them")
    s.add_argument("--db", type=Path, required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8883)
    s.add_argument("--ca", type=Path)
    s.add_argument("--cert", type=Path)
    s.add_argument("--key", type=Path)
    s.add_argument("--insecure", action="store_true", help="plain TCP (local tests only)")
    s.add_argument("--prefix", default="bank/v1")
    s.add_argument("--shared", metavar="GROUP", help="MQTT 5 shared subscription group")

    r = sub.add_parser("register", help="bind a gateway id to its public key")
    r.add_argument("--db", type=Path, required=True)
    r.add_argument("gw")
    r.add_argument("pubkey", type=Path)

    v = sub.add_parser("verify", help="verify captured batch files offline")
    v.add_argument("--db", type=Path, help="take keys from this platform database")
    v.add_argument("--pubkey", type=Path, help="or verify against this public key (PEM)")
    v.add_argument("files", nargs="+", type=Path)

    e = sub.add_parser("events", help="print stored events as JSON lines")
    e.add_argument("--db", type=Path, required=True)
    e.add_argument("--gw")
    return p


def _serve(args: argparse.Namespace) -> int:
    tls: PlatformTls | None = None
    if args.ca and args.cert and args.key:
        tls = PlatformTls(args.ca, args.cert, args.key)
    elif not args.insecure:
        print("branch-platform serve: give --ca, --cert and --key (mutual TLS), "
              "or --insecure for a local plain-TCP broker", file=sys.stderr)
        return 2
    receiver = Receiver(args.db)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_mqtt(receiver, args.host, args.port, tls, args.prefix, args.shared))
    return 0


def _register(args: argparse.Namespace) -> int:
    try:
        load_public_key(args.pubkey)  # a clear error for a wrong file, before touching the db
    except KeyFileError as exc:
        print(f"branch-platform register: {exc}", file=sys.stderr)
        return 1
    kid = Receiver(args.db).register(args.gw, args.pubkey.read_bytes())
    print(f"registered {args.gw} kid={kid.hex()}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.pubkey is None and args.db is None:
        print("branch-platform verify: give --pubkey or --db", file=sys.stderr)
        return 2
    fixed: Ed25519PublicKey | None = None
    receiver: Receiver | None = None
    if args.pubkey is not None:
        try:
            fixed = load_public_key(args.pubkey)
        except KeyFileError as exc:
            print(f"branch-platform verify: {exc}", file=sys.stderr)
            return 2
    else:
        receiver = Receiver(args.db)

    def key_for_kid(kid: bytes) -> Ed25519PublicKey | None:
        if fixed is not None:
            return fixed if kid_for(fixed) == kid else None
        assert receiver is not None
        return receiver.public_key(kid)

    failed = 0
    for path in args.files:
        try:
            batch = verify_batch(path.read_bytes(), key_for_kid)
        except (OSError, ProtocolError) as exc:
            failed += 1
            print(f"FAIL {path}: {exc}")
            continue
        print(f"OK   {path}: gw={batch.gw} seq={batch.seq} events={len(batch.events)} "
              f"hash={batch.hash.hex()}")
        for ev in batch.events:
            print("     " + json.dumps(ev, sort_keys=True))
    return 1 if failed else 0


def _events(args: argparse.Namespace) -> int:
    for ev in Receiver(args.db).events(args.gw):
        print(json.dumps(ev, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"serve": _serve, "register": _register, "verify": _verify, "events": _events}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
