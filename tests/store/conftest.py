"""The backends the store contract suite (``test_contract.py``) runs against.

A backend joins by adding a :class:`Backend` to :data:`BACKENDS`: how to open
a fresh store (read-write and read-only), the URL of one that does not exist,
and how to make one unreadable.  The tests themselves never change.

PostgreSQL runs on the session's private server (``tests/pg.py``), one new
database per test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from fleetlog.store import Store, open_store


@dataclass
class Backend:
    """One fresh store of one backend, opened as often as a test likes."""

    url: str
    missing_url: str
    wreck: Callable[[], None]  # make the store unreadable (its data gone bad)
    opened: list[Store] = field(default_factory=list)

    def open(self, *, readonly: bool = False) -> Store:
        store = open_store(self.url, readonly=readonly)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            try:
                store.close()
            except Exception:  # a wrecked store may not close cleanly
                pass


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    path = tmp_path / "store" / "fleetlog.db"

    def wreck() -> None:
        for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            side.unlink(missing_ok=True)
        path.write_bytes(b"this is not a database" * 512)

    return Backend(f"sqlite:///{path}", f"sqlite:///{tmp_path / 'nowhere' / 'fleetlog.db'}", wreck)


def _postgresql(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    url: str = request.getfixturevalue("pg_url")  # a new empty database, dropped after the test

    def wreck() -> None:  # the records table gone, the rest of the schema left
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE records CASCADE")

    return Backend(url, url.rsplit("/", 1)[0] + "/nowhere", wreck)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "sqlite": _sqlite, "postgresql": _postgresql}


@pytest.fixture(params=sorted(BACKENDS))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    backend = BACKENDS[request.param](request, tmp_path)
    yield backend
    backend.close_all()
