"""Acks and refusals that tell the truth about what reached Redis.

``--ack-replicas N``: a frame is acked only once N replicas have its records
(WAIT); by default 1 when the master has a replica.  A refusal that says "not
stored" (``unavailable``, ``busy``) is sent only when nothing was written; a
write that left but was not confirmed (WAIT timed out, the connection failed
after the call was sent) is ``unconfirmed``, and a v2 resend of it is stored once.
Real masters and replicas (``--replicaof``), a real gateway and worker; every
test checks what reached the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from fleetlog.embedded import RedisServer, free_port
from tests.conftest import Processes
from tests.helpers import stored_rows, wait_until


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


def queued_seqs(server: RedisServer) -> Counter[int]:
    """How many times each seq is in ``server``'s stream."""
    client = redis.Redis(port=server.port, socket_timeout=2)
    try:
        return Counter(json.loads(fields[b"r"])["seq"] for _, fields in client.xrange("fleetlog:records"))
    finally:
        client.close()


def stored_seqs(data_dir: Path) -> Counter[int]:
    return Counter(seq for _, _, seq, _ in stored_rows(data_dir))


@pytest.fixture
def master(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "master")
    server.start()
    yield server
    server.stop()


def v2_frame(seq: int) -> str:
    return json.dumps({"type": "log", "id": f"f-{seq}", "deviceId": "door-1", "session": "s1",
                       "records": [{"seq": seq, "msg": f"record {seq}"}]})


async def send(ws: Any, seq: int, timeout: float = 15) -> dict[str, Any]:
    await ws.send(v2_frame(seq))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return reply


def gateway_metric(port: int, name: str) -> float:
    """A metric from the gateway's metrics listener on ``port``."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_replicated_by_default_and_unconfirmed_is_stored_once(
        processes: Processes, master: RedisServer, tmp_path: Path) -> None:
    """Default ack-replicas with a replica present: acks wait for it; with it gone frames are
    ``unconfirmed`` (written on the master: stored), and their resends are stored once."""
    replica = replica_of(master, tmp_path / "replica")
    replica.start()
    data_dir = tmp_path / "data"
    try:
        assert wait_until(lambda: linked(replica), 15)
        metrics_port = free_port()
        _, port = processes.gateway(master.url, data_dir,
                                    env={"FLEETLOG_ACK_REPLICAS_TIMEOUT": "0.5",
                                         "FLEETLOG_GATEWAY_METRICS_PORT": str(metrics_port)})
        processes.worker(master.url, data_dir)

        async def scenario() -> dict[str, Any]:
            outcome: dict[str, Any] = {"acked": [], "unconfirmed": [], "resent": []}
            async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
                for seq in range(20):
                    reply = await send(ws, seq)
                    assert reply["type"] == "ack", reply
                    outcome["acked"].append(seq)
                # Each ack came after WAIT (the default, chosen from the topology).
                outcome["on_replica"] = await asyncio.to_thread(queued_seqs, replica)
                await asyncio.to_thread(replica.kill)
                for seq in range(20, 30):
                    reply = await send(ws, seq)
                    assert reply["type"] == "error", reply
                    outcome["unconfirmed"].append((seq, reply["code"]))
                restarted = replica_of(master, tmp_path / "replica", port=replica.port)
                await asyncio.to_thread(restarted.start)
                try:
                    assert await asyncio.to_thread(wait_until, lambda: linked(restarted), 15)
                    for seq in range(20, 30):  # the device resends what was not acked
                        outcome["resent"].append(await send(ws, seq))
                finally:
                    await asyncio.to_thread(restarted.stop)
            return outcome

        outcome = asyncio.run(scenario())
        assert set(outcome["acked"]) <= set(outcome["on_replica"])
        assert all(code == "unconfirmed" for _, code in outcome["unconfirmed"]), outcome
        # The master had them: the resend is acked as a duplicate, queued once.
        assert all(reply["type"] == "ack" and reply.get("duplicate") for reply in outcome["resent"])
        assert gateway_metric(metrics_port, "fleetlog_gateway_unconfirmed_records_total") == 10
        assert wait_until(lambda: len(stored_seqs(data_dir)) == 30, 30), stored_seqs(data_dir)
        stored = stored_seqs(data_dir)
        assert set(stored) == set(range(30)) and max(stored.values()) == 1, stored
    finally:
        replica.stop()


def test_unavailable_means_not_stored_and_unconfirmed_means_maybe(
        processes: Processes, master: RedisServer, tmp_path: Path) -> None:
    """A Redis that stops answering after the call left: ``unconfirmed`` (the write happened);
    a Redis that is gone: ``unavailable`` (nothing written).  The store agrees."""
    data_dir = tmp_path / "data"
    _, port = processes.gateway(master.url, data_dir, env={"FLEETLOG_REDIS_TIMEOUT": "1"})
    processes.worker(master.url, data_dir)
    assert master.process is not None

    async def scenario() -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            assert (await send(ws, 0))["type"] == "ack"
            # Frozen: the call is sent, its reply never comes within the timeout.
            os.kill(master.process.pid, signal.SIGSTOP)
            try:
                outcome["frozen"] = await send(ws, 1)
            finally:
                os.kill(master.process.pid, signal.SIGCONT)
            outcome["resent"] = await send(ws, 1)
            # Gone: nothing can be written.
            await asyncio.to_thread(master.stop)
            outcome["down"] = [await send(ws, seq) for seq in (2, 3)]
            await asyncio.to_thread(master.start)
            for _ in range(50):  # the first call may still find the dead socket
                reply = await send(ws, 4)
                if reply["type"] == "ack":
                    break
                await asyncio.sleep(0.1)
            outcome["after"] = reply
        return outcome

    outcome = asyncio.run(scenario())
    assert outcome["frozen"]["code"] == "unconfirmed", outcome
    assert outcome["resent"]["type"] == "ack" and outcome["resent"].get("duplicate"), outcome
    assert [reply["code"] for reply in outcome["down"]] == ["unavailable", "unavailable"], outcome
    assert outcome["after"]["type"] == "ack"
    assert wait_until(lambda: set(stored_seqs(data_dir)) >= {0, 1, 4}, 30)
    stored = stored_seqs(data_dir)
    # Told "not stored": absent.  Told "unconfirmed", then resent: stored once.
    assert stored == Counter({0: 1, 1: 1, 4: 1}), stored


def test_a_resend_is_not_acked_before_its_first_copy_is_replicated(
        processes: Processes, master: RedisServer, tmp_path: Path) -> None:
    """Replica stalled (SIGSTOP: still connected, acking nothing new): a frame is unconfirmed,
    and so is its resend, though the master holds it as a duplicate; WAIT must cover the
    first copy (a resend that wrote nothing used to be acked on the connection's older offset,
    and a failover then lost it).  Once the replica is back, the resend is acked."""
    replica = replica_of(master, tmp_path / "replica")
    replica.start()
    data_dir = tmp_path / "data"
    try:
        assert wait_until(lambda: linked(replica), 15)
        _, port = processes.gateway(master.url, data_dir, env={"FLEETLOG_ACK_REPLICAS_TIMEOUT": "0.5"})
        assert replica.process is not None

        async def scenario() -> list[dict[str, Any]]:
            async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
                replies = [await send(ws, 0)]
                os.kill(replica.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
                try:
                    replies += [await send(ws, 1), await send(ws, 1), await send(ws, 1)]
                finally:
                    os.kill(replica.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
                await asyncio.to_thread(wait_until, lambda: linked(replica), 15)
                replies.append(await send(ws, 1))
            return replies

        first, *stalled, after = asyncio.run(scenario())
        assert first["type"] == "ack"
        assert [reply.get("code") for reply in stalled] == ["unconfirmed"] * 3, stalled
        assert after["type"] == "ack" and after.get("duplicate"), after
        assert queued_seqs(replica) == Counter({0: 1, 1: 1})  # the replica has it, once
    finally:
        replica.stop()
