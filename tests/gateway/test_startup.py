"""A gateway whose start fails part-way closes what it had opened, and exits 1."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fleetlog.config import Settings
from fleetlog.embedded import RedisServer
from fleetlog.gateway.server import Gateway
from fleetlog.gateway.wiring import wire


def _fleetlog_clients(url: str) -> int:
    """Connections to Redis named as fleetlog names its own (the checking one is not)."""
    client = redis.Redis.from_url(url)
    try:
        return sum(1 for entry in client.client_list() if entry.get("name") == "fleetlog")
    finally:
        client.close()


async def _none_left(url: str) -> int:
    for _ in range(100):  # Redis sees a closed connection a moment later
        if not (count := await asyncio.to_thread(_fleetlog_clients, url)):
            return 0
        await asyncio.sleep(0.05)
    return count


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_taken_port_leaves_no_redis_connection_nor_listener(
        private_redis: RedisServer, taken_port: int) -> None:
    metrics_port = _free_port()
    settings = Settings(host="127.0.0.1", ws_port=taken_port, auth="token",
                        gateway_metrics_port=metrics_port)
    gateway = Gateway(wire(settings, private_redis.url))
    with pytest.raises(OSError, match=r"address already in use|bind"):
        await gateway.start()
    assert await _none_left(private_redis.url) == 0, "the clients and the token subscription closed"
    with socket.socket() as again:  # the metrics listener let its port go
        again.bind(("127.0.0.1", metrics_port))
    await gateway.stop()  # nothing left to close: a no-op


async def test_a_failure_after_connecting_closes_the_connections(
        private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any failure, not only the listener's: here the token subscription's."""
    gateway = Gateway(wire(Settings(host="127.0.0.1", ws_port=0, auth="token"), private_redis.url))

    async def broken() -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(gateway.parts.token_watcher, "start", broken)
    with pytest.raises(RuntimeError, match="broken"):
        await gateway.start()
    assert await _none_left(private_redis.url) == 0


def test_the_command_exits_one_on_a_taken_port(redis_url: str, tmp_path: Path,
                                               taken_port: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fleetlog", "gateway", "--port", str(taken_port),
         "--redis-url", redis_url, "--auth", "none", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "gateway cannot start" in result.stderr
    assert "Traceback" not in result.stderr
