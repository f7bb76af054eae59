"""fleetlog.queue.producer.Producer against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal

import pytest
import redis

from fleetlog import keys
from fleetlog.embedded import RedisServer, free_port
from fleetlog.errors import FleetlogError, QueueClosed, QueueFull, QueueUnavailable
from fleetlog.queue import scripts
from fleetlog.queue.connection import connect_async
from fleetlog.queue.consumer import StreamConsumer
from fleetlog.queue.producer import _MAX_CALL_BYTES, IngestResult, Producer
from fleetlog.queue.script_runner import RedisAppend, ScriptRunner
from tests.helpers import queued

STREAM = "fleetlog:records"


Outcome = IngestResult | FleetlogError

#: What a plain submission (no frame id, no seqs) is answered with once queued.
QUEUED = IngestResult()


class Outcomes:
    """Collects every callback a producer makes, one future per submission."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[Outcome]] = []
        self.calls = 0

    def callback(self) -> Callable[[Outcome], None]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.futures.append(future)

        def done(outcome: Outcome) -> None:
            self.calls += 1
            future.set_result(outcome)  # a second call would raise InvalidStateError

        return done

    async def results(self) -> list[Outcome]:
        return list(await asyncio.wait_for(asyncio.gather(*self.futures), timeout=10))


async def make_producer(
    url: str, mode: Literal["stream", "list"] = "stream", max_backlog: int = 1_000_000, timeout: float = 5.0
) -> Producer:
    client = connect_async(url, timeout=timeout)
    producer = Producer(client, mode=mode, stream=STREAM, max_backlog=max_backlog)
    producer.start()
    return producer


async def submit(
    producer: Producer, device: str, records: Sequence[bytes], frame_id: str | None = None,
    seqs: Sequence[int | None] | None = None,
) -> Outcome:
    outcomes = Outcomes()
    producer.submit(device, records, outcomes.callback(), frame_id=frame_id, seqs=seqs)
    (result,) = await outcomes.results()
    return result


@pytest.fixture
def sync_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
async def producer(redis_url: str) -> AsyncIterator[Producer]:
    made = await make_producer(redis_url)
    yield made
    await made.close()


def stream_entries(client: redis.Redis) -> list[tuple[bytes, bytes]]:
    return queued(client, STREAM)


async def test_submissions_are_queued_in_order_with_one_callback_each(
    producer: Producer, sync_client: redis.Redis
) -> None:
    outcomes = Outcomes()
    expected = []
    for n in range(200):
        device = f"D{n % 3}"
        record = f'{{"n":{n},"msg":"门 {n}"}}'.encode()
        producer.submit(device, [record], outcomes.callback())
        expected.append((device.encode(), record))
    assert await outcomes.results() == [QUEUED] * 200
    assert outcomes.calls == 200
    assert stream_entries(sync_client) == expected
    assert producer.calls == 1, "submissions of one loop turn go out in one Redis call"


async def test_one_submission_of_several_records_has_one_callback(
    producer: Producer, sync_client: redis.Redis
) -> None:
    outcomes = Outcomes()
    producer.submit("A", [b"1", b"2", b"3"], outcomes.callback())
    producer.submit("C", [b"4"], outcomes.callback())
    assert await outcomes.results() == [QUEUED, QUEUED]
    assert outcomes.calls == 2
    assert stream_entries(sync_client) == [(b"A", b"1"), (b"A", b"2"), (b"A", b"3"), (b"C", b"4")]


async def test_order_holds_across_many_calls(producer: Producer, sync_client: redis.Redis) -> None:
    outcomes = Outcomes()
    for n in range(3000):  # more than one Lua call's worth, over several loop turns
        producer.submit("D", [str(n).encode()], outcomes.callback())
        if n % 500 == 0:
            await asyncio.sleep(0)
    assert await outcomes.results() == [QUEUED] * 3000
    assert [int(record) for _, record in stream_entries(sync_client)] == list(range(3000))
    assert producer.calls >= 2


async def test_a_second_call_waits_for_enough_records(
    producer: Producer, sync_client: redis.Redis
) -> None:
    """While one call is in flight, a few records wait for it rather than make a small call."""
    outcomes = Outcomes()
    sync_client.client_pause(2000, all=False)  # writes wait: the first call stays in flight
    try:
        producer.submit("A", [b"a"], outcomes.callback())
        await asyncio.sleep(0.05)
        assert producer.calls == 1
        for device in "BCDEF":  # one loop turn each: each could have been a call of its own
            producer.submit(device, [device.encode()], outcomes.callback())
            await asyncio.sleep(0.01)
        assert producer.calls == 1, "a handful of records does not make a second call"
        producer.submit("G", [b"g"] * 150, outcomes.callback())
        await asyncio.sleep(0.05)
        assert producer.calls == 2, "enough records make a second call at once"
    finally:
        sync_client.execute_command("CLIENT", "UNPAUSE")
    assert await outcomes.results() == [QUEUED] * 7
    assert producer.calls == 2
    entries = stream_entries(sync_client)
    assert sorted(entries) == sorted([(b"A", b"a"), *((d.encode(), d.encode()) for d in "BCDEF"),
                                      *[(b"G", b"g")] * 150])


async def test_callback_comes_only_after_redis_has_the_record(
    producer: Producer, sync_client: redis.Redis
) -> None:
    seen: list[int] = []
    finished = asyncio.Event()

    def done(outcome: Outcome) -> None:
        seen.append(len(queued(sync_client, STREAM)))
        finished.set()

    producer.submit("D", [b'{"x":1}'], done)
    await asyncio.wait_for(finished.wait(), 10)
    assert seen == [1]


async def test_queue_full_at_max_backlog(redis_url: str, sync_client: redis.Redis) -> None:
    producer = await make_producer(redis_url, max_backlog=3)
    try:
        for n in range(3):
            assert await submit(producer, "D", [str(n).encode()]) == QUEUED
        outcome = await submit(producer, "D", [b"3"])
        assert isinstance(outcome, QueueFull)
        assert "3" in str(outcome)
        assert len(queued(sync_client, STREAM)) == 3, "nothing of a refused submission is queued"
        worker = StreamConsumer(sync_client, stream=STREAM, group="g", consumer="w",
                                dead_letter_stream="dead", claim_idle=30)
        worker.ensure_group()
        first = worker.fetch(1, None)
        assert [record.data for record in first] == [b"0"]
        worker.ack(first)  # a worker caught up with one record
        assert await submit(producer, "D", [b"4"]) == QUEUED
        assert [record for _, record in stream_entries(sync_client)] == [b"1", b"2", b"4"]
    finally:
        await producer.close()


async def test_queue_unavailable_when_redis_is_unreachable() -> None:
    producer = await make_producer(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    try:
        outcomes = Outcomes()
        producer.submit("D", [b"1"], outcomes.callback())
        producer.submit("E", [b"2"], outcomes.callback())
        results = await outcomes.results()
        assert all(isinstance(result, QueueUnavailable) for result in results), results
        assert outcomes.calls == 2
    finally:
        await producer.close()


async def test_redis_going_away_and_coming_back(private_redis: RedisServer) -> None:
    producer = await make_producer(private_redis.url, timeout=1.0)
    try:
        assert await submit(producer, "D", [b"before"]) == QUEUED
        private_redis.stop()
        assert isinstance(await submit(producer, "D", [b"lost"]), QueueUnavailable)
        private_redis.start()
        outcome: Outcome | None = None
        for _ in range(20):  # the first call after the restart may still see the dead socket
            outcome = await submit(producer, "D", [b"after"])
            if outcome == QUEUED:
                break
            await asyncio.sleep(0.1)
        assert outcome == QUEUED
    finally:
        await producer.close()
    client = redis.Redis.from_url(private_redis.url)
    records = [record for _, record in queued(client, STREAM)]
    client.close()
    assert records[0] == b"before", "the AOF kept what was acknowledged"
    assert b"lost" not in records
    assert records[-1] == b"after"


async def test_close_flushes_what_is_pending(redis_url: str, sync_client: redis.Redis) -> None:
    producer = await make_producer(redis_url)
    outcomes = Outcomes()
    for n in range(10):
        producer.submit("D", [str(n).encode()], outcomes.callback())
    await asyncio.wait_for(producer.close(), 10)
    assert all(future.done() and future.result() == QUEUED for future in outcomes.futures)
    assert len(queued(sync_client, STREAM)) == 10


async def test_submit_after_close_raises_and_queues_nothing(
    redis_url: str, sync_client: redis.Redis
) -> None:
    """Once closing, the producer refuses loudly: a callback nobody would call is a frame
    nobody would answer."""
    producer = await make_producer(redis_url)
    outcomes = Outcomes()
    producer.submit("D", [b"before"], outcomes.callback())
    closing = asyncio.ensure_future(producer.close())
    await asyncio.sleep(0)  # close() has started; the pending submission is still in flight
    refused = Outcomes()
    with pytest.raises(QueueClosed):
        producer.submit("D", [b"while closing"], refused.callback())
    await asyncio.wait_for(closing, 10)
    with pytest.raises(QueueClosed) as info:
        producer.submit("D", [b"after"], refused.callback())
    assert isinstance(info.value, QueueUnavailable), "answered as unavailable: send it again later"
    assert await outcomes.results() == [QUEUED], "what came before close() is flushed and answered"
    assert not refused.futures[0].done() and not refused.futures[1].done()
    assert stream_entries(sync_client) == [(b"D", b"before")]


async def test_any_database_in_the_url(redis_url: str) -> None:
    url_15 = redis_url.rsplit("/", 1)[0] + "/15"
    producer = await make_producer(url_15)
    try:
        assert await submit(producer, "D", [b"in db 15"]) == QUEUED
    finally:
        await producer.close()
    db0, db15 = redis.Redis.from_url(redis_url), redis.Redis.from_url(url_15)
    assert db0.xlen(STREAM) == 0
    assert db15.xlen(STREAM) == 1
    db0.close()
    db15.close()


# -- list mode (the original design's write) ---------------------------------------------


async def test_list_mode_lpushes_the_record_json_exactly(redis_url: str, sync_client: redis.Redis) -> None:
    producer = await make_producer(redis_url, mode="list")
    records = [b'{"deviceId":"D1","n":0}', '{"msg":"设备日誌"}'.encode(), b"0", b'"text"']
    try:
        outcomes = Outcomes()
        for record in records:
            producer.submit("D1", [record], outcomes.callback())
        assert await outcomes.results() == [QUEUED] * 4
    finally:
        await producer.close()
    assert sync_client.lrange(keys.LEGACY_LIST, 0, -1) == records[::-1], "LPUSH: newest first"
    assert not sync_client.exists(STREAM)


async def test_list_mode_queue_full(redis_url: str, sync_client: redis.Redis) -> None:
    producer = await make_producer(redis_url, mode="list", max_backlog=2)
    try:
        assert await submit(producer, "D", [b"1", b"2"]) == QUEUED
        assert isinstance(await submit(producer, "D", [b"3"]), QueueFull)
    finally:
        await producer.close()
    assert sync_client.lrange(keys.LEGACY_LIST, 0, -1) == [b"2", b"1"]


async def test_a_frame_id_is_queued_once(producer: Producer, sync_client: redis.Redis) -> None:
    assert await submit(producer, "D", [b"1", b"2"], frame_id="m-1") == QUEUED
    again = await submit(producer, "D", [b"1", b"2"], frame_id="m-1")
    assert isinstance(again, IngestResult)
    assert again.duplicate_frame
    assert await submit(producer, "E", [b"3"], frame_id="m-1") == QUEUED, "frame ids are per device"
    assert stream_entries(sync_client) == [(b"D", b"1"), (b"D", b"2"), (b"E", b"3")]


# -- packed entries -------------------------------------------------------------------------


async def test_one_call_is_one_packed_entry(redis_url: str, sync_client: redis.Redis) -> None:
    """Legacy submissions of several devices and v2 frames in one loop turn: one stream entry
    holding every record, in order, each with its device; the backlog counts the records."""
    producer = await make_producer(redis_url)
    try:
        outcomes = Outcomes()
        producer.submit("A", [b'{"a":1}'], outcomes.callback())
        producer.submit("A", [b'{"a":2}'], outcomes.callback())
        producer.submit("B", [b'{"b":1}'], outcomes.callback())
        producer.submit("C", [b'{"seq":1}', b'{"seq":2}'], outcomes.callback(), seqs=[1, 2],
                        session="s", frame_id="f1")
        producer.submit("", [b'{"none":1}'], outcomes.callback())
        results = await outcomes.results()
        assert results[:3] + results[4:] == [QUEUED] * 4
        assert results[3] == IngestResult(stored_through=2)
    finally:
        await producer.close()
    assert producer.calls == 1
    assert sync_client.xlen(STREAM) == 1, "one entry for the whole call"
    assert stream_entries(sync_client) == [
        (b"A", b'{"a":1}'), (b"A", b'{"a":2}'), (b"B", b'{"b":1}'), (b"C", b'{"seq":1}'),
        (b"C", b'{"seq":2}'), (b"", b'{"none":1}')]
    assert int(sync_client.get(keys.queue_backlog(STREAM)) or 0) == 6


async def test_a_call_is_bounded_in_bytes_too(redis_url: str, sync_client: redis.Redis) -> None:
    """Records of 1 MiB from 20 devices in one loop turn: calls (stream entries) of at most
    ``_MAX_CALL_BYTES`` each, every record queued once and in order; one record over the
    bound still goes, alone."""
    big = 1024 * 1024
    producer = await make_producer(redis_url)
    try:
        outcomes = Outcomes()
        for n in range(20):
            producer.submit(f"D{n}", [b'"' + bytes([97 + n]) * big + b'"'], outcomes.callback())
        producer.submit("huge", [b'"' + b"z" * (_MAX_CALL_BYTES + 10) + b'"'], outcomes.callback())
        assert await outcomes.results() == [QUEUED] * 21
    finally:
        await producer.close()
    entries = sync_client.xrange(STREAM)
    sizes = [len(fields[b"r"]) for _, fields in entries]
    assert len(entries) >= 4 and max(sizes[:-1]) <= _MAX_CALL_BYTES
    assert sizes[-1] == _MAX_CALL_BYTES + 12, "the oversized record alone in its call"
    assert [device for device, _ in stream_entries(sync_client)] == [
        f"D{n}".encode() for n in range(20)] + [b"huge"]


async def test_the_backlog_limit_counts_records_not_entries(
    redis_url: str, sync_client: redis.Redis
) -> None:
    producer = await make_producer(redis_url, max_backlog=5)
    try:
        assert await submit(producer, "D", [b"1", b"2", b"3", b"4", b"5"]) == QUEUED
        assert sync_client.xlen(STREAM) == 1
        assert isinstance(await submit(producer, "D", [b"6"]), QueueFull), "5 records: full"
        worker = StreamConsumer(sync_client, stream=STREAM, group="g", consumer="w",
                                dead_letter_stream="dead", claim_idle=30)
        worker.ensure_group()
        records = worker.fetch(10, None)
        assert [record.data for record in records] == [b"1", b"2", b"3", b"4", b"5"]
        worker.ack(records[:4])
        assert isinstance(await submit(producer, "D", [b"6"]), QueueFull), "an entry half done stays"
        worker.ack(records)
        assert not sync_client.exists(keys.queue_backlog(STREAM)), "acknowledged: nothing counted"
        assert await submit(producer, "D", [b"6"]) == QUEUED
    finally:
        await producer.close()
    # The refused record was never written; sent again once there was room, it is there once.
    assert [record for _, record in stream_entries(sync_client)].count(b"6") == 1


async def test_partial_seq_duplicates_keep_the_rest_packed(
    producer: Producer, sync_client: redis.Redis
) -> None:
    assert await submit(producer, "D", [b'{"seq":2}'], frame_id="a", seqs=[2]) != QUEUED
    again = await submit(producer, "D", [b'{"seq":1}', b'{"seq":2}', b'{"seq":3}', b'{"x":0}'],
                         frame_id="b", seqs=[1, 2, 3, None])
    assert isinstance(again, IngestResult)
    assert again.duplicates == [2]
    assert [record for _, record in stream_entries(sync_client)] == [
        b'{"seq":2}', b'{"seq":1}', b'{"seq":3}', b'{"x":0}']


async def test_a_record_with_a_raw_newline_is_refused_at_submit(producer: Producer) -> None:
    with pytest.raises(ValueError, match="raw newline"):
        producer.submit("D", [b'{"a":\n1}'], lambda outcome: None)


async def test_the_fast_paths_write_what_the_whole_script_writes(
    redis_url: str, sync_client: redis.Redis
) -> None:
    """INGEST_PLAIN (a call without dedupe state), its write without Lua (plain_append, as a
    transaction) and INGEST, given the same group: the same entry, the same counter; the two
    scripts the same refusal over the limit."""
    group = [3, "A\nB", "2,1", b'{"a":1}\n{"a":2}\n{"b":1}']
    head = [1_000_000, 86_400_000, "stream", scripts.MAX_FRAMES, scripts.MAX_SESSIONS, scripts.MAX_RANGES]
    client = connect_async(redis_url, timeout=5)
    append: ScriptRunner = RedisAppend(client)
    seen = []
    try:
        for name, script, args in (
                ("whole", scripts.INGEST, [*head, group[3], 0, "", 0, "", group[0], "", *group[1:3]]),
                ("plain", scripts.INGEST_PLAIN, [head[0], *group]),
                ("append", None, group)):
            stream = f"fleetlog:fast-{name}"
            counter = keys.queue_backlog(stream)
            if script is None:
                assert (await append.run([stream, counter], args))[::2] == [0, 3]  # length, counter
                assert (await append.run([stream, counter], args))[::2] == [1, 6]
            else:
                run = sync_client.register_script(script)
                assert run(keys=[stream, counter], args=args) == ([0] if name == "whole" else [0, 3])
                assert run(keys=[stream, counter], args=args) == ([0] if name == "whole" else [0, 6])
                over = list(args)
                over[0] = 6  # the limit: 6 records are queued
                assert run(keys=[stream, counter], args=over) == 6
            [(_, first), (_, second)] = sync_client.xrange(stream)
            assert first == second
            seen.append((first, sync_client.get(counter), sync_client.xlen(stream)))
    finally:
        await client.aclose()
    entry = {b"n": b"3", b"d": b"A\nB", b"c": b"2,1", b"r": group[3]}
    assert seen == [(entry, b"6", 2)] * 3


async def test_under_its_limit_a_plain_call_skips_the_script_and_still_refuses_at_it(
    redis_url: str, sync_client: redis.Redis
) -> None:
    """The first call checks in Redis; then, while the backlog it read back plus the call stays
    under the limit, calls go as the plain append; near the limit the script checks again, and
    refuses at it; nothing refused reaches the stream."""
    sync_client.script_load(scripts.INGEST_PLAIN)  # no NOSCRIPT round (a second EVALSHA) to count
    sync_client.config_resetstat()
    producer = await make_producer(redis_url, max_backlog=7)

    def scripts_run() -> int:
        return int(sync_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    try:
        for n in range(3):  # 1 record (the script), then 2 and 3: 3 and 6, under 7 (appended)
            outcomes = Outcomes()
            for k in range(n + 1):
                producer.submit(f"D{k}", [b"%d.%d" % (n, k)], outcomes.callback())
            assert await outcomes.results() == [QUEUED] * (n + 1)
        assert scripts_run() == 1 and producer.calls == 3, "only the first call checked in Redis"
        assert await submit(producer, "D0", [b"fills"]) == QUEUED  # 6 + 1 = 7: the script, 6 < 7
        assert isinstance(await submit(producer, "D0", [b"refused"]), QueueFull)  # 7: over
        assert scripts_run() == 3
        assert int(sync_client.get(keys.queue_backlog(STREAM)) or 0) == 7
        worker = StreamConsumer(sync_client, stream=STREAM, group="g", consumer="w",
                                dead_letter_stream="dead", claim_idle=30)
        worker.ensure_group()
        worker.ack(worker.fetch(1, None))  # the first entry's one record: backlog 6
        assert await submit(producer, "D0", [b"again"]) == QUEUED  # checked in Redis: room for it
        assert isinstance(await submit(producer, "D0", [b"over"]), QueueFull)
    finally:
        await producer.close()
    # The first entry was acknowledged (and trimmed); nothing refused is there.
    assert [record for _, record in stream_entries(sync_client)] == [
        b"1.0", b"1.1", b"2.0", b"2.1", b"2.2", b"fills", b"again"]


@pytest.mark.parametrize("bursts", [
    (250, 100),  # a script call over the limit, then one that must not be appended after it
    (150, 120, 60, 250, 30, 110),  # an append, then a call that would reach the limit: it waits
    (60, 100, 20, 100, 100),  # two appends in flight together, then the limit
])
async def test_calls_in_flight_together_never_queue_past_the_limit(
    redis_url: str, sync_client: redis.Redis, bursts: tuple[int, ...]
) -> None:
    """Two calls in flight on two connections may run in either order.  Whatever the mix of
    appends and scripts, every entry was queued while the backlog before it was under the
    limit (the script's rule), and every record is either in the stream or refused."""
    producer = await make_producer(redis_url, max_backlog=200)
    try:
        assert await submit(producer, "seed", [b"seed"]) == QUEUED  # the backlog is known: 1
        outcomes = Outcomes()
        sent: list[bytes] = []
        for burst, size in enumerate(bursts):
            for k in range(size):
                record = b"%d.%d" % (burst, k)
                sent.append(record)
                producer.submit(f"b{burst}-{k}", [record], outcomes.callback())
            for _ in range(3):
                await asyncio.sleep(0)  # the burst leaves as its own call, the next joins it in flight
        results = await outcomes.results()
    finally:
        await producer.close()
    refused = {record for record, result in zip(sent, results, strict=True)
               if isinstance(result, QueueFull)}
    assert all(result == QUEUED for result in results if not isinstance(result, QueueFull))
    before = 0
    for _, fields in sync_client.xrange(STREAM):
        assert before < 200, f"an entry queued with {before} records already queued"
        before += int(fields[b"n"])
    stored = [record for _, record in stream_entries(sync_client)]
    assert sorted(stored) == sorted({b"seed", *sent} - refused), "each record stored once or refused"
    assert before >= 200, "the bursts reach the limit"


async def test_a_counter_left_behind_by_a_deleted_stream_is_set_right(
    redis_url: str, sync_client: redis.Redis
) -> None:
    """A stream deleted under its counter (by hand): the script sets the counter when it writes
    to an empty stream, and so does the plain append (RESET_BACKLOG) when it finds one."""
    producer = await make_producer(redis_url, max_backlog=1000)
    counter = keys.queue_backlog(STREAM)
    try:
        assert await submit(producer, "D", [b"1"]) == QUEUED  # the script: the backlog is known
        sync_client.delete(STREAM)
        sync_client.set(counter, 900)  # 900 records counted that are not there
        assert await submit(producer, "D", [b"2", b"3"]) == QUEUED  # the plain append
        assert int(sync_client.get(counter) or 0) == 2
        for n in range(4, 104):  # 100 records more: 102 queued, far under 1000, none refused
            assert await submit(producer, "D", [b"%d" % n]) == QUEUED
        assert int(sync_client.get(counter) or 0) == 102
    finally:
        await producer.close()


@pytest.mark.parametrize("duplicate", ["frame", "seq", "both", "none"])
@pytest.mark.parametrize("mode", ["stream", "list"])
async def test_one_call_leaves_out_only_its_duplicates(
    redis_url: str, sync_client: redis.Redis, mode: Literal["stream", "list"], duplicate: str
) -> None:
    """The call's records go as one string; a duplicate frame or seq inside it is left out (each
    alone too: one must not hide the other), every other record stored once, in the order sent."""
    producer = await make_producer(redis_url, mode=mode)
    try:
        assert await submit(producer, "V", [b'{"v":0}'], frame_id="seen") == QUEUED
        assert await submit(producer, "S", [b'{"seq":2}'], frame_id="s0", seqs=[2]) != QUEUED
        before = sync_client.xlen(STREAM) if mode == "stream" else sync_client.llen(keys.LEGACY_LIST)
        calls = producer.calls
        outcomes = Outcomes()
        frame = "seen" if duplicate in ("frame", "both") else "new"  # "seen": left out whole
        seqs = [1, 2, 3] if duplicate in ("seq", "both") else [4, 5, 6]  # seq 2 is stored
        submissions: list[tuple[str, list[bytes], str | None, list[int] | None]] = [
            ("L1", [b'{"l":1}', b'{"l":2}'], None, None),
            ("V", [b'{"v":"again"}'], frame, None),
            ("S", [b'{"seq":%d}' % seq for seq in seqs], "s1", seqs),
            ("L2", [b'{"l":3}'], None, None),
            ("L2", [b'{"l":4}'], None, None)]
        for device, records, frame_id, record_seqs in submissions:
            producer.submit(device, records, outcomes.callback(), frame_id=frame_id, seqs=record_seqs)
        results = await outcomes.results()
        assert producer.calls == calls + 1, "the five submissions went in one call"
        assert isinstance(results[1], IngestResult)
        assert results[1].duplicate_frame is (frame == "seen")
        assert isinstance(results[2], IngestResult)
        assert results[2].duplicates == ([2] if seqs[0] == 1 else [])
        kept = [(device, record) for device, records, frame_id, record_seqs in submissions
                for record in records
                if not (frame_id == "seen" or record == b'{"seq":2}')]
        expected = [record for _, record in kept]
        if mode == "stream":
            assert sync_client.xlen(STREAM) == before + 1, "one entry for the call"
            last = sync_client.xrevrange(STREAM, count=1)[0][1]
            assert last[b"n"] == str(len(expected)).encode()
            assert last[b"r"] == b"\n".join(expected)
            assert [(device.decode(), record) for device, record in stream_entries(sync_client)][
                -len(expected):] == kept
        else:
            pushed = sync_client.lrange(keys.LEGACY_LIST, 0, -1)[::-1]  # LPUSH: newest first
            assert len(pushed) == before + len(expected)
            assert pushed[-len(expected):] == expected
    finally:
        await producer.close()


async def test_a_backlog_counter_of_another_type_never_hides_what_was_stored(
    redis_url: str, sync_client: redis.Redis
) -> None:
    """A misconfigured counter key (a hash): the append's XADD runs, its INCRBY fails inside the
    transaction, and the records are acked (they are queued); the next call checks in Redis,
    whose script refuses before writing: unavailable, and nothing of it in the stream."""
    producer = await make_producer(redis_url)
    counter = keys.queue_backlog(STREAM)
    try:
        assert await submit(producer, "D", [b"1"]) == QUEUED  # the script: the backlog is known
        sync_client.delete(counter)
        sync_client.hset(counter, "x", "y")
        assert await submit(producer, "D", [b"2"]) == QUEUED  # the append: XADD ran
        assert isinstance(await submit(producer, "D", [b"3"]), QueueUnavailable)
    finally:
        await producer.close()
    assert [record for _, record in stream_entries(sync_client)] == [b"1", b"2"]


async def _linger_producer(url: str, linger: float, shards: int = 1) -> Producer:
    producer = Producer(connect_async(url), mode="stream", stream=STREAM, max_backlog=1_000_000,
                        linger=linger, shards=shards)
    producer.start()
    return producer


async def _answer_then_resend(producer: Producer, devices: list[str], gap: float) -> list[Outcome]:
    """Each device sends a record; once all are acked, each sends its next, ``gap`` apart:
    a closed-loop fleet whose devices answer their acks one after another."""
    first = Outcomes()
    for device in devices:
        producer.submit(device, [f"{device} 1".encode()], first.callback())
    assert await first.results() == [QUEUED] * len(devices)
    second = Outcomes()
    for device in devices:
        producer.submit(device, [f"{device} 2".encode()], second.callback())
        await asyncio.sleep(gap)
    return await second.results()


@pytest.mark.parametrize("linger", [0.0, 1.0])
async def test_a_linger_gathers_the_answered_devices_into_one_call(
    redis_url: str, sync_client: redis.Redis, linger: float
) -> None:
    """With --ingest-linger an idle shard waits for the devices its last call answered,
    so their next records go as one call (one stream entry) instead of one call each;
    round after round, as long as they keep coming back within the linger."""
    devices = [f"D{n}" for n in range(10)]
    producer = await _linger_producer(redis_url, linger)
    try:
        for _ in range(3):
            assert await _answer_then_resend(producer, devices, gap=0.01) == [QUEUED] * 10
    finally:
        await producer.close()
    expected = [(device.encode(), f"{device} {n}".encode()) for n in (1, 2) for device in devices]
    assert stream_entries(sync_client) == expected * 3
    if linger:
        assert producer.calls == 6 and sync_client.xlen(STREAM) == 6
    else:
        assert producer.calls > 6, "without a linger each late record makes its own call"


async def test_a_paced_fleet_is_not_held(redis_url: str, sync_client: redis.Redis) -> None:
    """Devices that send on their own clock, later than the linger after their acks, are
    not waited for: once a call's devices came back late, a lone record goes at once
    (before that, :func:`test_a_linger_ends_at_its_limit`: it waits the linger out)."""
    producer = await _linger_producer(redis_url, 0.3)
    loop = asyncio.get_running_loop()
    devices = [f"D{n}" for n in range(10)]
    try:
        for _ in range(2):
            round_ = Outcomes()
            for device in devices:  # all in one loop turn: one call, held for nothing
                producer.submit(device, [b"paced"], round_.callback())
            assert await round_.results() == [QUEUED] * 10
            await asyncio.sleep(0.4)  # later than the linger: they did not come back at once
        started = loop.time()
        assert await submit(producer, "D0", [b"alone"]) == QUEUED
        assert loop.time() - started < 0.2, "the devices answered came back late: not waited for"
    finally:
        await producer.close()
    assert [record for _, record in stream_entries(sync_client)] == [b"paced"] * 20 + [b"alone"]
    assert producer.calls == 3


async def test_a_linger_ends_at_its_limit(redis_url: str, sync_client: redis.Redis) -> None:
    """When the answered devices do not send again, the record that waits goes after
    ``linger`` seconds, not later; and the one after it goes at once (its target: one)."""
    producer = await _linger_producer(redis_url, 0.3)
    loop = asyncio.get_running_loop()
    try:
        first = Outcomes()
        for n in range(10):
            producer.submit(f"D{n}", [b"first"], first.callback())
        await first.results()
        started = loop.time()
        assert await submit(producer, "D0", [b"alone"]) == QUEUED
        waited = loop.time() - started
        assert 0.25 <= waited < 3, waited
        started = loop.time()
        assert await submit(producer, "D0", [b"after"]) == QUEUED
        assert loop.time() - started < 0.25, "a call of one sets the next call's target to one"
    finally:
        await producer.close()
    assert [record for _, record in stream_entries(sync_client)][-2:] == [b"alone", b"after"]
    assert producer.calls == 3


async def test_close_does_not_wait_out_a_linger(redis_url: str, sync_client: redis.Redis) -> None:
    producer = await _linger_producer(redis_url, 60.0)
    first = Outcomes()
    for n in range(10):
        producer.submit(f"D{n}", [b"first"], first.callback())
    await first.results()
    late = Outcomes()
    producer.submit("D0", [b"late"], late.callback())
    await asyncio.sleep(0.05)
    assert not late.futures[0].done(), "it lingers"
    await asyncio.wait_for(producer.close(), 5)
    assert await late.results() == [QUEUED]
    assert stream_entries(sync_client)[-1] == (b"D0", b"late")


async def test_a_lingering_shard_does_not_hold_another(
    redis_url: str, sync_client: redis.Redis
) -> None:
    producer = await _linger_producer(redis_url, 60.0, shards=2)
    on = {shard: [f"D{n}" for n in range(40) if keys.shard_of(f"D{n}", 2) == shard] for shard in (0, 1)}
    try:
        first = Outcomes()
        for device in on[0][:5]:
            producer.submit(device, [b"first"], first.callback())
        await first.results()
        late = Outcomes()
        producer.submit(on[0][0], [b"late"], late.callback())  # shard 0 lingers for 4 more
        assert await asyncio.wait_for(submit(producer, on[1][0], [b"other"]), 5) == QUEUED
        assert not late.futures[0].done()
        for device in on[0][1:5]:  # the devices it waits for: it goes once they are there
            producer.submit(device, [b"second"], late.callback())
        assert await late.results() == [QUEUED] * 5
    finally:
        await producer.close()
    assert queued(sync_client, keys.shard_stream(STREAM, 1, 2)) == [(on[1][0].encode(), b"other")]
    assert [record for _, record in queued(sync_client, keys.shard_stream(STREAM, 0, 2))] == [
        b"first"] * 5 + [b"late"] + [b"second"] * 4
    assert producer.calls == 3
