from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    running = Fleet(tmp_path)
    yield running
    running.close()
