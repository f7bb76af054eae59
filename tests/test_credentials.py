"""fleetlog.credentials: add/rotate/revoke are atomic, against a real Redis and a real gateway."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from fleetlog import keys
from fleetlog.credentials import Credentials, TokenChange, UnknownDevice, hash_token
from fleetlog.errors import FleetlogError
from tests.conftest import Processes

PARALLEL = 20


def _in_parallel(redis_url: str, count: int, action: Callable[[Credentials, int], Any]) -> list[Any]:
    """Run ``action`` in ``count`` threads at once, each with its own connection.

    Returns each thread's result or the exception it raised.
    """
    clients = [redis.Redis.from_url(redis_url) for _ in range(count)]
    barrier = threading.Barrier(count, timeout=10)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        credentials = Credentials(clients[index])
        barrier.wait()
        try:
            results[index] = action(credentials, index)
        except Exception as exc:  # the test inspects which ones failed and why
            results[index] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for client in clients:
        client.close()
    assert not any(thread.is_alive() for thread in threads)
    return results


def _hashes_of(client: redis.Redis, device_id: str) -> list[bytes]:
    """Every entry of the token table that authenticates as ``device_id``."""
    return [digest for digest, device in client.hgetall(keys.TOKENS).items()
            if device == device_id.encode()]


async def _accepted(port: int, token: str) -> bool:
    """Whether a real gateway lets ``token`` connect (``False``: HTTP 401)."""
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/?token={token}", open_timeout=5):
            return True
    except websockets.InvalidStatus as refused:
        status = refused.response.status_code
    assert status == 401
    return False


async def test_parallel_rotations_leave_exactly_the_last_token(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port = processes.gateway(redis_url, tmp_path, auth="token")
    client = redis.Redis.from_url(redis_url)
    first = Credentials(client).add("lock")

    tokens = _in_parallel(redis_url, PARALLEL, lambda credentials, _: credentials.rotate("lock"))
    assert all(isinstance(token, str) for token in tokens), tokens

    # Exactly one entry of the table names the device: the hash the device record holds.
    current = client.hget(keys.device_credential("lock"), "token_hash")
    assert _hashes_of(client, "lock") == [current]
    [last] = [token for token in tokens if hash_token(token) == current.decode()]
    assert await _accepted(port, last)
    for stale in [first, *tokens]:
        if stale != last:
            assert not await _accepted(port, stale), "a replaced token still authenticates"

    Credentials(client).revoke("lock")
    assert _hashes_of(client, "lock") == []
    assert not client.exists(keys.device_credential("lock"))
    assert not await _accepted(port, last)
    assert [c.device_id for c in Credentials(client).list()] == []
    with pytest.raises(UnknownDevice):
        Credentials(client).rotate("lock")
    client.close()


def test_parallel_adds_of_one_id_one_wins(redis_url: str) -> None:
    results = _in_parallel(redis_url, PARALLEL, lambda credentials, _: credentials.add("twin"))
    issued = [result for result in results if isinstance(result, str)]
    refused = [result for result in results if not isinstance(result, str)]
    assert len(issued) == 1
    assert len(refused) == PARALLEL - 1
    assert all(isinstance(exc, FleetlogError) and "already has a token" in str(exc) for exc in refused)
    client = redis.Redis.from_url(redis_url)
    assert _hashes_of(client, "twin") == [hash_token(issued[0]).encode()]
    client.close()


def test_parallel_rotate_and_revoke_leave_nothing_that_authenticates(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    Credentials(client).add("gate")

    def rotate_or_revoke(credentials: Credentials, index: int) -> str | None:
        if index % 2:
            return credentials.rotate("gate")
        credentials.revoke("gate")
        return None

    _in_parallel(redis_url, PARALLEL, rotate_or_revoke)
    device = client.hget(keys.device_credential("gate"), "token_hash")
    assert _hashes_of(client, "gate") == ([] if device is None else [device])
    client.close()



@pytest.mark.parametrize(
    "raw", [b"5", b"[]", b"not json", b'{"v": "1", "change": "ab"}', b'{"v": 1, "change": "../x"}',
            b'{"v": 1, "change": "ab", "del": "h"}'],
)
def test_a_malformed_change_message_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"credential change|JSON|unexpected|expected"):
        TokenChange.decode(raw)
