"""Redis clients configured once, for every fleetlog process.

Both clients fail fast and never retry a command by themselves: a retried
XADD after a timeout could queue a record twice, and a gateway must answer a
device ``unavailable`` promptly rather than hang.  Callers own the retry policy
(the worker backs off; the gateway lets the device resend).
"""

from __future__ import annotations

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.backoff
import redis.retry

#: Errors that mean "Redis is not there right now", as opposed to a bug.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    ConnectionError,
    TimeoutError,
)

#: Short reasons for a failing Redis that anyone may read (``/healthz``); the
#: detail (host, port, Redis' own message) goes to the log only.
REDIS_UNAVAILABLE = "redis unavailable"
REDIS_REFUSING_WRITES = "redis refusing writes"
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


def connect(url: str, *, timeout: float = 5.0) -> redis.Redis:
    """A blocking client; ``timeout`` bounds every command except blocking reads."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        client_name="fleetlog",
    )


def connect_async(url: str, *, timeout: float = 5.0) -> redis.asyncio.Redis:
    """An asyncio client; ``timeout`` bounds every command."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0),
        client_name="fleetlog",
    )
