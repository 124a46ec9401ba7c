"""`branch-platform`: the reference platform (serve, register, verify, events, supervision,
oscore-pair).

The store is a SQLite file (`--db PATH`, the default: the demo, the tests, a laptop) or
PostgreSQL (`--store postgresql://...`, docs/SCALE.md). `serve` takes batches from an MQTT
broker (mosquitto) by default, or with `--bus nats://...` from a NATS JetStream stream as one of
any number of receivers (branchsim.platform.bus), answering the gateways over MQTT either way.
With the SQLite store and without `--bus`/`--shared`, `serve` also supervises each gateway's
paths (branchsim.platform.supervision, docs/PROTOCOL.md 7); `supervision` prints what it raised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import aiocoap
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import ProtocolError, kid_for, verify_batch
from agent.security.keys import KeyFileError, load_public_key
from agent.uplink.coap import OscoreContextError, provision_oscore
from branchsim.platform.bus import BusReceiver
from branchsim.platform.coap_server import serve_coap, shutdown_coap
from branchsim.platform.mqtt_server import PlatformTls, serve_mqtt
from branchsim.platform.receiver import Receiver
from branchsim.platform.rules import BatchStore
from branchsim.platform.supervision import OFFLINE_AFTER_S, PATH_LOST_AFTER_S, Supervision

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branch-platform",
                                description="Reference platform for the branch gateway agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("command", help="sign and send a command to a gateway (see docs/COMMANDS.md)",
                   add_help=False)

    s = sub.add_parser("serve", help="take batches over MQTT and CoAP, verify and ack them")
    _store_arguments(s)
    s.add_argument("--host", default="127.0.0.1", help="the MQTT broker")
    s.add_argument("--port", type=int, default=8883, help="the MQTT broker's port")
    s.add_argument("--broker", action="append", default=[], metavar="HOST:PORT",
                   help="with --bus: an MQTT listener of the cluster for the acks; repeat for "
                        "each node (default: --host:--port)")
    s.add_argument("--bus", metavar="URL[,URL...]",
                   help="take batches from the NATS JetStream stream of these servers "
                        "(nats://HOST:PORT, or tls:// with --ca/--cert/--key) as one receiver of "
                        "a group (docs/SCALE.md); acks go over MQTT (--broker)")
    s.add_argument("--workers", type=int, default=4,
                   help="with --bus: bulk lane workers, each with its own store connection")
    s.add_argument("--replicas", type=int, default=3,
                   help="with --bus: replicas of the stream, if this receiver creates it")
    s.add_argument("--no-mqtt", action="store_true",
                   help="no MQTT side (CoAP only; no broker needed)")
    s.add_argument("--coap-host", default="127.0.0.1",
                   help="address the CoAP endpoint binds to ('::' = every interface)")
    s.add_argument("--coap-port", type=int, default=5683, help="UDP port of the CoAP endpoint")
    s.add_argument("--no-coap", action="store_true", help="no CoAP endpoint (MQTT only)")
    s.add_argument("--oscore", action="append", default=[], metavar="GW=DIR",
                   help="require OSCORE from gateway GW with the platform's context in DIR "
                        "(from `oscore-pair`); repeat per gateway")
    s.add_argument("--ca", type=Path)
    s.add_argument("--cert", type=Path)
    s.add_argument("--key", type=Path)
    s.add_argument("--insecure", action="store_true", help="plain TCP (local tests only)")
    s.add_argument("--prefix", default="bank/v1")
    s.add_argument("--shared", metavar="GROUP",
                   help="MQTT 5 shared subscription group; every instance of a group serves "
                        "the same --db file (one host)")
    s.add_argument("--without-lanes", action="store_true",
                   help="answer as a platform from before the alarm lane (docs/PROTOCOL.md "
                        "3.2): no alarm topic, its batches refused as malformed; to rehearse "
                        "gateways against an old platform")
    s.add_argument("--path-lost-after", type=float, default=PATH_LOST_AFTER_S, metavar="S",
                   help="raise gateway.path_lost when a gateway's path has sent no heartbeat "
                        "for S seconds (default 180: EN 50136 grade 4, loss of one path)")
    s.add_argument("--offline-after", type=float, default=OFFLINE_AFTER_S, metavar="S",
                   help="raise gateway.offline when every path of a gateway is lost and the "
                        "last heartbeat is S seconds old (default 18000: grade 4, loss of the "
                        "other path; at least --path-lost-after)")
    s.add_argument("--no-supervision", action="store_true",
                   help="do not take path heartbeats (docs/PROTOCOL.md 7)")

    o = sub.add_parser("oscore-pair",
                       help="provision a pre-shared OSCORE context pair for one gateway")
    o.add_argument("--gateway-dir", type=Path, required=True,
                   help="the gateway's half: move it to the gateway, [uplink.coap.oscore] context")
    o.add_argument("--platform-dir", type=Path, required=True,
                   help="the platform's half: `serve --oscore GW=DIR`")
    o.add_argument("--force", action="store_true", help="replace existing contexts")

    r = sub.add_parser("register", help="bind a gateway id to its public key")
    _store_arguments(r)
    r.add_argument("gw")
    r.add_argument("pubkey", type=Path)

    v = sub.add_parser("verify", help="verify captured batch files offline")
    v.add_argument("--db", type=Path, help="take keys from this platform database")
    v.add_argument("--store", metavar="URL", help="or from this PostgreSQL store")
    v.add_argument("--pubkey", type=Path, help="or verify against this public key (PEM)")
    v.add_argument("files", nargs="+", type=Path)

    e = sub.add_parser("events", help="print stored events as JSON lines")
    _store_arguments(e)
    e.add_argument("--gw")

    sv = sub.add_parser("supervision",
                        help="print the platform's path supervision events (gateway.path_lost, "
                             "path_restored, offline, online) as JSON lines")
    _store_arguments(sv)
    sv.add_argument("--gw")
    return p


def _store_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--db", type=Path, help="the SQLite store file")
    g.add_argument("--store", metavar="URL",
                   help="a PostgreSQL store: postgresql://USER@HOST:PORT/DB (docs/SCALE.md)")


def _open_store(args: argparse.Namespace, *, lanes: bool = True) -> BatchStore:
    """The store the arguments name: `Receiver` (SQLite) or `PgReceiver` (PostgreSQL)."""
    if getattr(args, "store", None):
        if not str(args.store).startswith(("postgresql://", "postgres://")):
            raise SystemExit(f"branch-platform: --store {args.store!r}: expected a "
                             "postgresql:// URL (or --db FILE for SQLite)")
        from branchsim.platform.pgstore import PgReceiver  # psycopg only when asked for

        return PgReceiver(args.store, lanes=lanes)
    return Receiver(args.db, lanes=lanes)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"branch-platform: {text!r}: expected HOST:PORT")
    return host, int(port)


# The alarm lane's thread gets the GIL within 1 ms of asking, not CPython's 5 ms, while the
# bulk lane's thread verifies a backlog (docs/PROTOCOL.md 4.2: alarms handled apart).
SWITCH_INTERVAL_S = 0.001


def _serve(args: argparse.Namespace) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if args.no_mqtt and args.no_coap:
        print("branch-platform serve: --no-mqtt and --no-coap leave nothing to serve",
              file=sys.stderr)
        return 2
    tls: PlatformTls | None = None
    if args.no_mqtt:
        pass
    elif args.ca and args.cert and args.key:
        tls = PlatformTls(args.ca, args.cert, args.key)
    elif not args.insecure:
        print("branch-platform serve: give --ca, --cert and --key (mutual TLS), "
              "or --insecure for a local plain-TCP broker, or --no-mqtt", file=sys.stderr)
        return 2
    if args.bus and (args.no_mqtt or args.shared):
        print("branch-platform serve: --bus takes the batches from the stream and answers over "
              "MQTT: without --no-mqtt and --shared", file=sys.stderr)
        return 2
    if not 0 < args.path_lost_after <= args.offline_after:
        print("branch-platform serve: expected 0 < --path-lost-after <= --offline-after",
              file=sys.stderr)
        return 2
    if args.bus and args.without_lanes:
        print("branch-platform serve: --without-lanes is for the MQTT broker mode",
              file=sys.stderr)
        return 2
    receiver = _open_store(args, lanes=not args.without_lanes)
    try:
        return asyncio.run(_serve_async(args, receiver, tls))
    finally:
        receiver.close()


async def _serve_async(args: argparse.Namespace, receiver: BatchStore,
                       tls: PlatformTls | None) -> int:
    """Serve until SIGTERM or SIGINT; both end it cleanly with exit code 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervision = _supervision(args, receiver)
    coap_ctx: aiocoap.Context | None = None
    if not args.no_coap:
        oscore: dict[str, Path] = {}
        for item in args.oscore:
            gw, sep, path = item.partition("=")
            if not (gw and sep and path):
                print(f"branch-platform serve: --oscore {item!r}: expected GW=DIR",
                      file=sys.stderr)
                return 2
            oscore[gw] = Path(path)
        try:
            coap_ctx = await serve_coap(receiver, args.coap_host, args.coap_port,
                                        oscore=oscore or None, supervision=supervision)
        except OscoreContextError as exc:
            print(f"branch-platform serve: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"branch-platform serve: cannot bind CoAP {args.coap_host}:{args.coap_port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = []
            if supervision is not None:
                tasks.append(tg.create_task(supervision.run(), name="platform-supervision"))
            if args.bus:
                bus = BusReceiver(
                    lambda: _open_store(args), [u for u in args.bus.split(",") if u],
                    [_hostport(b) for b in args.broker] or [(args.host, args.port)], tls=tls,
                    prefix=args.prefix, workers=args.workers, replicas=args.replicas)
                tg.create_task(bus.run(stop), name="platform-bus")
            elif not args.no_mqtt:
                tasks.append(tg.create_task(
                    serve_mqtt(receiver, args.host, args.port, tls, args.prefix, args.shared,
                               supervision=supervision),
                    name="platform-mqtt"))
            await stop.wait()
            for task in tasks:
                task.cancel()
    finally:
        if coap_ctx is not None:
            await shutdown_coap(coap_ctx)
    return 0


def _supervision(args: argparse.Namespace, receiver: BatchStore) -> Supervision | None:
    """Path supervision for `serve`, where it can see every heartbeat and store its events."""
    if args.no_supervision:
        return None
    why = "--bus" if args.bus else "--shared" if args.shared else "a PostgreSQL store"
    if args.bus or args.shared or not isinstance(receiver, Receiver):
        print(f"branch-platform serve: no path supervision with {why} (docs/PROTOCOL.md 7)",
              file=sys.stderr)
        return None
    return Supervision(receiver, path_lost_after=args.path_lost_after,
                       offline_after=args.offline_after)


def _supervision_events(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        if not isinstance(store, Receiver):
            print("branch-platform supervision: only the SQLite store (--db) keeps path "
                  "supervision events", file=sys.stderr)
            return 2
        for ev in store.platform_events(args.gw):
            print(json.dumps(ev, sort_keys=True))
    finally:
        store.close()
    return 0


def _oscore_pair(args: argparse.Namespace) -> int:
    try:
        sender = provision_oscore(args.gateway_dir, args.platform_dir, force=args.force)
    except (OscoreContextError, OSError) as exc:
        print(f"branch-platform oscore-pair: {exc}", file=sys.stderr)
        return 1
    print(f"OSCORE context pair: gateway sender id {sender.hex()}; move {args.gateway_dir} to "
          f"the gateway (secret.json stays 0600), serve with --oscore GW={args.platform_dir}")
    return 0


def _register(args: argparse.Namespace) -> int:
    try:
        load_public_key(args.pubkey)  # a clear error for a wrong file, before touching the db
    except KeyFileError as exc:
        print(f"branch-platform register: {exc}", file=sys.stderr)
        return 1
    store = _open_store(args)
    try:
        kid = store.register(args.gw, args.pubkey.read_bytes())
    finally:
        store.close()
    print(f"registered {args.gw} kid={kid.hex()}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.pubkey is None and args.db is None and args.store is None:
        print("branch-platform verify: give --pubkey, --db or --store", file=sys.stderr)
        return 2
    fixed: Ed25519PublicKey | None = None
    receiver: BatchStore | None = None
    if args.pubkey is not None:
        try:
            fixed = load_public_key(args.pubkey)
        except KeyFileError as exc:
            print(f"branch-platform verify: {exc}", file=sys.stderr)
            return 2
    else:
        receiver = _open_store(args)

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
    store = _open_store(args)
    try:
        for ev in store.events(args.gw):
            print(json.dumps(ev, sort_keys=True))
    finally:
        store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "command":
        # `branch-platform command GW CMD ...`: sign and send a command (docs/COMMANDS.md)
        from branchsim.platform.commands import main_command

        return main_command(argv[1:])
    args = _parser().parse_args(argv)
    commands = {"serve": _serve, "register": _register, "verify": _verify, "events": _events,
                "supervision": _supervision_events, "oscore-pair": _oscore_pair}
    try:
        return commands[args.cmd](args)
    except BrokenPipeError:
        # `branch-platform events | head`: the reader is gone, which is no error of ours. As
        # the Python documentation advises: point stdout at /dev/null so that the interpreter's
        # final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
