"""fleetlog.queue.deadletter.DeadLetters on a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from fleetlog import keys
from fleetlog.queue.deadletter import DeadLetters

DEAD = "fleetlog:dead"
STREAM = "fleetlog:records"


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    opened = redis.Redis.from_url(redis_url)
    yield opened
    opened.close()


def _bury(client: Any, n: int) -> list[str]:
    return [client.xadd(DEAD, {"qid": f"1-{i}", "d": f"D{i}", "r": b'{"n": %d}' % i,
                               "error": "rejected", "deliveries": 5,
                               "failed_at": 1_795_687_200_000}).decode() for i in range(n)]


def test_list_and_show(client: Any) -> None:
    ids = _bury(client, 3)
    letters = DeadLetters(client, dead_letter_stream=DEAD, stream=STREAM)
    assert [letter.id for letter in letters.letters()] == ids
    shown = letters.show(ids[1])
    assert shown is not None
    assert (shown.device_id, shown.record, shown.deliveries) == ("D1", b'{"n": 1}', 5)
    assert shown.failed_at == "2026-11-26T10:00:00.000Z"
    assert letters.show("0-1") is None


def test_replay_moves_letters_back_to_the_queue(client: Any) -> None:
    ids = _bury(client, 3)
    letters = DeadLetters(client, dead_letter_stream=DEAD, stream=STREAM)
    assert letters.replay([ids[0], "0-1"]) == 1
    queued = client.xrange(STREAM)
    assert [(f[b"d"], f[b"r"]) for _, f in queued] == [(b"D0", b'{"n": 0}')]
    assert client.xlen(DEAD) == 2
    legacy = DeadLetters(client, dead_letter_stream=DEAD, stream=STREAM, queue="list")
    assert legacy.replay() == 2
    assert client.lrange(keys.LEGACY_LIST, 0, -1) == [b'{"n": 2}', b'{"n": 1}']
    assert client.xlen(DEAD) == 0


def test_purge(client: Any) -> None:
    ids = _bury(client, 3)
    letters = DeadLetters(client, dead_letter_stream=DEAD, stream=STREAM)
    assert letters.purge([ids[0]]) == 1
    assert letters.purge([]) == 0
    assert letters.purge() == 2
    assert client.exists(DEAD) == 0
