"""The backends the store contract suite (``test_contract.py``) runs against.

A backend joins by adding a :class:`Backend` to :data:`BACKENDS`: how to open
a fresh store (read-write and read-only), the URL of one that does not exist,
and how to make one unreadable.  The tests themselves never change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


def _sqlite(tmp_path: Path) -> Backend:
    path = tmp_path / "store" / "fleetlog.db"

    def wreck() -> None:
        for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            side.unlink(missing_ok=True)
        path.write_bytes(b"this is not a database" * 512)

    return Backend(f"sqlite:///{path}", f"sqlite:///{tmp_path / 'nowhere' / 'fleetlog.db'}", wreck)


BACKENDS: dict[str, Callable[[Path], Backend]] = {"sqlite": _sqlite}


@pytest.fixture(params=sorted(BACKENDS))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    backend = BACKENDS[request.param](tmp_path)
    yield backend
    backend.close_all()
