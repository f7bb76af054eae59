"""One worker at a time per queue (fleetlog.queue.lease): standbys, take-overs, a stalled holder.

Real Redis, a real SQLite store; the consumers are driven by hand, so that a holder can be
"stalled" past its lease at an exact point and commit afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from fleetlog import keys
from fleetlog.embedded import RedisServer
from fleetlog.queue.connection import connect
from fleetlog.queue.consumer import ListConsumer
from fleetlog.queue.lease import Lease, LeasedListConsumer
from fleetlog.queue.shards import ShardedConsumer
from fleetlog.records import QueuedRecord
from fleetlog.store.sqlite import SQLiteStore

STREAM = "fleetlog:records"
GROUP = "fleetlog:workers"
DEAD = "fleetlog:dead"
LEASE = 0.6


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    made = connect(redis_url)
    yield made
    made.close()


def one_stream(client: redis.Redis, name: str) -> ShardedConsumer:
    """What ``_drain`` builds for the default ``--shards 1``."""
    return ShardedConsumer(client, stream=STREAM, shards=1, group=GROUP, consumer=name,
                           dead_letter_stream=DEAD, claim_idle=30, lease=LEASE)


def one_list(client: redis.Redis, name: str) -> LeasedListConsumer:
    """What ``_drain`` builds for ``--queue list``."""
    return LeasedListConsumer(client, ListConsumer(client, dead_letter_stream=DEAD, claim_idle=30),
                              holder=name, lease=LEASE)


def seqs(records: list[QueuedRecord]) -> list[int]:
    return [orjson.loads(record.data)["seq"] for record in records]


def stored_seqs(store: SQLiteStore) -> list[int]:
    return [orjson.loads(record.data)["seq"] for record in store.after(0, 1000)]


def test_one_stream_is_drained_by_its_lease_holder_and_a_stalled_one_reorders_nothing(
        client: redis.Redis, tmp_path: Path) -> None:
    for seq in range(10):
        client.xadd(STREAM, {"d": "dev", "r": orjson.dumps({"seq": seq})})
    first, second = one_stream(client, "w1"), one_stream(client, "w2")
    stalled = first.fetch(4, None)
    assert seqs(stalled) == [0, 1, 2, 3]
    assert all(":" not in record.qid for record in stalled), "one stream: the qids as always"
    assert client.get(keys.shard_lease(STREAM, 0, 1)) == b"w1"  # fleetlog:records:lease
    assert second.fetch(10, 50) == [], "a standby reads nothing"

    time.sleep(LEASE + 0.2)  # w1 stalls (a long store retry) past its lease
    store = SQLiteStore(tmp_path / "fleetlog.db")
    try:
        taken = second.fetch(10, None)  # takes the stream over: w1's pending entries first
        assert client.get(keys.shard_lease(STREAM, 0, 1)) == b"w2"
        assert seqs(taken) == [0, 1, 2, 3]
        store.write_batch(taken)
        second.ack(taken)
        newer = second.fetch(10, None)
        assert seqs(newer) == [4, 5, 6, 7, 8, 9]
        store.write_batch(newer)
        second.ack(newer)
        # w1 wakes and commits what it held: all stored already, nothing lands after 9.
        assert store.write_batch(stalled) == 0
        first.ack(stalled)
        assert stored_seqs(store) == list(range(10))
        assert first.fetch(10, None) == [] and not first.held, "w1 found its lease gone"
    finally:
        store.close()
    first.close()
    second.close()
    assert client.get(keys.shard_lease(STREAM, 0, 1)) is None, "given back on the way out"


def test_a_restart_under_the_same_name_takes_its_lease_back_at_once(client: redis.Redis) -> None:
    client.xadd(STREAM, {"d": "dev", "r": b'{"seq":0}'})
    assert seqs(one_stream(client, "w1").fetch(10, None)) == [0]  # then killed: no ack, no release
    assert one_stream(client, "w2").fetch(10, None) == [], "another name waits for the lease"
    again = one_stream(client, "w1")
    assert seqs(again.fetch(10, None)) == [0], "same name: at once, its pending entry first"


def test_the_legacy_list_is_drained_by_its_lease_holder_in_order_after_a_take_over(
        client: redis.Redis, tmp_path: Path) -> None:
    for seq in range(10):
        client.lpush(keys.LEGACY_LIST, orjson.dumps({"deviceId": "dev", "seq": seq}))
    first, second = one_list(client, "w1"), one_list(client, "w2")
    batch_a = first.fetch(3, 0)
    batch_b = first.fetch(3, 0)  # two batches in flight, neither stored
    assert (seqs(batch_a), seqs(batch_b)) == ([0, 1, 2], [3, 4, 5])
    assert client.get(keys.LEGACY_LEASE) == b"w1"
    assert second.fetch(10, 50) == [], "a standby takes nothing"
    client.zadd(keys.LEGACY_INFLIGHT, {"999": int(time.time() * 1000)})  # empty, just opened

    time.sleep(LEASE + 0.2)
    store = SQLiteStore(tmp_path / "fleetlog.db")
    try:
        replayed = [second.fetch(10, 0), second.fetch(10, 0)]
        assert client.get(keys.LEGACY_LEASE) == b"w2"
        assert [seqs(batch) for batch in replayed] == [[0, 1, 2], [3, 4, 5]], "in the order taken"
        for old, again in zip((batch_a, batch_b), replayed, strict=True):
            # The same records to the store: same qids, same received_at (PostgreSQL's key).
            assert [(r.qid, r.received_at) for r in again] == [(r.qid, r.received_at) for r in old]
            assert all(r.deliveries == 2 for r in again)
        for batch in replayed:
            store.write_batch(batch)
            second.ack(batch)
        newer = second.fetch(10, 0)
        assert seqs(newer) == [6, 7, 8, 9]
        store.write_batch(newer)
        second.ack(newer)
        assert store.write_batch(batch_a) == 0, "the stalled holder's batch is stored already"
        first.ack(batch_a)
        assert stored_seqs(store) == list(range(10))
        assert first.fetch(10, 0) == [] and not first.held
    finally:
        store.close()
    assert client.zscore(keys.LEGACY_INFLIGHT, "999") is not None, (
        "an empty batch opened just now is left to its taker, not forgotten")
    second.close()
    assert client.get(keys.LEGACY_LEASE) is None


def test_a_lease_is_taken_and_renewed_while_redis_refuses_writes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = connect(server.url)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("anything", "x")
        mine, theirs = Lease(client, "q:lease", "w1", 5), Lease(client, "q:lease", "w2", 5)
        assert mine.acquire(), "draining is what frees memory: the lease is taken anyway"
        assert mine.renew() and mine.acquire()
        assert not theirs.acquire() and not theirs.renew()
        mine.release()
        assert theirs.acquire()
    finally:
        client.config_set("maxmemory", "0")
        client.close()
        server.stop()
