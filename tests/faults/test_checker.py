"""The checker itself: it must catch a lost id, an id nobody accepted, and a tampered batch,
or a green fault suite would prove nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from agent.protocol import ProtocolError
from tests.faults.checker import Ledger, check_platform
from tests.faults.conftest import Chain, counter


def tampered(ledger: Ledger, dst: Path, sql: str, *args: object) -> Ledger:
    """A copy of the platform store with one change applied, and a ledger pointing at it."""
    with contextlib.closing(sqlite3.connect(ledger.platform_store)) as src, \
            contextlib.closing(sqlite3.connect(dst)) as out:
        src.backup(out)
        out.execute(sql, args)
        out.commit()
    return dataclasses.replace(ledger, platform_store=dst)


def test_checker_catches_loss_strangers_and_tampering(chain: Chain, tmp_path: Path) -> None:
    """A clean run passes; deleting one delivered event, adding one never accepted, or
    altering a stored batch's bytes each make the checker fail."""
    chain.start_agent(counter("c", 200.0, batch=2))
    chain.wait_delivered(200)
    chain.drain()
    led = chain.ledger
    assert check_platform(led, ["synthetic.c"]).lost == 0
    lost = tampered(led, tmp_path / "lost.db", "DELETE FROM events WHERE id = 17")
    with pytest.raises(AssertionError, match="LOST"):
        check_platform(lost, [])
    stranger = tampered(led, tmp_path / "stranger.db",
                        "INSERT INTO events SELECT gw, epoch, id + 1000000, t, tq, src, type, v, "
                        "u, prio, attrs, lane, seq FROM events WHERE id = 5")
    with pytest.raises(AssertionError, match="never accepted"):
        check_platform(stranger, [])
    with contextlib.closing(sqlite3.connect(led.platform_store)) as c:
        raw = bytearray(c.execute("SELECT raw FROM batches WHERE seq = 2").fetchone()[0])
    raw[-70] ^= 0x01  # one bit in the signed payload
    forged = tampered(led, tmp_path / "forged.db", "UPDATE batches SET raw = ? WHERE seq = 2",
                      bytes(raw))
    with pytest.raises(ProtocolError):
        check_platform(forged, [])
