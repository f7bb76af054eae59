"""Refused-then-resent frames and ids with key separators, through a real gateway and worker.

What counts is what reaches the store: every record a device was told to send
again, and sent again, is stored exactly once; one device can never make
another's records look like duplicates.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import redis
import websockets

from tests.conftest import Processes
from tests.helpers import stored_rows, wait_until

STREAM = "fleetlog:records"


async def _log(ws: Any, frame_id: str, records: list[Any], **extra: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "log", "id": frame_id, "records": records, **extra},
                             ensure_ascii=False))
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return reply


def _stored(data_dir: Path) -> dict[str, list[int]]:
    by_device: dict[str, list[int]] = {}
    for _, device, seq, _ in stored_rows(data_dir):
        by_device.setdefault(device, []).append(seq)
    return by_device


def _drain(processes: Processes, redis_url: str, data_dir: Path, count: int) -> None:
    worker = processes.worker(redis_url, data_dir, "--max-messages", str(count))
    assert worker.wait(60) == 0


async def test_a_busy_frame_sent_again_is_stored(redis_url: str, processes: Processes,
                                                 tmp_path: Path) -> None:
    _, port = processes.gateway(redis_url, tmp_path, "--max-backlog", "3")
    client = redis.Redis.from_url(redis_url)
    frame_a = [{"seq": n, "msg": f"a{n}"} for n in (1, 2, 3)]
    async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        filler = await _log(ws, "fill", [{"n": n} for n in range(3)], deviceId="filler")
        assert filler["stored"] == 3
        busy = await _log(ws, "A", frame_a, deviceId="meter", session="s")
        assert busy["code"] == "busy"
        await asyncio.to_thread(_drain, processes, redis_url, tmp_path, 3)
        assert wait_until(lambda: client.xlen(STREAM) == 0, 10)
        later = await _log(ws, "B", [{"seq": n} for n in (4, 5, 6)], deviceId="meter", session="s")
        assert later["stored"] == 3
        await asyncio.to_thread(_drain, processes, redis_url, tmp_path, 3)
        assert wait_until(lambda: client.xlen(STREAM) == 0, 10)
        resent = await _log(ws, "A", frame_a, deviceId="meter", session="s")
        assert resent == {"type": "ack", "id": "A", "stored": 3, "stored_through": 6, "missing": []}
        await asyncio.to_thread(_drain, processes, redis_url, tmp_path, 3)
        assert wait_until(lambda: client.xlen(STREAM) == 0, 10)
        reverse = await _log(ws, "R", [{"seq": n} for n in (10, 9, 8, 7)], deviceId="meter",
                             session="s")
        assert reverse["stored"] == 4
        assert "duplicates" not in reverse
    await asyncio.to_thread(_drain, processes, redis_url, tmp_path, 4)
    client.close()
    assert _stored(tmp_path)["meter"] == [4, 5, 6, 1, 2, 3, 10, 9, 8, 7]


async def test_one_device_cannot_suppress_another(redis_url: str, processes: Processes,
                                                  tmp_path: Path) -> None:
    _, port = processes.gateway(redis_url, tmp_path)
    awkward = ["a", "a:b", "b:c", "{x}", "*", "a b", "门禁:一号"]
    # Device "a" frame "b:F1" session "b:s1" once named the keys of device "a:b" frame "F1" session "s1".
    frames = [("a", "b:F1", "b:s1"), ("a:b", "F1", "s1")]
    frames += [(device, f"{other}:F2", other) for device in awkward for other in awkward]
    async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
        for device, frame_id, session in frames:
            ack = await _log(ws, frame_id, [{"seq": n} for n in (1, 2, 3)], deviceId=device,
                             session=session)
            assert ack["stored"] == 3, (device, frame_id, ack)
            assert "duplicate" not in ack
    await asyncio.to_thread(_drain, processes, redis_url, tmp_path, 3 * len(frames))
    stored = _stored(tmp_path)
    for device in awkward:
        sent = sum(1 for name, _, _ in frames if name == device)
        assert stored[device] == [1, 2, 3] * sent, device


async def test_a_second_simulate_run_is_stored_too(
        redis_url: str, processes: Processes, tmp_path: Path) -> None:
    """Frame ids and seqs are remembered per device for a day: a run reusing the last run's
    (ids restarting at 0, no session) was acked as duplicates and stored nothing, while its
    summary said every record was acked."""
    from tests.helpers import run_fleetlog

    data_dir = tmp_path / "data"
    _, port = processes.gateway(redis_url, data_dir)
    processes.worker(redis_url, data_dir)
    for run in (1, 2):
        done = run_fleetlog("simulate", "--url", f"ws://127.0.0.1:{port}", "--devices", "3",
                            "--messages", "20", "--batch", "5", "--json", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["acked"] == 60
        assert wait_until(lambda run=run: len(stored_rows(data_dir)) >= 60 * run, timeout=30)
    await asyncio.sleep(0.5)
    assert len(stored_rows(data_dir)) == 120, "each run's records stored once"
