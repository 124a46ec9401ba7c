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
    last_seq INTEGER NOT NULL,
    last_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    gw TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    received_at REAL NOT NULL,
    raw BLOB NOT NULL,
    PRIMARY KEY (gw, seq)
);
CREATE TABLE IF NOT EXISTS events (
    gw TEXT NOT NULL,
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
    PRIMARY KEY (gw, id)
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
    conn.executescript(SCHEMA)
    return conn


def event_row(gw: str, seq: int, ev: dict[str, Any]) -> tuple[Any, ...]:
    attrs = ev.get("attrs")
    return (gw, ev["id"], ev["t"], ev["tq"], ev["src"], ev["type"], json.dumps(ev["v"]),
            ev.get("u"), ev["prio"], None if attrs is None else json.dumps(attrs), seq)


def row_event(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    gw, id_, t, tq, src, type_, v, u, prio, attrs, seq = row
    ev: dict[str, Any] = {"gw": gw, "id": id_, "t": t, "tq": tq, "src": src, "type": type_,
                          "v": json.loads(v), "prio": prio, "seq": seq}
    if u is not None:
        ev["u"] = u
    if attrs is not None:
        ev["attrs"] = json.loads(attrs)
    return ev
