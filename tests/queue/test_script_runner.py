"""fleetlog.queue.script_runner.RedisScript against a real Redis (the producer's only Redis)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
import redis.exceptions

from fleetlog.embedded import RedisServer
from fleetlog.errors import WriteUnconfirmed
from fleetlog.net import free_port
from fleetlog.queue.connection import REDIS_DOWN, connect_async
from fleetlog.queue.producer import IngestResult, Producer
from fleetlog.queue.script_runner import RedisAppend, RedisScript, ScriptRunner
from tests.helpers import queued

_APPEND = "for i, v in ipairs(ARGV) do redis.call('RPUSH', KEYS[1], v) end return redis.call('LLEN', KEYS[1])"


def test_runs_the_script_with_keys_and_args_and_reloads_it_after_a_flush(redis_url: str) -> None:
    async def run() -> tuple[int, int]:
        client = connect_async(redis_url, timeout=5)
        try:
            script: ScriptRunner = RedisScript(client, _APPEND)
            first = await script.run(["k"], [b"a", "b", 3])
            await client.script_flush()  # as a Redis restarted empty: NOSCRIPT, load, once more
            second = await script.run(["k"], ["d"])
            return first, second
        finally:
            await client.aclose()

    assert asyncio.run(run()) == (3, 4)
    sync = redis.Redis.from_url(redis_url)
    assert sync.lrange("k", 0, -1) == [b"a", b"b", b"3", b"d"]  # once each: nothing sent twice
    sync.close()


def test_a_script_error_is_raised_and_the_connection_stays_usable(redis_url: str) -> None:
    async def run() -> int:
        client = connect_async(redis_url, timeout=5)
        try:
            with pytest.raises(redis.exceptions.ResponseError):
                await RedisScript(client, "return redis.call('NOSUCHCOMMAND')").run([], [])
            result: int = await RedisScript(client, _APPEND).run(["k2"], ["x"])
            return result
        finally:
            await client.aclose()

    assert asyncio.run(run()) == 1


def test_no_redis_raises_a_connection_error() -> None:
    async def run() -> None:
        client = connect_async(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
        try:
            with pytest.raises(REDIS_DOWN):
                await RedisScript(client, _APPEND).run(["k"], ["x"])
        finally:
            await client.aclose()

    asyncio.run(run())


def test_the_producer_queues_after_redis_restarted_empty(private_redis: RedisServer) -> None:
    """A restart without the script cache (NOSCRIPT) costs a reload, not the records."""
    async def run() -> list[IngestResult | Exception]:
        producer = Producer(connect_async(private_redis.url, timeout=5), mode="stream",
                            stream="fleetlog:records", max_backlog=1000)
        producer.start()
        outcomes: list[IngestResult | Exception] = []
        loop = asyncio.get_running_loop()
        for batch in ([b"r1"], [b"r2", b"r3"]):
            done = loop.create_future()
            producer.submit("dev-1", batch, done.set_result)
            outcomes.append(await asyncio.wait_for(done, 10))
            sync = redis.Redis.from_url(private_redis.url)
            sync.script_flush()
            sync.close()
        await producer.close()
        return outcomes

    assert asyncio.run(run()) == [IngestResult(), IngestResult()]
    sync = redis.Redis.from_url(private_redis.url)
    assert [record for _, record in queued(sync, "fleetlog:records")] == [b"r1", b"r2", b"r3"]
    sync.close()


def test_the_plain_append_refused_for_memory_writes_nothing_and_says_why(
    private_redis: RedisServer,
) -> None:
    """Under maxmemory Redis refuses the transaction's XADD as it is queued: EXEC runs nothing,
    the runner raises Redis's own OOM error (not EXECABORT) and its connection stays usable."""
    sync = redis.Redis.from_url(private_redis.url)
    stream, counter = "fleetlog:records", "fleetlog:records:backlog"

    async def run() -> list[object]:
        client = connect_async(private_redis.url, timeout=5)
        try:
            append: ScriptRunner = RedisAppend(client)
            args = [2, "dev-1", 2, b'{"a":1}\n{"a":2}']
            first = await append.run([stream, counter], args)
            sync.config_set("maxmemory-policy", "noeviction")
            sync.config_set("maxmemory", 1)
            with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):
                await append.run([stream, counter], args)
            sync.config_set("maxmemory", 0)
            again = await append.run([stream, counter], args)
            return [first[0], first[2], again[0], again[2]]
        finally:
            await client.aclose()

    try:
        assert asyncio.run(run()) == [0, 2, 1, 4]  # length before, counter after: each call once
        assert sync.xlen(stream) == 2 and sync.get(counter) == b"4"
    finally:
        sync.config_set("maxmemory", 0)
        sync.close()


@pytest.mark.parametrize("runner", ["script", "append"])
def test_a_call_that_redis_stops_answering_ends_at_the_timeout_as_unconfirmed(
    private_redis: RedisServer, runner: str,
) -> None:
    """The whole exchange has the socket timeout once: a Redis stopped after taking the call
    makes it :class:`WriteUnconfirmed` (it may have run) about then, not a timeout per reply;
    the connection's own timeout is back for its other commands, and once Redis runs again
    the next call goes through and the one cut off was written once."""
    sync = redis.Redis.from_url(private_redis.url)
    stream, counter = "fleetlog:records", "fleetlog:records:backlog"
    assert private_redis.process is not None

    async def run() -> tuple[float, list[float | None]]:
        client = connect_async(private_redis.url, timeout=1)
        try:
            call: ScriptRunner = RedisAppend(client) if runner == "append" else RedisScript(client, _APPEND)
            keys, args = ([stream, counter], [1, "dev-1", 1, b'{"a":1}']) if runner == "append" else (
                ["list"], ["x"])
            await call.run(keys, args)
            private_redis.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            started = time.monotonic()
            try:
                with pytest.raises(WriteUnconfirmed, match="within 1 s"):
                    await call.run(keys, args)
            finally:
                waited = time.monotonic() - started
                private_redis.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            await call.run(keys, args)
            pool = client.connection_pool
            return waited, [connection.socket_timeout for connection in pool._available_connections]
        finally:
            await client.aclose()

    waited, timeouts = asyncio.run(run())
    assert 0.9 <= waited < 2.5
    assert timeouts and all(timeout == 1 for timeout in timeouts)
    if runner == "append":  # the call cut off ran once Redis did: three entries, counted
        assert sync.xlen(stream) == 3 and sync.get(counter) == b"3"
    else:
        assert sync.lrange("list", 0, -1) == [b"x", b"x", b"x"]
    sync.close()
