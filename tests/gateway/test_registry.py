"""LinkRegistry against a real Redis: links in order, take-overs, refusal counts, heartbeat."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis

from fleetlog import keys
from fleetlog.embedded import RedisServer
from fleetlog.gateway.registry import _MOVE_INTERVAL, LinkRegistry
from fleetlog.links import is_online, parse_link
from fleetlog.queue.connection import connect_async


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
async def registries(redis_url: str) -> AsyncIterator[Callable[..., LinkRegistry]]:
    """Started registries (each with its own client and control messages), closed at the end."""
    made: list[tuple[LinkRegistry, Any]] = []

    def make(node_id: str, *, take_over: bool = True, control: list[dict[str, Any]] | None = None,
             redis_url: str = redis_url) -> LinkRegistry:
        async_client = connect_async(redis_url, timeout=5.0)
        registry = LinkRegistry(async_client, node_id=node_id, heartbeat_ttl=1.5,
                                info={"host": "127.0.0.1", "port": 1}, take_over=take_over)
        registry.start((control if control is not None else []).append)
        made.append((registry, async_client))
        return registry

    yield make
    for registry, async_client in made:
        await registry.close()
        await async_client.aclose()


def link_of(client: redis.Redis, device: str) -> dict[str, Any] | None:
    raw = client.hget(keys.DEVICE_LINKS, device)
    return None if raw is None else parse_link(raw)


async def test_links_are_written_in_order(client: redis.Redis, registries: Any) -> None:
    registry = registries("node-a")
    for n in range(50):  # a quick connect/disconnect storm: the last word wins, in order
        registry.link("door:1", f"node-a/{n}")
        registry.unlink("door:1", f"node-a/{n}")
    registry.link("door:1", "node-a/final")
    await eventually(lambda: (link_of(client, "door:1") or {}).get("conn") == "node-a/final")
    link = link_of(client, "door:1")
    assert link is not None
    assert link["node"] == "node-a"
    assert link["since"].endswith("Z")


async def test_an_old_connection_never_unlinks_a_newer_one(client: redis.Redis, registries: Any) -> None:
    registry = registries("node-a")
    registry.link("kiosk", "node-a/1")
    registry.link("kiosk", "node-a/2")  # reconnected
    registry.unlink("kiosk", "node-a/1")  # the old connection's goodbye arrives late
    await asyncio.sleep(0.3)
    await eventually(lambda: link_of(client, "kiosk") is not None)
    assert (link_of(client, "kiosk") or {}).get("conn") == "node-a/2"
    registry.unlink("kiosk", "node-a/2")
    await eventually(lambda: link_of(client, "kiosk") is None)


async def test_a_link_on_another_node_tells_the_old_node_to_close(
    client: redis.Redis, registries: Any
) -> None:
    told: list[dict[str, Any]] = []
    old = registries("node-old", control=told)
    new = registries("node-new")
    await asyncio.sleep(0.3)  # both subscribed to their control channels
    old.link("meter", "node-old/7")
    await eventually(lambda: link_of(client, "meter") is not None)
    new.link("meter", "node-new/1")
    await eventually(lambda: bool(told))
    assert told == [{"op": "takeover", "device": "meter", "conn": "node-old/7"}]
    assert (link_of(client, "meter") or {})["node"] == "node-new"


async def test_no_take_over_without_authentication(client: redis.Redis, registries: Any) -> None:
    told: list[dict[str, Any]] = []
    registries("node-old", control=told).link("legacy", "node-old/1")
    await eventually(lambda: link_of(client, "legacy") is not None)
    registries("node-new", take_over=False).link("legacy", "node-new/1")
    await eventually(lambda: (link_of(client, "legacy") or {}).get("node") == "node-new")
    await asyncio.sleep(0.3)
    assert told == [], "auth none: a claim of a device id closes nothing elsewhere"


def link_scripts_run(client: redis.Redis) -> int:
    """How many link updates (``EVAL`` of LINK or UNLINK) the server ran since it started."""
    return int(client.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))


async def test_a_link_that_moves_on_every_frame_is_written_once_per_interval(
    client: redis.Redis, registries: Any
) -> None:
    """--auth none: two connections of one id take its link in turn, frame after frame."""
    registry = registries("node-a")
    await asyncio.sleep(0.1)
    client.config_resetstat()
    for frame in range(1000):  # one loop turn: the writer has not run yet
        registry.link("gate:1/a", f"node-a/{frame % 2}")
    assert registry.pending == 1
    await eventually(lambda: (link_of(client, "gate:1/a") or {}).get("conn") == "node-a/1")
    assert link_scripts_run(client) == 1, "one write for the last word, not 1,000"
    started = time.monotonic()
    for frame in range(300):  # moves between two live connections, a frame a millisecond
        registry.move("gate:1/a", f"node-a/{frame % 2}")
        await asyncio.sleep(0.001)
    registry.move("gate:1/a", "node-a/last")
    took = time.monotonic() - started
    await eventually(lambda: (link_of(client, "gate:1/a") or {}).get("conn") == "node-a/last")
    assert registry.pending == 0
    moves_written = link_scripts_run(client) - 1
    assert 1 <= moves_written <= took / _MOVE_INTERVAL + 2, (took, moves_written)


async def test_a_waiting_move_goes_before_what_comes_after_it(client: redis.Redis, registries: Any) -> None:
    registry = registries("node-a")
    registry.link("kiosk/9", "node-a/1")
    await eventually(lambda: link_of(client, "kiosk/9") is not None)
    registry.move("kiosk/9", "node-a/2")  # within the interval of the link: it waits
    assert registry.pending == 1
    registry.unlink("kiosk/9", "node-a/2")  # then that connection closed: it goes after the move
    await eventually(lambda: registry.pending == 0)
    await eventually(lambda: link_of(client, "kiosk/9") is None)
    registry.move("kiosk/9", "node-a/3")  # long after any write of it: at once, not waiting
    assert registry.pending == 1
    await eventually(lambda: (link_of(client, "kiosk/9") or {}).get("conn") == "node-a/3", timeout=1)


async def test_a_move_never_replaces_a_link_another_node_wrote_since(
    client: redis.Redis, registries: Any
) -> None:
    """A move comes from two connections of this node; a link another node wrote since is
    the device's newer connection: it stays, even when the move waited out its interval."""
    a, b = registries("node-a", take_over=False), registries("node-b", take_over=False)
    a.link("pump/1", "node-a/1")
    await eventually(lambda: (link_of(client, "pump/1") or {}).get("node") == "node-a")
    b.link("pump/1", "node-b/1")  # the device connected to node B meanwhile
    a.move("pump/1", "node-a/2")  # within the interval of A's link: it waits, then finds B's
    await eventually(lambda: a.pending == 0 and b.pending == 0)
    await asyncio.sleep(0.2)  # the move's write, had it been made, would be done by now
    assert (link_of(client, "pump/1") or {}).get("conn") == "node-b/1"
    a.move("fan/2", "node-a/5")  # nothing stored: the move links
    await eventually(lambda: (link_of(client, "fan/2") or {}).get("conn") == "node-a/5")
    b.link("vent/3", "node-b/1")
    await eventually(lambda: link_of(client, "vent/3") is not None)
    a.link("vent/3", "node-a/1")  # a link not written yet, then a move: they go as one link
    a.move("vent/3", "node-a/2")
    await eventually(lambda: (link_of(client, "vent/3") or {}).get("conn") == "node-a/2")


async def test_a_node_full_of_devices_links_them_all_in_several_writes(
    client: redis.Redis, registries: Any
) -> None:
    registry = registries("node-a")
    for n in range(2500):  # more than one pipeline's worth (_LINKS_PER_WRITE)
        registry.link(f"meter-{n}", f"node-a/{n}")
    registry.unlink("meter-7", "node-a/7")
    await eventually(lambda: registry.pending == 0 and client.hlen(keys.DEVICE_LINKS) == 2499)
    assert link_of(client, "meter-7") is None
    assert (link_of(client, "meter-2499") or {}).get("conn") == "node-a/2499"


async def test_an_outage_holds_a_few_link_updates_per_device_and_writes_their_outcome(
    private_redis: RedisServer, registries: Any
) -> None:
    """While Redis is down, relinks and reconnects pile up per device, not per event; once
    it is back, each device's link is what its last update said."""
    registry = registries("node-a", redis_url=private_redis.url)
    await asyncio.sleep(0.2)
    private_redis.stop()
    devices = [f"door:{n}/x" for n in range(20)]  # the link key's and the conn id's separators
    for turn in range(300):  # relinks, two connections taking turns, reconnects
        for device in devices:
            registry.link(device, f"node-a/{device}/{turn % 2}")
            if turn % 50 == 0:
                registry.unlink(device, f"node-a/{device}/{turn % 2}")
    for n, device in enumerate(devices):
        if n % 2:  # its last connection closed
            registry.unlink(device, f"node-a/{device}/1")
            registry.unlink(device, f"node-a/{device}/1")
    registry.link("last", "node-a/last")  # queued after all of them: written last
    await asyncio.sleep(0.5)  # the writer fails meanwhile and keeps them
    assert registry.pending == len(devices) + len(devices) // 2 + 1, "at most a link and an unlink each"
    private_redis.start()
    client = redis.Redis.from_url(private_redis.url)
    await eventually(lambda: link_of(client, "last") is not None, timeout=10)
    for n, device in enumerate(devices):
        link = link_of(client, device)
        if n % 2:
            assert link is None, device
        else:
            assert link is not None and link["conn"] == f"node-a/{device}/1", device
    assert link_scripts_run(client) == len(devices) + len(devices) // 2 + 1
    assert registry.pending == 0
    client.close()


async def test_refusals_are_counted_per_device_and_reason(client: redis.Redis, registries: Any) -> None:
    registry = registries("node-a")
    for _ in range(3):
        registry.count_refusal("a:b", "rate_limited")
    registry.count_refusal("a:b", "too_large")
    registry.count_refusal(None, "unauthorized")
    await eventually(lambda: client.hget(keys.refusals("a:b"), "too_large") == b"1")
    assert client.hgetall(keys.refusals("a:b")) == {b"rate_limited": b"3", b"too_large": b"1"}
    assert client.hgetall(keys.refusals(keys.ANONYMOUS)) == {b"unauthorized": b"1"}
    assert not client.exists(keys.refusals("-")), "a device may be named '-'"
    assert not client.exists("fleetlog:refusals:a:b"), "the device id is escaped in the key"


async def test_refusals_of_many_devices_during_an_outage_stay_bounded_and_add_up(
    private_redis: RedisServer, registries: Any
) -> None:
    registry = registries("node-a", redis_url=private_redis.url)
    await asyncio.sleep(0.2)
    private_redis.stop()
    for n in range(25_000):  # with --auth none a frame may name any device
        registry.count_refusal(f"made-up:{n}", "bad_frame")
    registry.count_refusal("made-up:3", "bad_frame")  # a device already waiting keeps its own
    assert registry.pending_refusals == 10_000 + 1
    private_redis.start()
    client = redis.Redis.from_url(private_redis.url)
    await eventually(lambda: registry.pending_refusals == 0, timeout=10)
    counted = {key: int(client.hget(key, "bad_frame") or 0)
               for key in client.scan_iter(match="fleetlog:refusals:*", count=1000)}
    assert sum(counted.values()) == 25_001, "every refusal is counted"
    assert client.hget(keys.refusals("made-up:3"), "bad_frame") == b"2"
    assert client.hget(keys.refusals(keys.ANONYMOUS), "bad_frame") == b"15000"
    client.close()


async def test_heartbeat_lives_with_the_node(client: redis.Redis, redis_url: str) -> None:
    async_client = connect_async(redis_url, timeout=5.0)
    registry = LinkRegistry(async_client, node_id="node-hb", heartbeat_ttl=1.5,
                            info={"host": "127.0.0.1", "port": 9}, take_over=True)
    registry.start(lambda message: None)
    try:
        key = keys.node_heartbeat("node-hb")
        await eventually(lambda: client.exists(key) == 1)
        assert orjson.loads(client.get(key) or b"{}") == {"node": "node-hb", "host": "127.0.0.1", "port": 9}
        assert 0 < client.pttl(key) <= 1500
        assert is_online({"node": "node-hb"}, {"node-hb"})
        await asyncio.sleep(1.7)  # longer than the TTL: renewed every third of it
        assert client.exists(key) == 1
    finally:
        await registry.close()
        await async_client.aclose()
    assert client.exists(keys.node_heartbeat("node-hb")) == 0, "a clean stop removes the heartbeat"
