"""A gateway whose uplink never connects, for tests that play something at the real runtime and
then read what it kept: every event stays in the outbox, where `outbox_events` reads it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import cbor2

from agent.security.keys import generate_keypair
from tests.support.broker import get_free_port

Events = list[dict[str, Any]]


def offline_gateway(tmp_path: Path, gateway_id: str, **tables: Any) -> dict[str, Any]:
    """An agent config document (its signing key made in `tmp_path`): the MQTT uplink points at
    a port where nothing listens, and each reading is committed at once, so the outbox shows the
    timeline as it was played. `tables` are added (``sources=...``, ``commands=...``)."""
    generate_keypair(tmp_path / "keys")
    return {
        "gateway": {"id": gateway_id, "state_dir": str(tmp_path / "state"),
                    "runtime_dir": str(tmp_path / "run"),
                    "key_file": str(tmp_path / "keys" / "signing.key"), "time_sync": "synced"},
        "uplink": {"order": ["mqtt"], "mqtt": {"host": "127.0.0.1", "port": get_free_port(),
                                               "insecure": True, "backoff_max": 1.0}},
        "outbox": {"telemetry_window_ms": 0.0},
        **tables,
    }


def outbox_events(state: Path) -> Events:
    """Every event in the outbox of the gateway whose state dir is `state`, oldest first."""
    with sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True) as c:
        return [cbor2.loads(b) for (b,) in c.execute("SELECT body FROM events ORDER BY id")]
