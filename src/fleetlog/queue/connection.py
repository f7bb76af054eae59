"""Redis clients configured once, for every fleetlog process.

Both clients fail fast and never retry a command by themselves: a retried
XADD after a timeout could queue a record twice, and a gateway must answer a
device ``unavailable`` promptly rather than hang.  Callers own the retry policy
(the worker backs off; the gateway lets the device resend).
"""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.backoff
import redis.cluster
import redis.retry

from fleetlog.config import CLUSTER_SCHEMES

#: Errors that mean "Redis is not there right now", as opposed to a bug.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,  # a failover under way, a slot not served
    redis.exceptions.SlotNotCoveredError,
    ConnectionError,
    TimeoutError,
)

#: Short reasons for a failing Redis that anyone may read (``/healthz``); the
#: detail (host, port, Redis' own message) goes to the log only.
REDIS_UNAVAILABLE = "redis unavailable"
REDIS_REFUSING_WRITES = "redis refusing writes"
REDIS_NOT_REPLICATED = "redis replicas not confirming writes"
INTERNAL_ERROR = "internal error"


def public_reason(exc: BaseException) -> str:
    """The short, generic reason ``exc`` stands for, safe to show to anyone.

    A read-only replica, out of memory, a failing disk (MISCONF) refuse
    writes; a refused or timed-out connection or a Redis still loading is
    unavailable; anything else is a bug of ours.
    """
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return REDIS_REFUSING_WRITES
    if isinstance(exc, REDIS_DOWN):
        return REDIS_UNAVAILABLE
    if isinstance(exc, redis.exceptions.RedisError):
        return REDIS_REFUSING_WRITES
    return INTERNAL_ERROR


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://host:port``)."""
    return url.startswith(CLUSTER_SCHEMES)


def cluster_url(url: str) -> str:
    """``url`` as a cluster URL (``--redis-cluster``): ``redis://`` becomes ``redis+cluster://``."""
    if is_cluster_url(url):
        return url
    scheme, sep, rest = url.partition("://")
    return f"{scheme}+cluster{sep}{rest}"


def _node_url(url: str) -> str:
    return url.replace("+cluster://", "://", 1)


def is_cluster(client: object) -> bool:
    """Whether ``client`` talks to a Redis Cluster (blocking or asyncio)."""
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


async def initialize(client: redis.asyncio.Redis) -> None:
    """Learn a cluster's slots now (a no-op for one Redis).

    redis-py's asyncio cluster client learns them on its first command, but
    its pub/sub picks a node before that and fails on an empty slot table.
    """
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.initialize()


async def fewest_replicas(client: redis.asyncio.Redis) -> int:
    """The fewest replicas any master of ``client``'s Redis has (0: some master has none).

    A cluster's answer comes from ``CLUSTER NODES`` (every replica the cluster
    knows, failed or not: the configuration says what the operator built;
    ``CLUSTER SLOTS`` leaves out a replica that has no data yet); one Redis
    says how many replicas are connected to it (``INFO replication``).
    """
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        nodes: dict[str, dict[str, Any]] = await client.cluster_nodes()
        replicas = {node["node_id"]: 0 for node in nodes.values()
                    if "master" in node["flags"] and node["slots"]}
        for node in nodes.values():
            if node["master_id"] in replicas:
                replicas[node["master_id"]] += 1
        return min(replicas.values(), default=0)
    replication = await client.info("replication")
    return int(replication.get("connected_slaves", 0))


def connect(url: str, *, timeout: float = 5.0) -> redis.Redis:
    """A blocking client; ``timeout`` bounds every command except blocking reads.

    A ``redis+cluster://`` URL gives a :class:`redis.cluster.RedisCluster`.  It
    is typed as :class:`redis.Redis`, whose commands it has; the few places
    where a cluster differs (transactions, multi-key scripts and reads, pub/sub)
    ask :func:`is_cluster`.
    """
    if is_cluster_url(url):
        cluster = redis.cluster.RedisCluster.from_url(
            _node_url(url),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            client_name="fleetlog",
        )
        return cast(redis.Redis, cluster)
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        client_name="fleetlog",
    )


def connect_async(url: str, *, timeout: float = 5.0,
                  pool_size: int | None = None) -> redis.asyncio.Redis:
    """An asyncio client; ``timeout`` bounds every command (a cluster: see :func:`connect`).

    redis-py's default pool opens at most 100 connections and fails the 101st
    concurrent command at once ("Too many connections", which looks like Redis
    being down).  With ``pool_size`` a command past that many waits up to
    ``timeout`` for a connection instead: a server that takes bursts of
    concurrent requests (the API) queues them rather than refusing them.
    (A cluster client keeps a pool per node; ``pool_size`` applies to a single Redis.)
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0),
        "client_name": "fleetlog",
    }
    if is_cluster_url(url):
        cluster = redis.asyncio.cluster.RedisCluster.from_url(_node_url(url), **options)
        return cast(redis.asyncio.Redis, cluster)
    if pool_size is None:
        return redis.asyncio.Redis.from_url(url, **options)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout, **options)
    return redis.asyncio.Redis.from_pool(pool)
