"""The browser tests' fixtures: the API of tests/api, and where screenshots go."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import api as api

__all__ = ["api", "screens"]


@pytest.fixture
def screens(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "screenshots"
    folder.mkdir()
    yield folder
    keep = os.environ.get("FLEETLOG_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in folder.glob("*.png"):
            shutil.copy(shot, Path(keep) / shot.name)
