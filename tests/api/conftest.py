"""An API process on a free port, and operator tokens of each role, on the session's real Redis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from fleetlog.api.auth import OperatorTokens
from fleetlog.embedded import free_port
from tests.conftest import Processes, wait_for_port


@dataclass
class Api:
    url: str
    admin: str
    reader: str
    redis_url: str
    data_dir: Path


@pytest.fixture
def api(redis_url: str, tmp_path: Path, processes: Processes) -> Api:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    client = redis.Redis.from_url(redis_url)
    tokens = OperatorTokens(client)
    admin, reader = tokens.add("ops", "admin"), tokens.add("viewer", "read")
    client.close()
    port = free_port()
    process = processes.start("api", "--redis-url", redis_url, "--data-dir", str(data_dir),
                              "--port", str(port))
    wait_for_port(port, process=process)
    return Api(f"http://127.0.0.1:{port}", admin, reader, redis_url, data_dir)
