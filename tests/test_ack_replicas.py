"""``--ack-replicas N``: a frame is acked only once N replicas have its records (WAIT).

A real master and a real replica (``--replicaof``); the replica is killed and
started again under a running gateway.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import websockets

from fleetlog.embedded import RedisServer
from tests.conftest import Processes
from tests.helpers import RECEIVED, STORED, legacy_frame, send_legacy, wait_until


def replica_of(master: RedisServer, directory: Path, port: int | None = None) -> RedisServer:
    return RedisServer(directory, port=port,
                       extra=["--replicaof", "127.0.0.1", str(master.port)])


def linked(replica: RedisServer) -> bool:
    client = redis.Redis(port=replica.port, socket_timeout=2)
    try:
        return client.info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False
    finally:
        client.close()


def replica_records(replica: RedisServer) -> set[int]:
    client = redis.Redis(port=replica.port, socket_timeout=2)
    try:
        return {json.loads(fields[b"r"])["seq"]
                for _, fields in client.xrange("fleetlog:records")}
    finally:
        client.close()


@pytest.fixture
def master(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "master")
    server.start()
    yield server
    server.stop()


def test_acked_only_once_a_replica_has_it(processes: Processes, master: RedisServer,
                                         tmp_path: Path) -> None:
    replica = replica_of(master, tmp_path / "replica")
    replica.start()
    try:
        assert wait_until(lambda: linked(replica), 15)
        _, port = processes.gateway(master.url, tmp_path / "data", "--ack-replicas", "1",
                                    env={"FLEETLOG_ACK_REPLICAS_TIMEOUT": "0.5"})

        async def scenario() -> tuple[list[int], list[object]]:
            acked: list[int] = []
            async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
                for seq in range(20):
                    replies = await send_legacy(ws, legacy_frame("door-1", seq))
                    assert replies == [RECEIVED, STORED]
                    acked.append(seq)
                # Each ack came after WAIT: the replica has every acked record now.
                assert set(acked) <= await asyncio.to_thread(replica_records, replica)
                await asyncio.to_thread(replica.kill)
                # No replica: the record reaches the master, but it is not acked.
                refused = await send_legacy(ws, legacy_frame("door-1", 20))
                assert refused[0] == RECEIVED
                restarted = replica_of(master, tmp_path / "replica", port=replica.port)
                await asyncio.to_thread(restarted.start)
                assert await asyncio.to_thread(wait_until, lambda: linked(restarted), 15)
                # Sent again, it is acked, and the replica has it.
                again = await send_legacy(ws, legacy_frame("door-1", 20))
                replicated = await asyncio.to_thread(replica_records, restarted)
                await asyncio.to_thread(restarted.stop)
                return [*acked, 20] if again[1] == STORED else acked, [refused[1], again[1], replicated]

        acked, (refused, again, replicated) = asyncio.run(scenario())
        assert isinstance(refused, dict) and refused["code"] == "unavailable", refused
        assert again == STORED
        assert isinstance(replicated, set) and set(acked) <= replicated
    finally:
        replica.stop()
