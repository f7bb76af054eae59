"""``fleetlog gateway --processes N``: N processes on one port, restarted when they die.

Real processes throughout: the parent, its gateway children, a worker, a Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import orjson
import pytest
import redis
import websockets

from fleetlog import keys
from tests.conftest import Processes
from tests.helpers import (
    RECEIVED,
    STORED,
    legacy_frame,
    run_fleetlog,
    send_legacy,
    stored_rows,
    wait_until,
)

FAST = {"FLEETLOG_RATE_RECORDS": "1000000", "FLEETLOG_RATE_BYTES": "1000000000",
        "FLEETLOG_HEARTBEAT_TTL": "2"}
DEVICES = 40


def children_of(pid: int) -> dict[int, str]:
    """Live children of ``pid``: pid -> the FLEETLOG_NODE_ID it runs as."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) != pid or fields[0] == "Z":
            continue
        for item in environ:
            if item.startswith(b"FLEETLOG_NODE_ID="):
                found[int(entry)] = item.partition(b"=")[2].decode()
    return found


def link_nodes(redis_url: str) -> dict[str, str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return {device.decode(): orjson.loads(link)["node"]
                for device, link in client.hgetall(keys.DEVICE_LINKS).items()}
    finally:
        client.close()


def online(redis_url: str, data_dir: Path) -> set[str]:
    """The devices ``fleetlog devices`` shows online (their link's node is alive)."""
    shown = run_fleetlog("devices", "--json", "--redis-url", redis_url, "--data-dir", str(data_dir))
    assert shown.returncode == 0, shown.stderr
    return {row["device_id"] for row in json.loads(shown.stdout) if row["online"]}


class Device:
    """A legacy device that sends its records one at a time and reconnects when cut off."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.acked: list[int] = []
        self.next_seq = 0
        self.ws: websockets.ClientConnection | None = None

    async def send(self, count: int) -> None:
        """Send ``count`` more records, each until acked (reconnecting, at most 50 tries each)."""
        target = self.next_seq + count
        tries = 0
        while self.next_seq < target:
            tries += 1
            assert tries <= 50 * count, f"{self.name}: could not send seq {self.next_seq}"
            try:
                if self.ws is None:
                    self.ws = await websockets.connect(self.url, max_size=None, open_timeout=5)
                replies = await send_legacy(self.ws, legacy_frame(self.name, self.next_seq))
            except (OSError, websockets.WebSocketException, TimeoutError):
                await self.drop()
                await asyncio.sleep(0.1)
                continue
            assert replies[0] == RECEIVED
            if replies[1] == STORED:
                self.acked.append(self.next_seq)
                self.next_seq += 1
            else:
                await asyncio.sleep(0.1)

    async def drop(self) -> None:
        if self.ws is not None:
            ws, self.ws = self.ws, None
            await ws.close()


@pytest.mark.timeout(120)
def test_processes_share_the_port_restart_when_killed_and_stop_together(
        processes: Processes, redis_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    parent, port = processes.gateway(redis_url, data_dir, "--processes", "2", "--node-id", "gw",
                                     env=FAST)
    processes.worker(redis_url, data_dir)
    url = f"ws://127.0.0.1:{port}"
    devices = [Device(url, f"dev-{i:03d}") for i in range(DEVICES)]

    async def all_send(count: int) -> None:
        await asyncio.gather(*(device.send(count) for device in devices))

    # Both children listening (each writes its heartbeat once it listens): the port answers
    # as soon as the first one does, and devices connecting before the second would all
    # land on the first.
    client = redis.Redis.from_url(redis_url)
    try:
        assert wait_until(lambda: all(client.exists(keys.node_heartbeat(f"gw-p{k}")) for k in (0, 1)),
                          20)
    finally:
        client.close()

    async def scenario() -> None:
        await all_send(5)
        # The kernel spread the connections over both processes: both nodes hold devices.
        nodes = link_nodes(redis_url)
        assert len(nodes) == DEVICES
        assert set(nodes.values()) == {"gw-p0", "gw-p1"}, nodes
        first = children_of(parent.pid)
        assert sorted(first.values()) == ["gw-p0", "gw-p1"]
        killed = next(pid for pid, node in first.items() if node == "gw-p0")
        # One device of the killed process never comes back: it must read offline.
        silent = next(device for device in devices if nodes[device.name] == "gw-p0")
        os.kill(killed, signal.SIGKILL)
        # The parent starts gw-p0 again, as a new process and a new node.
        assert await asyncio.to_thread(wait_until, lambda: (
            sorted(children_of(parent.pid).values()) == ["gw-p0-r1", "gw-p1"]
            and killed not in children_of(parent.pid)), 20)
        # Every other device sends more: those of the killed process reconnect (to either process).
        await asyncio.gather(*(device.send(5) for device in devices if device is not silent))
        await silent.drop()
        assert link_nodes(redis_url)[silent.name] == "gw-p0", "its link names the dead node"
        assert await asyncio.to_thread(
            wait_until, lambda: silent.name not in online(redis_url, data_dir), 10), \
            "offline once the dead node's heartbeat expired, though gw-p0's successor runs"
        assert online(redis_url, data_dir) == {d.name for d in devices if d is not silent}
        for device in devices:
            await device.drop()

    asyncio.run(scenario())
    survivors = list(children_of(parent.pid))
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(30) == 0
    for pid in survivors:  # every child stopped with the parent
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    acked = {(device.name, seq) for device in devices for seq in device.acked}
    assert len(acked) == DEVICES * 10 - 5  # the silent device sent its first 5 only
    assert wait_until(lambda: acked <= {(d, s) for _, d, s, _ in stored_rows(data_dir)}, 20)
    # Per-device order held through the restart.
    for device in devices:
        seqs = [s for _, d, s, _ in stored_rows(data_dir) if d == device.name]
        assert seqs == sorted(seqs), (device.name, seqs)


def test_processes_refuse_a_taken_port(redis_url: str, tmp_path: Path) -> None:
    """A port another program listens on fails once, clearly, instead of restarting forever."""
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fleetlog", "gateway", "--processes", "2", "--port", str(port),
             "--redis-url", redis_url, "--auth", "none", "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
