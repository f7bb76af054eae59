"""fleetlog.gateway.health: /healthz's answer, with generic reasons only."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
import redis.exceptions

from fleetlog.gateway.health import dead_task, health, redis_problem
from fleetlog.queue.connection import public_reason


@dataclass
class _Registry:
    last_problem: str | None = None
    beat_at: float = 0.0


@dataclass
class _Producer:
    last_problem: str | None = None
    failed_at: float = 0.0


def test_public_reasons_are_generic() -> None:
    assert public_reason(redis.exceptions.ConnectionError("Error 111 connecting to 10.1.2.3:6379")) \
        == "redis unavailable"
    assert public_reason(TimeoutError()) == "redis unavailable"
    assert public_reason(redis.exceptions.OutOfMemoryError("OOM command not allowed ... 'maxmemory'")) \
        == "redis refusing writes"
    assert public_reason(redis.exceptions.ReadOnlyError("READONLY replica")) == "redis refusing writes"
    assert public_reason(redis.exceptions.ResponseError("MISCONF disk")) == "redis refusing writes"
    assert public_reason(KeyError("bug")) == "internal error"


def test_the_producer_failure_counts_until_a_later_heartbeat() -> None:
    assert redis_problem(_Registry(), _Producer()) is None
    assert redis_problem(_Registry("redis unavailable"), _Producer()) == "redis unavailable"
    failed = _Producer("redis refusing writes", failed_at=5.0)
    assert redis_problem(_Registry(beat_at=4.0), failed) == "redis refusing writes"
    assert redis_problem(_Registry(beat_at=6.0), failed) is None, "a heartbeat succeeded since"


async def test_a_stopped_task_is_named_without_its_error() -> None:
    async def fails() -> None:
        raise RuntimeError("secret detail")

    async def runs() -> None:
        await asyncio.sleep(10)

    running = asyncio.create_task(runs(), name="links")
    failed = asyncio.create_task(fails(), name="heartbeat")
    await asyncio.wait([failed])
    try:
        assert dead_task([running]) is None
        assert dead_task([running, failed]) == "background task stopped: heartbeat"
    finally:
        running.cancel()
        failed.exception()  # retrieved: no "never retrieved" warning


def test_health_answer() -> None:
    ok = health(node_id="n1", connections=3, redis=None, tasks=None)
    assert ok.status == 200
    assert orjson.loads(ok.body) == {"status": "ok", "node": "n1", "connections": 3, "redis": "ok",
                                     "tasks": "ok"}
    # The device port's answer: no node id (host name and pid), no counts.
    public = health(node_id="n1", connections=3, redis=None, tasks=None, detail=False)
    assert orjson.loads(public.body) == {"status": "ok", "redis": "ok", "tasks": "ok"}
    bad = health(node_id="n1", connections=0, redis="redis unavailable", tasks=None)
    assert bad.status == 503 and orjson.loads(bad.body)["status"] == "degraded"
