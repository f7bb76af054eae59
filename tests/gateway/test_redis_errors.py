"""A gateway whose Redis refuses writes for a while (out of memory), then takes them again.

Redis answers every write with an ``OOM`` error reply (``maxmemory 1``,
``noeviction``) rather than going away: an error reply, not a lost connection.
The gateway's background tasks (heartbeat, link writer, control listener) must
outlive it: ``/healthz`` says 503 while it lasts and 200 after, the heartbeat
comes back, the links changed meanwhile are written, and records are acked
only when stored.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
import websockets

from fleetlog.config import Settings
from fleetlog.embedded import RedisServer
from fleetlog.gateway.server import Gateway
from fleetlog.gateway.wiring import wire
from tests.conftest import Processes
from tests.helpers import RECEIVED, STORED, legacy_frame, send_legacy, wait_until

HEARTBEAT_TTL = 1.5


def healthz(port: int) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def gateway_log(tmp_path: Path) -> str:
    return next(tmp_path.glob("gateway-*.log")).read_text()


def out_of_memory(client: redis.Redis, on: bool) -> None:
    if on:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
    else:
        client.config_set("maxmemory", "0")


async def wait_for(predicate: object, timeout: float) -> bool:
    """Like ``wait_until``, without blocking the event loop the device runs on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.1)
    return bool(predicate())  # type: ignore[operator]


async def test_background_tasks_survive_redis_out_of_memory(
    private_redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    gateway, port = processes.gateway(private_redis.url, data_dir,
                                      env={"FLEETLOG_HEARTBEAT_TTL": str(HEARTBEAT_TTL)})
    url = f"ws://127.0.0.1:{port}"
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert wait_until(lambda: bool(client.keys("fleetlog:node:*")), timeout=5)
        node_key = client.keys("fleetlog:node:*")[0]
        async with websockets.connect(url) as before:
            assert await send_legacy(before, legacy_frame("before", 0)) == [RECEIVED, STORED]

            out_of_memory(client, True)
            # A device that connects while Redis refuses writes: its link must be written later.
            async with websockets.connect(url) as during:
                replies = await send_legacy(during, legacy_frame("during", 0))
                assert replies[0] == RECEIVED and replies[1]["code"] == "unavailable"
                assert await wait_for(lambda: healthz(port)[0] == 503, timeout=10)
                status, body = healthz(port)
                # A short generic reason: Redis' own error text is for the log only.
                assert (status, body["redis"]) == (503, "redis refusing writes"), body
                assert "maxmemory" not in json.dumps(body) and "OOM" not in json.dumps(body)
                # Longer than the heartbeat's TTL: its key expires, the heartbeat keeps trying.
                assert await wait_for(lambda: not client.exists(node_key), timeout=HEARTBEAT_TTL * 3)
                await asyncio.sleep(1.0)
                out_of_memory(client, False)

                assert await wait_for(lambda: client.exists(node_key), timeout=10), "heartbeat back"
                assert await wait_for(lambda: client.hexists("device:links", "during"), timeout=10)
                assert await wait_for(lambda: healthz(port)[0] == 200, timeout=10)
                status, body = healthz(port)
                assert (status, body["status"], body["redis"], body["tasks"]) == (200, "ok", "ok", "ok")
                # The refused record sent again is stored; the connection never went away.
                assert await send_legacy(during, legacy_frame("during", 0)) == [RECEIVED, STORED]
            assert await send_legacy(before, legacy_frame("before", 1)) == [RECEIVED, STORED]
        assert client.xlen("fleetlog:records") == 3, "nothing queued while Redis refused writes"
        assert wait_until(lambda: not client.hexists("device:links", "before"), timeout=10)
        assert gateway.poll() is None
    finally:
        client.close()
    log = gateway_log(tmp_path)
    assert "heartbeat failed: Redis refused" in log and "writing link updates failed" in log
    assert "maxmemory" in log, "the detail /healthz leaves out is in the log"


async def test_a_background_task_that_ends_makes_healthz_503(redis_url: str) -> None:
    """However a long-lived task ends before shutdown, the node says it is unhealthy."""
    settings = Settings(host="127.0.0.1", ws_port=0, auth="none", heartbeat_ttl=HEARTBEAT_TTL)
    gateway = Gateway(wire(settings, redis_url))
    await gateway.start()
    try:
        assert (await asyncio.to_thread(healthz, gateway.port))[0] == 200
        heartbeat = next(task for task in gateway.registry.tasks if task.get_name() == "heartbeat")
        heartbeat.cancel()
        await asyncio.wait([heartbeat], timeout=5)
        status, body = await asyncio.to_thread(healthz, gateway.port)
        assert (status, body["tasks"]) == (503, "background task stopped: heartbeat"), body
        assert body["redis"] == "ok"
    finally:
        await gateway.stop()


async def test_healthz_gives_a_generic_reason_when_redis_is_unreachable(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can ask ``/healthz``: it says "redis unavailable", not where Redis is or why.

    The connection error names Redis' host and port; that detail goes to the log.
    """
    settings = Settings(host="127.0.0.1", ws_port=0, auth="none", heartbeat_ttl=HEARTBEAT_TTL)
    gateway = Gateway(wire(settings, private_redis.url))
    await gateway.start()
    try:
        private_redis.kill()
        assert await wait_for(lambda: gateway.registry.last_error is not None, timeout=10)
        status, body = await asyncio.to_thread(healthz, gateway.port)
        assert (status, body["status"], body["redis"]) == (503, "degraded", "redis unavailable"), body
        port = str(private_redis.port)
        assert port not in json.dumps(body) and "Error" not in json.dumps(body), body
        assert any(port in record.getMessage() for record in caplog.records), "detail in the log"
    finally:
        await gateway.stop()
