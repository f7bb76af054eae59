"""fleetlog.gateway.tokens.TokenWatcher and credentials.TokenCache against a real Redis."""

from __future__ import annotations

import asyncio

import redis

from fleetlog import keys
from fleetlog.credentials import Credentials, TokenCache, TokenChange, hash_token
from fleetlog.gateway.tokens import TokenWatcher
from fleetlog.queue.connection import connect_async


async def _until(check: object, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if callable(check) and check():
            return True
        await asyncio.sleep(0.02)
    return False


def test_the_watcher_applies_add_rotate_and_revoke_and_confirms_them(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    credentials = Credentials(sync, confirm_timeout=5)

    async def run() -> None:
        client = connect_async(redis_url, timeout=5)
        table = TokenCache()
        revoked: list[set[str]] = []
        watcher = TokenWatcher(client, table, node_id="n1", on_revoked=revoked.append)
        await watcher.start()
        task = asyncio.create_task(watcher.run())
        try:
            token = await asyncio.to_thread(credentials.add, "door-1")
            assert credentials.unconfirmed == 0, "the watcher confirmed the change"
            assert table.device_for(token) == ("door-1", hash_token(token))
            new = await asyncio.to_thread(credentials.rotate, "door-1")
            assert table.device_for(token) is None and table.device_for(new) is not None
            await asyncio.to_thread(credentials.revoke, "door-1")
            assert table.device_for(new) is None
            assert revoked == [{hash_token(token)}, {hash_token(new)}]
            # Neither is cached as valid, and Redis says the same.
            assert await table.fetch(client, hash_token(new)) is None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

    asyncio.run(run())
    # What the watcher applied is what Redis holds: nothing for door-1.
    assert sync.hgetall(keys.TOKENS) == {}
    sync.close()


def test_a_revocation_missed_by_the_subscription_is_found_by_the_poll(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    token = Credentials(sync).add("kiosk-9")
    digest = hash_token(token)

    async def run() -> None:
        client = connect_async(redis_url, timeout=5)
        table = TokenCache()
        revoked: list[set[str]] = []
        watcher = TokenWatcher(client, table, node_id="n1", on_revoked=revoked.append,
                               connected=lambda: [digest], poll_interval=0.1)
        await watcher.start()
        task = asyncio.create_task(watcher.run())
        try:
            assert await table.fetch(client, digest) == "kiosk-9"
            assert table.device_for(token) == ("kiosk-9", digest)
            # Revoked behind pub/sub's back, as if the message were lost.
            sync.hdel(keys.TOKENS, digest)
            sync.incr(keys.TOKENS_VERSION)
            assert await _until(lambda: revoked == [{digest}])
            assert table.device_for(token) is None, "the cache was emptied"
            assert await table.fetch(client, digest) is None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

    asyncio.run(run())
    sync.close()


def test_the_cache_refuses_a_change_that_skips_a_version() -> None:
    table = TokenCache()
    assert not table.apply(TokenChange(version=1, change_id="c1", added={"a" * 64: "d"})), "not read yet"
    table.clear(1)
    assert not table.apply(TokenChange(version=3, change_id="c3", added={"b" * 64: "d"}))
    assert not table.cached("b" * 64), "a gap means clear, not apply"
    assert table.apply(TokenChange(version=2, change_id="c2", added={"b" * 64: "d"}))
    assert table.cached("b" * 64) and table.version == 2
    assert table.apply(TokenChange(version=2, change_id="c2", added={"c" * 64: "d"})), "already held: no-op"
    assert not table.cached("c" * 64)


def test_the_cache_is_bounded_and_keeps_what_is_used() -> None:
    table = TokenCache(capacity=3, negative_capacity=2)
    for n in range(3):
        assert table.store(f"{n}" * 64, f"dev-{n}", table.generation)
    assert table.device_for("unused") is None
    table._known.move_to_end("0" * 64)  # as a lookup of device 0 would
    assert table.store("3" * 64, "dev-3", table.generation)
    assert [table.cached(f"{n}" * 64) for n in range(4)] == [True, False, True, True]
    for n in range(5, 8):
        assert table.store(f"{n}" * 64, None, table.generation)
    assert [table.cached(f"{n}" * 64) for n in range(5, 8)] == [False, True, True]
    assert len(table) == 5


def test_a_lookup_that_raced_a_change_is_not_cached(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    token = Credentials(sync).add("door-7")
    digest = hash_token(token)
    table = TokenCache()
    table.clear(1)
    started = table.generation
    # The revocation was applied while the lookup (which saw the token) was in flight.
    assert table.apply(TokenChange(version=2, change_id="c2", removed=[digest]))
    assert not table.store(digest, "door-7", started)
    assert not table.cached(digest)
    Credentials(sync).revoke("door-7")

    async def run() -> None:
        client = connect_async(redis_url, timeout=5)
        try:
            assert await table.fetch(client, digest) is None  # asked again: Redis has the answer
            assert table.cached(digest) and table.device_for(token) is None
        finally:
            await client.aclose()

    asyncio.run(run())
    sync.close()
