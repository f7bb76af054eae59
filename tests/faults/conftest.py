from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Fleet
from tests.pg import PostgresServer


def _raise_open_files_limit() -> None:
    """Up to 65,536 descriptors (within the hard limit): a fleet holds thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    _raise_open_files_limit()
    running = Fleet(tmp_path)
    yield running
    running.close()


@pytest.fixture
def pg_fleet(tmp_path: Path, private_postgres: PostgresServer) -> Iterator[Fleet]:
    """A fleet whose workers store into PostgreSQL (a server of the test's own, to stop)."""
    _raise_open_files_limit()
    running = Fleet(tmp_path, store_url=private_postgres.create_database())
    yield running
    running.close()
