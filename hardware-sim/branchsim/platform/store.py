"""The reference platform's own SQLite database: registered gateways, hash chains, accepted
batches (raw bytes kept as evidence), deduplicated events, and rejection counters."""

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
    gw TEXT PRIMARY KEY,
    epoch BLOB NOT NULL,          -- the gateway's current chain epoch (x'' for none)
    last_seq INTEGER NOT NULL,
    last_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS epochs (
    n INTEGER PRIMARY KEY AUTOINCREMENT,  -- order in which the platform saw them start
    gw TEXT NOT NULL,
    epoch BLOB NOT NULL,
    started_at REAL NOT NULL,
    prev_epoch BLOB,              -- the chain it replaced (NULL for a gateway's first) ...
    prev_seq INTEGER,             -- ... and where that chain ended: the gap on record
    prev_hash BLOB,
    UNIQUE (gw, epoch)
);
CREATE TABLE IF NOT EXISTS batches (
    gw TEXT NOT NULL,
    epoch BLOB NOT NULL,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    received_at REAL NOT NULL,
    raw BLOB NOT NULL,
    PRIMARY KEY (gw, epoch, seq)
);
CREATE TABLE IF NOT EXISTS events (
    gw TEXT NOT NULL,
    epoch BLOB NOT NULL,          -- ids are unique per (gateway, epoch)
    id INTEGER NOT NULL,
    t REAL NOT NULL,
    tq INTEGER NOT NULL,
    src TEXT NOT NULL,
    type TEXT NOT NULL,
    v TEXT,                       -- JSON
    u TEXT,
    prio INTEGER NOT NULL,
    attrs TEXT,                   -- JSON
    seq INTEGER NOT NULL,         -- the batch that delivered it first
    PRIMARY KEY (gw, epoch, id)
);
CREATE TABLE IF NOT EXISTS rejections (
    gw TEXT NOT NULL,             -- '' when the batch named no gateway we could trust
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (gw, reason)
);
"""


def open_store(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the platform database; autocommit off, WAL, FULL sync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    columns = {r[1] for r in conn.execute("PRAGMA table_info(batches)")}
    if columns and "epoch" not in columns:
        conn.close()
        raise RuntimeError(
            f"{path} was made by a platform without chain epochs (docs/PROTOCOL.md 4.2); "
            "this one cannot extend it: serve from a new store file")
    conn.executescript(SCHEMA)
    return conn


def event_row(gw: str, epoch: bytes, seq: int, ev: dict[str, Any]) -> tuple[Any, ...]:
    attrs = ev.get("attrs")
    return (gw, epoch, ev["id"], ev["t"], ev["tq"], ev["src"], ev["type"], json.dumps(ev["v"]),
            ev.get("u"), ev["prio"], None if attrs is None else json.dumps(attrs), seq)


def row_event(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    gw, epoch, id_, t, tq, src, type_, v, u, prio, attrs, seq = row
    ev: dict[str, Any] = {"gw": gw, "epoch": bytes(epoch).hex(), "id": id_, "t": t, "tq": tq,
                          "src": src, "type": type_, "v": json.loads(v), "prio": prio,
                          "seq": seq}
    if u is not None:
        ev["u"] = u
    if attrs is not None:
        ev["attrs"] = json.loads(attrs)
    return ev
