"""pytest fixtures for a real PostgreSQL (the launcher is branchsim.pgserver): one server per test
session, a fresh database per test. A pytest plugin, registered by tests/conftest.py
(importing the fixtures into each module instead would start one server per module).

`make_store(kind)` makes the platform's store of either kind, "sqlite" (a `Receiver` on a file
in tmp_path) or "postgresql" (a `PgReceiver` on a fresh database), for the tests that run
against both. Test modules import nothing from here at run time (`Store` under TYPE_CHECKING):
a plugin module imported before pytest registers it is not assert-rewritten, and says so.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from branchsim.pgserver import PostgresServer
from branchsim.platform.pgstore import PgReceiver
from branchsim.platform.receiver import Receiver

__all__ = ["Store", "make_store", "pg_dsn", "postgres_server"]

Store = Receiver | PgReceiver


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session, stopped at its end. Its directory is a mkdtemp() of its
    own, not under pytest's tmp_path: as root the server runs as the postgres user, which
    cannot enter pytest's 0700 directories."""
    dir = Path(tempfile.mkdtemp(prefix="branch-pg-"))
    server = PostgresServer(dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(dir, ignore_errors=True)


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A new, empty database for the test (dropped after it, with any session left on it)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    try:
        yield dsn
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """`make_store(kind, **kwargs)`: a platform store, "sqlite" or "postgresql" (on the
    `pg_dsn` database, asked for only then); `kwargs` as `Receiver` takes them. Every store
    made is closed after the test."""
    made: list[Store] = []

    def make(kind: str, **kwargs: bool) -> Store:
        store: Store
        if kind == "sqlite":
            store = Receiver(tmp_path / "platform.db", **kwargs)
        elif kind == "postgresql":
            store = PgReceiver(request.getfixturevalue("pg_dsn"), **kwargs)
        else:
            raise ValueError(f"no store of kind {kind!r}")
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
