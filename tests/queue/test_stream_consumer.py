"""fleetlog.queue.consumer: StreamConsumer and ListConsumer against a real Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from fleetlog import keys
from fleetlog.errors import FleetlogError, QueueFull
from fleetlog.queue.connection import connect, connect_async
from fleetlog.queue.consumer import ListConsumer, StreamConsumer
from fleetlog.queue.producer import Producer
from fleetlog.records import QueuedRecord
from fleetlog.store.sqlite import SQLiteStore

STREAM = "fleetlog:records"
GROUP = "fleetlog:workers"
DEAD = "fleetlog:dead"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    made = connect(redis_url)
    yield made
    made.close()


def stream_consumer(client: redis.Redis, name: str, claim_idle: float = 30.0) -> StreamConsumer:
    consumer = StreamConsumer(
        client, stream=STREAM, group=GROUP, consumer=name, dead_letter_stream=DEAD,
        claim_idle=claim_idle, trim_interval=0,
    )
    consumer.ensure_group()
    return consumer


def add(client: redis.Redis, count: int, device: str = "D1", start: int = 0) -> list[str]:
    """XADD records in the gateway's format (fields d, r); return their ids."""
    return [
        client.xadd(STREAM, {"d": device, "r": f'{{"n":{n}}}'}).decode()
        for n in range(start, start + count)
    ]


def pending_of(client: redis.Redis) -> dict[str, str]:
    rows = client.xpending_range(STREAM, GROUP, min="-", max="+", count=1000)
    return {row["message_id"].decode(): row["consumer"].decode() for row in rows}


# -- StreamConsumer ----------------------------------------------------------------------


def test_ensure_group_is_idempotent_and_reads_from_the_start(client: redis.Redis) -> None:
    ids = add(client, 2)  # queued before any worker existed
    consumer = stream_consumer(client, "w1")
    consumer.ensure_group()
    stream_consumer(client, "w2").ensure_group()
    groups = client.xinfo_groups(STREAM)
    assert [group["name"] for group in groups] == [GROUP.encode()]
    assert [record.qid for record in consumer.fetch(10, 100)] == ids


def test_ensure_group_creates_the_stream(client: redis.Redis) -> None:
    stream_consumer(client, "w1")
    assert client.exists(STREAM)
    assert client.xlen(STREAM) == 0


def test_fetch_returns_whole_records(client: redis.Redis) -> None:
    consumer = stream_consumer(client, "w1")
    before = int(time.time() * 1000)
    entry_id = client.xadd(STREAM, {"d": "设备-7", "r": '{"msg":"门已打开","n":123456789012345678901234}'})
    after = int(time.time() * 1000)
    (record,) = consumer.fetch(10, 100)
    assert record == QueuedRecord(
        qid=entry_id.decode(),
        device_id="设备-7",
        received_at=int(entry_id.decode().split("-")[0]),
        data='{"msg":"门已打开","n":123456789012345678901234}'.encode(),
        deliveries=1,
        stream=STREAM,  # with qid, the record's identity in a store that keeps shards apart
    )
    assert before - 5 <= record.received_at <= after + 5


def test_fetch_respects_count_and_order_and_returns_empty_when_idle(client: redis.Redis) -> None:
    consumer = stream_consumer(client, "w1")
    ids = add(client, 5)
    first = consumer.fetch(3, 100)
    second = consumer.fetch(3, 100)
    assert [record.qid for record in first + second] == ids
    assert [record.data for record in first] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    started = time.monotonic()
    assert consumer.fetch(3, 100) == []
    assert time.monotonic() - started < 2, "an idle fetch waits block_ms, not forever"


def test_fetch_waits_for_a_record(client: redis.Redis, redis_url: str) -> None:
    consumer = stream_consumer(client, "w1")
    consumer.fetch(10, 10)  # the first fetch looks for stale and own pending records

    def later() -> None:
        time.sleep(0.2)
        other = connect(redis_url)
        add(other, 1)
        other.close()

    thread = threading.Thread(target=later)
    thread.start()
    records = consumer.fetch(10, 5000)
    thread.join()
    assert [record.data for record in records] == [b'{"n":0}']


def test_unacked_records_are_claimed_by_another_consumer(client: redis.Redis) -> None:
    first = stream_consumer(client, "w1", claim_idle=0.2)
    second = stream_consumer(client, "w2", claim_idle=0.2)
    ids = add(client, 3)
    taken = first.fetch(10, 100)
    assert [record.qid for record in taken] == ids
    assert second.fetch(10, 50) == [], "not idle long enough yet"
    time.sleep(0.35)

    claimed = second.fetch(10, 50)
    assert [record.qid for record in claimed] == ids
    assert [record.data for record in claimed] == [record.data for record in taken]
    assert all(record.deliveries == 2 for record in claimed)
    assert set(pending_of(client).values()) == {"w2"}

    second.ack(claimed)
    assert pending_of(client) == {}
    assert client.xlen(STREAM) == 0


def test_a_restarted_consumer_gets_its_own_pending_records_first(client: redis.Redis) -> None:
    ids = add(client, 2)
    crashed = stream_consumer(client, "w1")
    assert [record.qid for record in crashed.fetch(10, 100)] == ids
    add(client, 1, start=2)
    reborn = stream_consumer(client, "w1")
    again = reborn.fetch(10, 100)
    assert [record.qid for record in again] == ids
    assert [record.deliveries for record in again] == [2, 2]
    assert [record.data for record in reborn.fetch(10, 100)] == [b'{"n":2}']


def test_trim_never_removes_unacknowledged_entries(client: redis.Redis) -> None:
    consumer = stream_consumer(client, "w1")
    ids = add(client, 250)
    records = consumer.fetch(250, 100)
    held = records[120]
    consumer.ack([record for record in records if record is not held])
    consumer.trim()
    remaining = [entry_id.decode() for entry_id, _ in client.xrange(STREAM)]
    assert remaining[-130:] == ids[120:], "the pending entry and everything after it stay"
    assert client.xlen(STREAM) < 250, "acknowledged entries before it go"
    assert list(pending_of(client)) == [held.qid]

    add(client, 5, start=250)  # not delivered to anyone yet
    consumer.ack([held])
    consumer.trim()
    assert [fields[b"r"] for _, fields in client.xrange(STREAM)][-5:] == [
        f'{{"n":{n}}}'.encode() for n in range(250, 255)
    ], "undelivered entries stay"
    assert pending_of(client) == {}


def test_ack_and_trim_remove_exactly_the_acknowledged_entries(client: redis.Redis) -> None:
    consumer = stream_consumer(client, "w1")
    add(client, 6)
    records = consumer.fetch(6, 100)
    consumer.ack(records[:2])
    assert client.xlen(STREAM) == 4
    consumer.ack([records[3]])  # out of order: 2 is still pending
    assert [entry_id.decode() for entry_id, _ in client.xrange(STREAM)] == [r.qid for r in records[2:]]
    consumer.ack([records[2], *records[4:]])
    assert client.xlen(STREAM) == 0


async def test_a_drained_queue_takes_records_again(redis_url: str, client: redis.Redis) -> None:
    producer = Producer(connect_async(redis_url), mode="stream", stream=STREAM, max_backlog=5)
    producer.start()
    consumer = stream_consumer(client, "w1")
    try:
        for n in range(5):
            assert not isinstance(await produce(producer, f'{{"n":{n}}}'.encode()), FleetlogError)
        assert isinstance(await produce(producer, b'{"n":5}'), QueueFull)
        consumer.ack(consumer.fetch(10, 100))  # the worker stored all five
        consumer.trim()
        assert not isinstance(await produce(producer, b'{"n":5}'), FleetlogError)
    finally:
        await producer.close()


async def produce(producer: Producer, record: bytes) -> object:
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    producer.submit("D1", [record], future.set_result)
    return await asyncio.wait_for(future, 10)


def test_trim_waits_for_every_group(client: redis.Redis) -> None:
    consumer = stream_consumer(client, "w1")
    add(client, 250)
    client.xgroup_create(STREAM, "archiver", id="0")
    consumer.ack(consumer.fetch(250, 100))
    assert consumer.trim() == 0
    assert client.xlen(STREAM) == 250, "another group has not read them"


def xtrim_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_xtrim", {"calls": 0})
    return int(stats["calls"])


def test_ack_trims_at_most_every_trim_interval(client: redis.Redis) -> None:
    consumer = StreamConsumer(
        client, stream=STREAM, group=GROUP, consumer="w1", dead_letter_stream=DEAD,
        claim_idle=30, trim_interval=60,
    )
    consumer.ensure_group()
    add(client, 4)
    records = consumer.fetch(10, 100)
    before = xtrim_calls(client)
    consumer.ack(records[:2])
    assert xtrim_calls(client) == before + 1, "the first ack trims"
    consumer.ack(records[2:])
    assert xtrim_calls(client) == before + 1, "the next one waits for the interval"
    assert pending_of(client) == {}, "but it acknowledges at once"


def test_dead_letter_moves_the_record_and_acks_it(client: redis.Redis) -> None:
    consumer = stream_consumer(client, "w1")
    add(client, 2)
    bad, good = consumer.fetch(10, 100)
    consumer.dead_letter(bad, "store rejected it: " + "x" * 5000)
    assert list(pending_of(client)) == [good.qid]
    ((_, fields),) = client.xrange(DEAD)
    assert fields[b"qid"].decode() == bad.qid
    assert fields[b"d"] == b"D1"
    assert fields[b"r"] == b'{"n":0}'
    assert fields[b"error"].startswith(b"store rejected it: ")
    assert len(fields[b"error"]) == 2000
    assert int(fields[b"deliveries"]) == 1
    assert abs(int(fields[b"failed_at"]) - time.time() * 1000) < 10_000


# -- ListConsumer (the original design's device:log:list) ----------------------------------


def list_consumer(client: redis.Redis, claim_idle: float = 30.0) -> ListConsumer:
    return ListConsumer(client, dead_letter_stream=DEAD, claim_idle=claim_idle)


def push(client: redis.Redis, *records: bytes) -> None:
    for record in records:
        client.lpush(keys.LEGACY_LIST, record)  # one by one, as the original gateway did


def list_state(client: redis.Redis) -> tuple[list[bytes], int, int]:
    """Processing lists, batches in flight, delivery counters."""
    return (
        sorted(client.keys("fleetlog:list:processing:*")),
        client.zcard(keys.LEGACY_INFLIGHT),
        client.hlen(keys.LEGACY_DELIVERIES),
    )


def test_list_records_come_out_oldest_first(client: redis.Redis) -> None:
    records = [f'{{"deviceId":"D1","n":{n}}}'.encode() for n in range(5)]
    push(client, *records)
    consumer = list_consumer(client)
    first = consumer.fetch(2, 100)
    rest = consumer.fetch(10, 100)
    assert [record.data for record in first + rest] == records
    assert [record.qid.split("-")[1] for record in first] == ["0", "1"]
    assert len({record.qid for record in first + rest}) == 5
    assert {record.device_id for record in first + rest} == {"D1"}
    assert all(record.deliveries == 1 for record in first + rest)
    assert client.llen(keys.LEGACY_LIST) == 0


def test_list_ids_are_not_handed_out_again_after_redis_lost_its_data(
        client: redis.Redis, tmp_path: Path) -> None:
    """A Redis without persistence restarts empty (or a snapshot is restored, or FLUSHALL):
    the batches' counter must not start again at 1, or the store, which keeps a qid
    once, would drop the new records as already stored."""
    store = SQLiteStore(tmp_path / "fleetlog.db")
    try:
        for round_ in range(2):
            consumer = list_consumer(client)
            for n in range(5):
                push(client, f'{{"deviceId":"D1","round":{round_},"n":{n}}}'.encode())
                records = consumer.fetch(10, 100)
                assert store.write_batch(records) == len(records) == 1
                consumer.ack(records)
            client.flushdb()  # Redis comes back empty
        assert len(store.after(0, 100)) == 10
    finally:
        store.close()


def test_list_device_id_comes_from_the_record(client: redis.Redis) -> None:
    push(client, b'{"deviceId":42,"x":1}', b'{"x":1}', b'"text"', b"not json at all")
    records = list_consumer(client).fetch(10, 100)
    assert [record.device_id for record in records] == ["42", "unknown", "unknown", "unknown"]
    assert records[-1].data == b"not json at all", "bytes are passed on as they are"


def test_a_list_record_naming_no_valid_device_is_filed_under_unknown_whole(
        client: redis.Redis, tmp_path: Path) -> None:
    """A 4,000-character deviceId in a record (the gateway pushes list records as sent) became
    a row's device id: PostgreSQL's index refused it and the worker retried for good."""
    pushed = [orjson.dumps({"deviceId": "d" * 4000, "msg": "long"}),
              b'{"deviceId":"door\\u00001","msg":"nul"}', b'{"deviceId":"D1","msg":"ok"}']
    push(client, *pushed)
    records = list_consumer(client).fetch(10, 100)
    assert [record.device_id for record in records] == ["unknown", "unknown", "D1"]
    assert [record.data for record in records] == pushed  # the record whole, its deviceId in it
    store = SQLiteStore(tmp_path / "fleetlog.db")
    try:
        assert store.write_batch(records) == 3
        assert [r.device_id for r in store.after(0, 10)] == ["unknown", "unknown", "D1"]
    finally:
        store.close()


def test_list_fetch_returns_empty_when_idle(client: redis.Redis) -> None:
    consumer = list_consumer(client)
    started = time.monotonic()
    assert consumer.fetch(10, 100) == []
    assert time.monotonic() - started < 2
    assert list_state(client) == ([], 0, 0), "an empty batch leaves nothing behind"


def test_list_ack_removes_the_processing_list(client: redis.Redis) -> None:
    push(client, b'{"n":0}', b'{"n":1}', b'{"n":2}')
    consumer = list_consumer(client)
    records = consumer.fetch(10, 100)
    processing, inflight, _ = list_state(client)
    assert len(processing) == 1
    assert inflight == 1
    assert client.llen(processing[0]) == 3

    consumer.ack(records[:2])
    assert list_state(client)[0] == processing, "the batch stays until every record is acked"
    consumer.ack(records[2:])
    assert list_state(client) == ([], 0, 0)


def test_list_batch_not_acked_is_replayed_by_another_consumer(client: redis.Redis) -> None:
    records = [f'{{"deviceId":"D1","n":{n}}}'.encode() for n in range(3)]
    push(client, *records)
    crashed = list_consumer(client, claim_idle=0.2)
    taken = crashed.fetch(10, 100)
    survivor = list_consumer(client, claim_idle=0.2)
    assert survivor.fetch(10, 50) == [], "not stale yet, and the list is empty"
    push(client, b'{"deviceId":"D1","n":3}')
    time.sleep(0.35)

    replayed = survivor.fetch(10, 50)
    assert [record.qid for record in replayed] == [record.qid for record in taken], "same ids: idempotent"
    assert [record.data for record in replayed] == records
    assert all(record.deliveries == 2 for record in replayed)
    survivor.ack(replayed)
    assert [record.data for record in survivor.fetch(10, 50)] == [b'{"deviceId":"D1","n":3}']
    assert client.llen(keys.LEGACY_LIST) == 0


def test_list_dead_letter(client: redis.Redis) -> None:
    push(client, b"{broken")
    consumer = list_consumer(client)
    (record,) = consumer.fetch(10, 100)
    consumer.dead_letter(record, "not JSON")
    consumer.ack([record])
    ((_, fields),) = client.xrange(DEAD)
    assert (fields[b"qid"].decode(), fields[b"r"], fields[b"error"]) == (record.qid, b"{broken", b"not JSON")
    assert list_state(client) == ([], 0, 0)


def test_list_record_taken_by_a_long_blocking_fetch_is_not_stranded(
    client: redis.Redis, redis_url: str
) -> None:
    """A fetch never blocks for as long as others may take its batch for stale."""
    blocking_client = connect(redis_url)
    waiter = list_consumer(blocking_client, claim_idle=0.2)
    started = time.monotonic()
    try:
        assert waiter.fetch(10, 2000) == []
    finally:
        blocking_client.close()
    assert time.monotonic() - started < 0.2, "blocked at most claim_idle / 2"
    push(client, b'{"deviceId":"D1","n":0}')
    taken = list_consumer(client, claim_idle=0.2).fetch(10, 100)
    assert [record.data for record in taken] == [b'{"deviceId":"D1","n":0}']
    # That consumer dies here without acking.  Someone must get the record again.
    time.sleep(0.35)
    replayed = list_consumer(client, claim_idle=0.2).fetch(10, 100)
    assert [record.data for record in replayed] == [b'{"deviceId":"D1","n":0}']
