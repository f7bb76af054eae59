"""The ingest script's dedupe state, against a real Redis: only what was stored is a duplicate.

Regression tests for records lost on ordinary edge sequences: a refused frame
resent later, seqs arriving in reverse, and ids that contain key separators.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from urllib.parse import quote

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlog import keys
from fleetlog.errors import FleetlogError, QueueFull
from fleetlog.queue import scripts
from fleetlog.queue.connection import connect_async
from fleetlog.queue.producer import IngestResult, Producer
from tests.helpers import queued

STREAM = "fleetlog:records"

Outcome = IngestResult | FleetlogError


async def make_producer(url: str, max_backlog: int = 1_000_000) -> Producer:
    producer = Producer(connect_async(url, timeout=5.0), mode="stream", stream=STREAM,
                        max_backlog=max_backlog)
    producer.start()
    return producer


@pytest.fixture
async def producer(redis_url: str) -> AsyncIterator[Producer]:
    made = await make_producer(redis_url)
    yield made
    await made.close()


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


async def send(producer: Producer, device: str, seqs: Sequence[int | None], *, session: str = "",
               frame_id: str | None = None) -> Outcome:
    """Submit one v2-like frame whose records are ``{"seq": n}``; its outcome."""
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    records = [f'{{"seq":{seq},"device":"{device}"}}'.encode() for seq in seqs]
    producer.submit(device, records, future.set_result, seqs=list(seqs), session=session,
                    frame_id=frame_id)
    return await asyncio.wait_for(future, 10)


def queued_seqs(client: redis.Redis, device: str) -> list[int]:
    return [json.loads(record)["seq"] for queued_device, record in queued(client, STREAM)
            if queued_device.decode() == device]


async def test_a_refused_frame_sent_again_is_stored(redis_url: str, client: redis.Redis) -> None:
    producer = await make_producer(redis_url, max_backlog=3)
    try:
        for _ in range(3):  # another device fills the backlog
            assert isinstance(await send(producer, "other", [None]), IngestResult)
        refused = await send(producer, "D", [1, 2, 3], session="s", frame_id="A")
        assert isinstance(refused, QueueFull)
        assert not client.exists(keys.stored_seqs("D")), "a refusal leaves no dedupe state"
        assert not client.exists(keys.recent_frames("D"))
        client.xtrim(STREAM, maxlen=0, approximate=False)  # a worker caught up
        later = await send(producer, "D", [4, 5, 6], session="s", frame_id="B")
        assert isinstance(later, IngestResult)
        assert later.duplicates == []
        client.xtrim(STREAM, maxlen=0, approximate=False)
        resent = await send(producer, "D", [1, 2, 3], session="s", frame_id="A")
        assert isinstance(resent, IngestResult)
        assert not resent.duplicate_frame
        assert resent.duplicates == [], "seqs 1-3 were never stored: not duplicates"
        assert resent.stored_through == 6
        assert resent.missing == []
    finally:
        await producer.close()
    assert queued_seqs(client, "D") == [1, 2, 3]  # 4-6 were trimmed (drained) before


async def test_seqs_in_reverse_are_all_stored(producer: Producer, client: redis.Redis) -> None:
    first = await send(producer, "D", [10, 9, 8])
    assert isinstance(first, IngestResult)
    assert first.duplicates == []
    assert first.stored_through == 10
    again = await send(producer, "D", [8, 9, 10, 11])
    assert isinstance(again, IngestResult)
    assert again.duplicates == [8, 9, 10], "only seqs that were stored are duplicates"
    assert queued_seqs(client, "D") == [10, 9, 8, 11]


async def test_gaps_are_reported_between_stored_ranges(producer: Producer, client: redis.Redis) -> None:
    result = await send(producer, "D", [5, 6, 9, 12])
    assert isinstance(result, IngestResult)
    assert (result.stored_through, result.missing) == (6, [(7, 8), (10, 11)])
    filled = await send(producer, "D", [7, 8, 10, 11, 12])
    assert isinstance(filled, IngestResult)
    assert filled.duplicates == [12]
    assert (filled.stored_through, filled.missing) == (12, [])
    below = await send(producer, "D", [1, 2])  # below the first stored seq: not assumed stored
    assert isinstance(below, IngestResult)
    assert below.duplicates == []
    assert (below.stored_through, below.missing) == (2, [(3, 4)])
    assert sorted(queued_seqs(client, "D")) == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12]


AWKWARD = ["a", "a:b", "b:x", "x{1}", "{tag}", "*", "a b", "门禁:一号", "a%3Ab", "a%b", ""]


async def test_ids_with_key_separators_never_collide(producer: Producer, client: redis.Redis) -> None:
    # Device "a" with frame/session "b:..." against device "a:b" with "...": distinct.
    pairs = [("a", "b:F1", "b:s1"), ("a:b", "F1", "s1")]
    pairs += [(device, f"{other}:F", other) for device in AWKWARD[:-1] for other in AWKWARD]
    for device, frame_id, session in pairs:
        result = await send(producer, device, [1, 2, 3], session=session, frame_id=frame_id)
        assert isinstance(result, IngestResult)
        assert not result.duplicate_frame, (device, frame_id)
        assert result.duplicates == [], (device, session)
    for device in {device for device, _, _ in pairs}:
        expected = [1, 2, 3] * sum(1 for d, _, _ in pairs if d == device)
        assert queued_seqs(client, device) == expected, device
    # And every key name is escaped: no separator or pattern character from an id.
    for raw in client.keys("fleetlog:*"):
        name = raw.decode()
        if name == STREAM:
            continue
        assert name.count(":") == 2, name
        assert not set(name) & set("{}* "), name


def test_key_parts_are_injective_and_reversible() -> None:
    samples = [*AWKWARD, "\ud800", "a\nb", "%", "%25", "~._-"]
    encoded = [keys.part(sample) for sample in samples]
    assert len(set(encoded)) == len(samples)
    assert [keys.unpart(value) for value in encoded] == samples
    assert keys.part("door-1_A.b~") == "door-1_A.b~", "plain ids read the same"


@settings(max_examples=1000, deadline=None, database=None)
@given(st.text(max_size=40))
def test_key_parts_are_percent_encoding(value: str) -> None:
    """Plain ids skip ``quote``; every id still gets exactly its percent-encoding."""
    assert keys.part(value) == quote(value, safe="", errors="surrogatepass")
    assert keys.unpart(keys.part(value)) == value


async def test_dedupe_state_stays_bounded(producer: Producer, client: redis.Redis) -> None:
    """Gapped frames, new sessions and new frame ids without end: Redis memory stays flat."""

    def used() -> int:
        return int(client.info("memory")["used_memory"])

    async def burst(start: int, count: int) -> None:
        for n in range(start, start + count):
            # Every other seq missing (a gap per record), a new session and frame id each time.
            result = await send(producer, "gappy", list(range(0, 200, 2)), session=f"boot-{n}",
                                frame_id=f"f-{n}")
            assert isinstance(result, IngestResult)
            assert len(result.missing) == scripts.MAX_RANGES - 1, "ranges per session are capped"
        client.xtrim(STREAM, maxlen=0, approximate=False)  # the worker drained it

    await burst(0, 50)
    settled = used()
    await burst(50, 400)
    grown = used() - settled
    assert grown < 64 * 1024, f"Redis grew by {grown} bytes over 400 more frames"
    assert client.hlen(keys.stored_seqs("gappy")) == scripts.MAX_SESSIONS
    assert client.zcard(keys.recent_frames("gappy")) == min(450, scripts.MAX_FRAMES)
    assert 0 < client.pttl(keys.stored_seqs("gappy")) <= 86_400_000
    assert 0 < client.pttl(keys.recent_frames("gappy")) <= 86_400_000
    assert set(client.keys("fleetlog:*")) == {keys.stored_seqs("gappy").encode(),
                                               keys.recent_frames("gappy").encode(), STREAM.encode()}


async def test_forgotten_state_only_ever_stores_again(producer: Producer, client: redis.Redis) -> None:
    """Past the caps the oldest state is forgotten: a resend is stored again, never reported stored."""
    for n in range(scripts.MAX_SESSIONS + 1):
        assert isinstance(await send(producer, "D", [1], session=f"s{n}"), IngestResult)
    resend = await send(producer, "D", [1], session="s0")  # the least recently used session
    assert isinstance(resend, IngestResult)
    assert resend.duplicates == []
    recent = await send(producer, "D", [1], session=f"s{scripts.MAX_SESSIONS}")
    assert isinstance(recent, IngestResult)
    assert recent.duplicates == [1]


async def test_past_the_range_bound_stored_through_never_passes_a_gap(
        producer: Producer, client: redis.Redis) -> None:
    """66 runs of stored seqs (1, 3, 5, ... 131) in one frame: 2 was never received, so
    stored_through stays 1 and every gap stays listed; what was forgotten to stay within
    the bound shows as missing (a resend stores it again), never as stored."""
    seqs = list(range(1, 132, 2))
    result = await send(producer, "D", seqs, session="boot")
    assert isinstance(result, IngestResult)
    assert result.stored_through == 1
    assert result.missing[0][0] == 2  # (2, 6): 3 and 5 forgotten, so listed too
    # Every seq never received is inside a listed gap.
    assert all(any(a <= seq <= b for a, b in result.missing) for seq in range(2, 131, 2))
    # A device resending what is listed fills every gap; nothing it sent is dropped.
    listed = sorted({seq for a, b in result.missing for seq in range(a, b + 1)})
    again = await send(producer, "D", listed, session="boot", frame_id="again")
    assert isinstance(again, IngestResult)
    assert again.stored_through == 131 and again.missing == []
    assert set(queued_seqs(client, "D")) == set(range(1, 132)), "stored, some twice, none lost"


async def test_a_frame_id_is_a_duplicate_within_the_window_only(redis_url: str, client: redis.Redis) -> None:
    """The window decides by each id's time; ids past it are dropped only with the oldest, at the bound."""
    producer = Producer(connect_async(redis_url, timeout=5.0), mode="stream", stream=STREAM,
                        max_backlog=1_000_000, dedupe_window=0.3)
    producer.start()
    try:
        first = await send(producer, "W", [None], frame_id="A")
        again = await send(producer, "W", [None], frame_id="A")
        assert isinstance(first, IngestResult) and not first.duplicate_frame
        assert isinstance(again, IngestResult) and again.duplicate_frame
        for n in range(5):  # 0.5 s: past A's window, while B frames keep the key from expiring
            await asyncio.sleep(0.1)
            fresh = await send(producer, "W", [None], frame_id=f"B{n}")
            assert isinstance(fresh, IngestResult) and not fresh.duplicate_frame
        assert client.zscore(keys.recent_frames("W"), "A") is not None, "A is still in the set"
        late = await send(producer, "W", [None], frame_id="A")
        assert isinstance(late, IngestResult) and not late.duplicate_frame, "past its window"
        resent = await send(producer, "W", [None], frame_id="A")
        assert isinstance(resent, IngestResult) and resent.duplicate_frame, "within its new window"
        assert len(queued(client, STREAM)) == 1 + 5 + 1, "stored: A, B0..B4, A after the window"
        assert client.zcard(keys.recent_frames("W")) == 6
    finally:
        await producer.close()
