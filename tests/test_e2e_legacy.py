"""End to end over real processes: legacy devices -> gateway -> Redis -> worker -> SQLite + files."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

import pytest
import redis
import websockets

from tests.conftest import Processes
from tests.helpers import (
    RECEIVED,
    STORED,
    file_lines,
    legacy_device,
    legacy_frame,
    send_legacy,
    stored_rows,
    wait_until,
)

DEVICES = 20
FRAMES = 500


async def test_twenty_devices_five_hundred_frames_each(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    _, port = processes.gateway(redis_url, data_dir)
    processes.worker(redis_url, data_dir, "--files", str(data_dir / "logs"))
    url = f"ws://127.0.0.1:{port}"

    results = await asyncio.gather(
        *(legacy_device(url, f"dev-{n:02d}", FRAMES) for n in range(DEVICES))
    )
    assert all(acked == list(range(FRAMES)) for acked in results), "every frame acked"

    total = DEVICES * FRAMES
    assert wait_until(lambda: len(stored_rows(data_dir)) >= total, timeout=60)
    assert wait_until(lambda: len(file_lines(data_dir)) >= total, timeout=30)
    rows = stored_rows(data_dir)
    lines = file_lines(data_dir)
    assert len(rows) == total and len(lines) == total, "exactly once in store and files"

    per_device: dict[str, list[int]] = defaultdict(list)
    for _, device, seq, _ in rows:
        per_device[device].append(seq)
    assert per_device == {f"dev-{n:02d}": list(range(FRAMES)) for n in range(DEVICES)}

    per_device_file: dict[str, list[int]] = defaultdict(list)
    for line in lines:
        assert {"device_id", "received_at", "data"} <= line.keys()
        per_device_file[line["device_id"]].append(line["data"]["seq"])
    assert per_device_file == per_device


async def test_replies_bad_input_and_links(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port = processes.gateway(redis_url, tmp_path, "--max-frame-bytes", "4096")
    client = redis.Redis.from_url(redis_url)
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        # A frame without a record: only the first reply; the device is linked.
        await ws.send(json.dumps({"deviceId": 42, "type": 1}))
        assert await ws.recv() == RECEIVED
        assert wait_until(lambda: client.hexists("device:links", "42"), timeout=5)
        link = json.loads(client.hget("device:links", "42"))
        assert set(link) == {"node", "conn", "since"}
        assert client.exists(f"fleetlog:node:{link['node']}")

        # Bad JSON: an error frame, and the connection stays open.
        await ws.send("{not json")
        assert await ws.recv() == RECEIVED
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["code"] == "bad_json"

        # type "4" as a string, Unicode data kept as text.
        replies = await send_legacy(ws, json.dumps({"deviceId": 42, "type": "4", "data": "门已打开"}))
        assert replies == [RECEIVED, STORED]
        entry = client.xrange("fleetlog:records")[-1][1]
        assert entry[b"d"] == b"42" and entry[b"r"] == '"门已打开"'.encode()

        # Empty data is refused with a clear error, nothing queued.
        replies = await send_legacy(ws, json.dumps({"deviceId": 42, "type": 4, "data": ""}))
        assert replies[1]["code"] == "bad_frame"
        assert client.xlen("fleetlog:records") == 1

    # Disconnected: the link is removed (it still pointed at this connection).
    assert wait_until(lambda: not client.hexists("device:links", "42"), timeout=5)

    # Oversized frame: closed with 1009.
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send(legacy_frame("big", 0, blob="x" * 10_000))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for _ in range(3):
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    client.close()


async def test_newer_connection_keeps_its_link(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port = processes.gateway(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    url = f"ws://127.0.0.1:{port}"

    async def link_other_than(conn: str | None) -> str:
        """The device's link once it names a connection other than ``conn``: links are
        written by their own Redis call, which may land after the record's ack."""
        for _ in range(100):
            raw = client.hget("device:links", "D1")
            if raw is not None and json.loads(raw)["conn"] != conn:
                return str(json.loads(raw)["conn"])
            await asyncio.sleep(0.05)
        raise AssertionError(f"D1's link still {raw!r} after 5 s")

    async with websockets.connect(url) as old:
        await send_legacy(old, legacy_frame("D1", 0))
        first = await link_other_than(None)
        async with websockets.connect(url) as new:
            await send_legacy(new, legacy_frame("D1", 1))
            second = await link_other_than(first)
            assert second != first
            await old.close()
            await asyncio.sleep(0.5)
            # The old connection's disconnect must not remove the new link.
            assert json.loads(client.hget("device:links", "D1"))["conn"] == second
    client.close()


async def test_backlog_limit_answers_busy(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port = processes.gateway(redis_url, tmp_path, "--max-backlog", "5")
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        codes = []
        for seq in range(8):
            replies = await send_legacy(ws, legacy_frame("D", seq))
            codes.append(replies[1] if replies[1] == STORED else replies[1]["code"])
    assert codes == [STORED] * 5 + ["busy"] * 3
    client = redis.Redis.from_url(redis_url)
    assert client.xlen("fleetlog:records") == 5
    client.close()


async def test_legacy_list_mode_end_to_end(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    _, port = processes.gateway(redis_url, data_dir, "--queue", "list")
    url = f"ws://127.0.0.1:{port}"
    async with websockets.connect(url) as ws:
        for seq in range(50):
            frame = json.dumps({"deviceId": "L1", "type": 4, "data": {"deviceId": "L1", "seq": seq}})
            assert (await send_legacy(ws, frame))[1] == STORED
    client = redis.Redis.from_url(redis_url)
    # Exactly the original's write: the record's JSON, LPUSHed (newest first).
    assert json.loads(client.lindex("device:log:list", 0)) == {"deviceId": "L1", "seq": 49}
    client.close()
    processes.worker(redis_url, data_dir, "--queue", "list", "--batch", "7")
    assert wait_until(lambda: len(stored_rows(data_dir)) >= 50, timeout=30)
    rows = stored_rows(data_dir)
    assert [seq for _, _, seq, _ in rows] == list(range(50))
    assert {device for _, device, _, _ in rows} == {"L1"}


async def test_a_bad_device_id_is_refused_and_nothing_is_queued(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    _, port = processes.gateway(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        for bad in ("x" * 10_000, "evil\nid", "esc\x1b[2J", " padded", "bidi\u202e"):
            replies = await send_legacy(ws, legacy_frame(bad, 1))
            assert replies[0] == RECEIVED
            assert isinstance(replies[1], dict) and replies[1]["code"] == "bad_frame", replies
            await ws.send(json.dumps({"type": "log", "id": "v2", "deviceId": bad, "records": [1]}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (reply["code"], reply["id"]) == ("bad_frame", "v2")
        assert client.xlen("fleetlog:records") == 0
        assert client.hkeys("device:links") == []
        # The same record under a good id is stored.
        assert await send_legacy(ws, legacy_frame("good:id", 1)) == [RECEIVED, STORED]
    assert client.xlen("fleetlog:records") == 1
    client.close()


async def test_records_orjson_cannot_write_back_are_refused_and_the_rest_stored(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    """Nesting orjson reads but cannot write (255-1,024 levels) is ``bad_json``, the
    connection stays open; an integer no double holds is acked and stored exactly."""
    data_dir = tmp_path / "data"
    _, port = processes.gateway(redis_url, data_dir)
    processes.worker(redis_url, data_dir)
    deep = "[" * 990 + "1" + "]" * 990
    huge = "9" * 400
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        # Sent together: the replies come in frame order, each frame's pair.
        await ws.send(legacy_frame("D", 0))
        await ws.send('{"deviceId": "D", "type": 4, "data": ' + deep + "}")
        await ws.send('{"deviceId": "D", "type": 4, "data": {"seq": 1, "n": ' + huge + "}}")
        replies = [await asyncio.wait_for(ws.recv(), 10) for _ in range(6)]
    assert replies[:3] == [RECEIVED, STORED, RECEIVED]
    assert json.loads(replies[3])["code"] == "bad_json"
    assert replies[4:] == [RECEIVED, STORED]
    assert wait_until(lambda: len(stored_rows(data_dir)) >= 2, timeout=30)
    rows = stored_rows(data_dir)
    assert [seq for _, _, seq, _ in rows] == [0, 1]
    assert rows[1][3] == '{"seq":1,"n":' + huge + "}"


@pytest.mark.parametrize("fragments", [2, 1])
async def test_a_message_too_large_is_refused_after_the_acks_owed(
    redis_url: str, processes: Processes, tmp_path: Path, fragments: int
) -> None:
    """A stored frame, then a message over the limit (in two fragments, or one frame), sent
    together: the device gets the first frame's pair, then ``too_large``, then close 1009; one
    record stored.  (A single frame over the limit was closed by picows at its header, 1009
    without ``too_large`` nor the pair owed: the record stored, its device told nothing.)"""
    data_dir = tmp_path / "data"
    _, port = processes.gateway(redis_url, data_dir, "--max-frame-bytes", "4096")
    processes.worker(redis_url, data_dir)
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        await ws.send(legacy_frame("D", 0))
        if fragments == 2:
            await ws.send(iter(["x" * 3000, "x" * 3000]))  # one message in two fragments
        else:
            await ws.send("x" * 6000)
        replies = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for _ in range(5):
                replies.append(await asyncio.wait_for(ws.recv(), 10))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert replies[:2] == [RECEIVED, STORED]
    assert [json.loads(reply)["code"] for reply in replies[2:]] == ["too_large"]
    assert wait_until(lambda: len(stored_rows(data_dir)) >= 1, timeout=30)
    assert [seq for _, _, seq, _ in stored_rows(data_dir)] == [0]


async def test_a_frame_far_over_the_limit_is_refused_at_its_header(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    """A frame past what the read buffer of a frame at the limit holds (6,508 bytes here) is
    never read: close 1009 at its header.  Nothing of it is stored, and a frame acked before
    it stays stored once."""
    data_dir = tmp_path / "data"
    _, port = processes.gateway(redis_url, data_dir, "--max-frame-bytes", "4096")
    processes.worker(redis_url, data_dir)
    async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        assert await send_legacy(ws, legacy_frame("D", 0)) == [RECEIVED, STORED]
        await ws.send(legacy_frame("D", 1, pad="x" * 100_000))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert wait_until(lambda: len(stored_rows(data_dir)) >= 1, timeout=30)
    await asyncio.sleep(0.5)
    assert [seq for _, _, seq, _ in stored_rows(data_dir)] == [0]
