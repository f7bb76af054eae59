"""``GET /healthz``: whether this node can ack records, in words anyone may read.

A load balancer (or anyone who can reach the port) asks; the answer is 200
while Redis takes writes and every long-lived task runs, 503 otherwise, so
devices go to a node that can ack them.  The reasons are short and generic
("redis unavailable", "redis refusing writes", "background task stopped"):
Redis' own error text names hosts, ports and configuration, and goes to the
log instead (where the producer, the heartbeat and the task watcher put it).
Nothing here does I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

import orjson

__all__ = ["TASK_STOPPED", "Health", "dead_task", "health", "redis_problem"]

TASK_STOPPED = "background task stopped"


class _Reporter(Protocol):
    """What the link registry and the producer tell about their last Redis call."""

    @property
    def last_problem(self) -> str | None: ...


class _Registry(_Reporter, Protocol):
    @property
    def beat_at(self) -> float: ...


class _Producer(_Reporter, Protocol):
    @property
    def failed_at(self) -> float: ...


def redis_problem(registry: _Registry, producer: _Producer) -> str | None:
    """Why Redis does not take writes, if it does not (a generic reason).

    The heartbeat tries every third of its TTL; the producer's last failure
    counts until a heartbeat succeeds after it (the producer only finds out
    it can write again when a device sends).
    """
    if registry.last_problem is not None:
        return registry.last_problem
    if producer.last_problem is not None and producer.failed_at > registry.beat_at:
        return producer.last_problem
    return None


def dead_task(tasks: Iterable[asyncio.Task[None]]) -> str | None:
    """``background task NAME stopped`` for the first task that ended (each runs until shutdown).

    How it ended is logged when it ends, not shown here.
    """
    for task in tasks:
        if task.done():
            return f"{TASK_STOPPED}: {task.get_name()}"
    return None


class Health:
    """A ``/healthz`` answer: HTTP ``status`` and JSON ``body``."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body


def health(*, node_id: str, connections: int, redis: str | None, tasks: str | None,
           detail: bool = True) -> Health:
    """The answer, given this node's generic problems (``None``: none).

    ``detail=False`` is the device port's answer, which anyone who can reach it
    may read: whether the node can ack, and the generic reason, but not the
    node id (host name and pid) nor how many devices it holds; those are on the
    metrics listener (``--gateway-metrics-port``).
    """
    error = redis or tasks
    answer: dict[str, object] = {"status": "degraded" if error else "ok"}
    if detail:
        answer |= {"node": node_id, "connections": connections}
    answer |= {"redis": redis or "ok", "tasks": tasks or "ok"}
    return Health(503 if error else 200, orjson.dumps(answer))
