"""What every measurement shares, and how servers are started.

A :class:`Bench` holds the profile, the :class:`~bench.procs.Children` that
owns every process, and the one private Redis.  Load clients are started by
``loadgen`` when one is given (a before/after comparison drives both
revisions with the same simulator), else by ``children``.  A :class:`Server` is anything
the load clients can connect to: either system's gateway or a bare echo server.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from bench import systems
from bench.procs import Child, ChildFailed, Children, wait_for_port
from bench.profile import Profile
from fleetlog.embedded import RedisServer, free_port

__all__ = ["ECHO_SERVERS", "INSTANT_ACK", "PY", "Bench", "Server", "start_server"]

PY = sys.executable
#: Bare echo servers by name: the library each gateway is built on.
ECHO_SERVERS = {"echo-websockets": "websockets", "echo-picows": "picows"}
#: A picows server that answers every frame with the legacy ack pair at once (``bench.echo
#: serve --reply legacy-ack``): ``fleetlog simulate`` drives it like a gateway, and its ack
#: latency is the floor that the machine and the load generator set under a gateway's.
INSTANT_ACK = "instant-ack"


@dataclass
class Bench:
    profile: Profile
    children: Children
    redis_server: RedisServer
    client: redis.Redis
    scratch: Path
    loadgen: Children | None = None

    @property
    def clients(self) -> Children:
        """Who starts load clients (their environment decides which simulator runs)."""
        return self.loadgen or self.children

    def fresh_dir(self, name: str) -> Path:
        path = self.scratch / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def reset_redis(self) -> None:
        """Empty Redis and compact its AOF, so every run starts from the same state."""
        client = self.client
        client.flushall()
        client.bgrewriteaof()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = client.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            time.sleep(0.02)
        raise ChildFailed("Redis AOF rewrite did not finish within 30 s")

    def redis_cpu(self) -> float:
        """Redis's CPU seconds so far: :func:`redis_cpu_seconds` of the bench's server."""
        return redis_cpu_seconds(self.client)


def redis_cpu_seconds(client: redis.Redis) -> float:
    """User + system CPU seconds of the Redis server ``client`` talks to, from ``INFO cpu``.

    Redis reads them with ``getrusage``, to the microsecond and over all its threads.
    ``/proc`` (psutil) counts in clock ticks of 10 ms: a quick run's Redis spends
    60-130 ms on 57,000 records, so a tick either way moved ``redis_vs_plain_xadd``
    by up to a sixth.  The ``INFO`` call itself costs Redis some microseconds.
    """
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class Server:
    """A started server: its name (a system or an echo server), process and port."""

    name: str
    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def is_echo(self) -> bool:
        return self.name in ECHO_SERVERS

    def stop(self) -> None:
        self.child.stop()


def _argv(bench: Bench, name: str) -> Callable[[int], list[str]]:
    if name in ECHO_SERVERS:
        lib = ECHO_SERVERS[name]
        return lambda port: [PY, "-m", "bench.echo", "serve", "--lib", lib, "--port", str(port)]
    if name == INSTANT_ACK:
        return lambda port: [PY, "-m", "bench.echo", "serve", "--lib", "picows", "--reply",
                             "legacy-ack", "--port", str(port)]
    data_dir = bench.fresh_dir(f"gateway-{name}")
    return lambda port: systems.gateway_argv(name, port, bench.redis_server.url, data_dir)


def start_server(bench: Bench, name: str) -> Server:
    """Start a gateway (``baseline``, ``fleetlog``), echo or instant-ack server; wait until it listens."""
    port = free_port()
    child = bench.children.start(name, _argv(bench, name)(port))
    wait_for_port(port, child)
    return Server(name, child, port)
