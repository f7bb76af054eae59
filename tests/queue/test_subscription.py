"""fleetlog.queue.subscription: a subscription's messages with a timeout a cancel always ends,
against a real Redis."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio

from fleetlog.queue.subscription import Messages


async def test_a_timeout_loses_no_message_and_a_cancel_ends_the_read(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("fleetlog:test")
    messages = Messages(pubsub, ignore_subscribe_messages=True)
    try:
        assert await messages.get(1.0) is None  # the subscribe confirmation, ignored
        started = time.monotonic()
        assert await messages.get(0.2) is None  # nothing published: the timeout, no error
        assert 0.15 < time.monotonic() - started < 2
        # The read left waiting by that timeout gets the next message: none is lost.
        await client.publish("fleetlog:test", "one")
        message = await messages.get(5.0)
        assert message is not None and message["data"] == b"one"

        # Cancelled while it waits (many times, at and around the timeout): the caller
        # ends at once, and close() ends the read it left.
        for delay in (0.0, 0.01, 0.05, 0.1):
            task = asyncio.ensure_future(messages.get(0.05))
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 2)
        await asyncio.wait_for(messages.close(), 2)
        reads = [t for t in asyncio.all_tasks() if "get_message" in repr(t)]
        assert all(t.done() for t in reads), reads
        # Still usable after close: a new read starts with the next get.
        await client.publish("fleetlog:test", "two")
        message = await messages.get(5.0)
        assert message is not None and message["data"] == b"two"
    finally:
        await messages.close()
        await pubsub.aclose()
        await client.aclose()
