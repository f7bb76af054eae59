"""``fleetlog gateway --ingest-linger``: a real gateway, real legacy devices, one Redis.

The devices send one record at a time, each after the ack of the one before (a
closed loop, as firmware does).  With a linger the gateway's calls gather each
round of the fleet into one stream entry; every record is still queued once, in
each device's order, and every ack still comes only once Redis has the record.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import redis

from tests.conftest import Processes
from tests.helpers import legacy_device, queued

DEVICES = 10
ROUNDS = 20


async def _fleet(port: int) -> list[list[int]]:
    url = f"ws://127.0.0.1:{port}"
    return list(await asyncio.gather(*(legacy_device(url, f"linger-{n}", ROUNDS)
                                       for n in range(DEVICES))))


def test_a_lingering_gateway_queues_each_round_of_a_fleet_as_one_entry(
    processes: Processes, redis_url: str, tmp_path: Path
) -> None:
    _, port = processes.gateway(redis_url, tmp_path / "data", "--ingest-linger", "0.1")
    acked = asyncio.run(_fleet(port))
    assert acked == [list(range(ROUNDS))] * DEVICES, "every record acked"
    client = redis.Redis.from_url(redis_url)
    stored = queued(client)
    assert len(stored) == DEVICES * ROUNDS
    for n in range(DEVICES):
        device = f"linger-{n}".encode()
        seqs = [json.loads(record)["seq"] for who, record in stored if who == device]
        assert seqs == list(range(ROUNDS)), "each device's records once, in the order it sent them"
    entries = client.xlen("fleetlog:records")
    # One call a round, give or take a round split by a slow device: without a linger a
    # closed loop splits into two calls a round or more (a call per device at worst).
    assert entries <= ROUNDS + ROUNDS // 2, entries
