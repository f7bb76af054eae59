"""fleetlog.gateway.tokens.TokenWatcher and credentials.TokenTable against a real Redis."""

from __future__ import annotations

import asyncio

import redis

from fleetlog import keys
from fleetlog.credentials import Credentials, TokenChange, TokenTable, hash_token
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
        table = TokenTable()
        changes: list[int | None] = []
        watcher = TokenWatcher(client, table, node_id="n1", on_change=lambda: changes.append(table.version))
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
            assert changes and changes[-1] == table.version
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

    asyncio.run(run())
    # What the watcher applied is what Redis holds: nothing for door-1.
    assert sync.hgetall(keys.TOKENS) == {}
    sync.close()


def test_a_change_missed_by_the_subscription_is_found_by_the_poll(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def run() -> None:
        client = connect_async(redis_url, timeout=5)
        table = TokenTable()
        watcher = TokenWatcher(client, table, node_id="n1", on_change=lambda: None, poll_interval=0.1)
        await watcher.start()
        task = asyncio.create_task(watcher.run())
        try:
            # Written behind pub/sub's back, as if the message were lost.
            sync.hset(keys.TOKENS, "f" * 64, "kiosk-9")
            sync.incr(keys.TOKENS_VERSION)
            assert await _until(lambda: table.valid("f" * 64))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

    asyncio.run(run())
    sync.close()


def test_the_table_refuses_a_change_that_skips_a_version() -> None:
    table = TokenTable()
    assert not table.apply(TokenChange(version=1, change_id="c1", added={"a" * 64: "d"})), "not loaded yet"
    table.version = 1
    assert not table.apply(TokenChange(version=3, change_id="c3", added={"b" * 64: "d"}))
    assert not table.valid("b" * 64), "a gap means reload, not apply"
    assert table.apply(TokenChange(version=2, change_id="c2", added={"b" * 64: "d"}))
    assert table.valid("b" * 64) and table.version == 2
    assert table.apply(TokenChange(version=2, change_id="c2", added={"c" * 64: "d"})), "already held: no-op"
    assert not table.valid("c" * 64)
