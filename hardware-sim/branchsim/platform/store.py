"""The reference platform's own SQLite database: registered gateways, hash chains, accepted
batches (raw bytes kept as evidence), deduplicated events, rejection counters, and path
supervision (each path's last heartbeat; the platform's own events about its gateways).

A gateway's batches form one hash chain per lane (docs/PROTOCOL.md 3.2: 0 bulk, 1 alarm) within
an epoch, so a chain head, a batch and the batch that delivered an event are named by lane and
seq together. Event ids are shared by the lanes: an event is still named by (gw, epoch, id).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "open_store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS gateways (
    kid BLOB PRIMARY KEY,
    gw TEXT NOT NULL,             -- one key per gateway, two during a key rotation
    pubkey BLOB NOT NULL          -- SPKI PEM
);
CREATE TABLE IF NOT EXISTS chain (
    gw TEXT NOT NULL,
    lane INTEGER NOT NULL,        -- 0 bulk, 1 alarm
    epoch BLOB NOT NULL,          -- the epoch of this lane's head (x'' for none); a head of an
    last_seq INTEGER NOT NULL,    -- epoch older than the gateway's current one (its newest in
    last_hash BLOB NOT NULL,      -- `epochs`) is no head: that lane has no batch in it yet
    PRIMARY KEY (gw, lane)
);
CREATE TABLE IF NOT EXISTS epochs (
    n INTEGER PRIMARY KEY AUTOINCREMENT,  -- order in which the platform saw them start
    gw TEXT NOT NULL,
    epoch BLOB NOT NULL,
    started_at REAL NOT NULL,
    prev_epoch BLOB,              -- the chain it replaced (NULL for a gateway's first) ...
    prev_seq INTEGER,             -- ... and where its bulk lane ended: the gap on record
    prev_hash BLOB,               --     (NULL: that lane had no batch in it)
    prev_alarm_seq INTEGER,       -- ... and where its alarm lane ended (NULL: no batch)
    prev_alarm_hash BLOB,
    UNIQUE (gw, epoch)
);
CREATE TABLE IF NOT EXISTS batches (
    gw TEXT NOT NULL,
    epoch BLOB NOT NULL,
    lane INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    received_at REAL NOT NULL,
    raw BLOB NOT NULL,
    PRIMARY KEY (gw, epoch, lane, seq)
);
CREATE TABLE IF NOT EXISTS events (
    gw TEXT NOT NULL,
    epoch BLOB NOT NULL,          -- ids are unique per (gateway, epoch), over both lanes
    id INTEGER NOT NULL,
    t REAL NOT NULL,
    tq INTEGER NOT NULL,
    src TEXT NOT NULL,
    type TEXT NOT NULL,
    v TEXT,                       -- JSON
    u TEXT,
    prio INTEGER NOT NULL,
    attrs TEXT,                   -- JSON
    lane INTEGER NOT NULL,        -- the batch that delivered it first: its lane ...
    seq INTEGER NOT NULL,         -- ... and seq
    PRIMARY KEY (gw, epoch, id)
);
CREATE TABLE IF NOT EXISTS rejections (
    gw TEXT NOT NULL,             -- '' when the batch named no gateway we could trust
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (gw, reason)
);
CREATE TABLE IF NOT EXISTS heartbeats (  -- path supervision (docs/PROTOCOL.md 7)
    gw TEXT NOT NULL,
    path TEXT NOT NULL,           -- 'mqtt', 'coap'
    last_seq INTEGER NOT NULL,    -- the last accepted heartbeat's seq: the next must be above
    last_at REAL NOT NULL,        -- when it arrived (platform clock, Unix seconds)
    PRIMARY KEY (gw, path)
);
CREATE TABLE IF NOT EXISTS platform_events (  -- what the platform itself raised about a gateway
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,             -- platform clock, Unix seconds
    gw TEXT NOT NULL,
    type TEXT NOT NULL,           -- gateway.path_lost, gateway.path_restored, gateway.offline,
    attrs TEXT NOT NULL           -- gateway.online; attrs: JSON
);
"""

# A store made before a protocol feature cannot hold its chains: (column of `batches` it added,
# what a store without it was made by).
_REQUIRED = (("epoch", "chain epochs (docs/PROTOCOL.md 4.2)"),
             ("lane", "lanes (docs/PROTOCOL.md 3.2)"))


def open_store(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the platform database; autocommit off, WAL, FULL sync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    columns = {r[1] for r in conn.execute("PRAGMA table_info(batches)")}
    for column, feature in _REQUIRED:
        if columns and column not in columns:
            conn.close()
            raise RuntimeError(
                f"{path} was made by a platform without {feature}; "
                "this one cannot extend it: serve from a new store file")
    conn.executescript(SCHEMA)
    return conn


def event_row(gw: str, epoch: bytes, lane: int, seq: int, ev: dict[str, Any]
              ) -> tuple[Any, ...]:
    attrs = ev.get("attrs")
    return (gw, epoch, ev["id"], ev["t"], ev["tq"], ev["src"], ev["type"], json.dumps(ev["v"]),
            ev.get("u"), ev["prio"], None if attrs is None else json.dumps(attrs), lane, seq)


def row_event(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    gw, epoch, id_, t, tq, src, type_, v, u, prio, attrs, lane, seq = row
    ev: dict[str, Any] = {"gw": gw, "epoch": bytes(epoch).hex(), "id": id_, "t": t, "tq": tq,
                          "src": src, "type": type_, "v": json.loads(v), "prio": prio,
                          "lane": lane, "seq": seq}
    if u is not None:
        ev["u"] = u
    if attrs is not None:
        ev["attrs"] = json.loads(attrs)
    return ev
