"""Gateway shutdown (SIGTERM) while devices stream: no acked record lost, no frame left hanging.

Order of a shutdown: stop reading from every device, answer every frame read
(ack or error), then close with 1001.  A frame without a reply when its
connection closed was not acked: the device sends it again.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import websockets

from fleetlog.embedded import RedisServer
from tests.conftest import Processes
from tests.helpers import RECEIVED, STORED, legacy_frame, send_legacy, stored_rows, wait_until

#: Rate limits out of the way: these devices send as fast as the gateway answers.
FAST = {"FLEETLOG_RATE_RECORDS": "1000000", "FLEETLOG_RATE_BYTES": "1000000000"}
WINDOW = 64  # frames a device has in flight
MAX_FRAMES = 200_000


@dataclass
class Stream:
    """What one device sent and what it was answered, frame by frame."""

    device: str
    sent: int = 0
    outcomes: list[str] = field(default_factory=list)  # "ack" or an error code, in frame order
    close_code: int | None = None


async def stream_until_closed(url: str, stream: Stream) -> None:
    """Send legacy frames with up to :data:`WINDOW` in flight until the gateway closes."""
    async with websockets.connect(url, max_size=None) as ws:

        async def send() -> None:
            while stream.sent < MAX_FRAMES:
                if stream.sent - len(stream.outcomes) >= WINDOW:
                    await asyncio.sleep(0.001)
                    continue
                await ws.send(legacy_frame(stream.device, stream.sent))
                stream.sent += 1

        async def receive() -> None:
            while True:
                assert await ws.recv() == RECEIVED
                reply = await ws.recv()
                stream.outcomes.append("ack" if reply == STORED else json.loads(reply)["code"])

        sender = asyncio.ensure_future(send())
        try:
            await asyncio.wait_for(receive(), 60)
        except websockets.ConnectionClosed as closed:
            stream.close_code = closed.rcvd.code if closed.rcvd else None
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


async def test_sigterm_while_devices_stream_loses_no_acked_record(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    gateway, port = processes.gateway(redis_url, data_dir, env=FAST)
    streams = [Stream(f"dev-{n}") for n in range(5)]
    devices = asyncio.gather(*(stream_until_closed(f"ws://127.0.0.1:{port}", s) for s in streams))
    for _ in range(400):  # up to 20 s
        if sum(len(s.outcomes) for s in streams) >= 2000:
            break
        await asyncio.sleep(0.05)
    gateway.send_signal(signal.SIGTERM)
    await asyncio.wait_for(devices, 30)
    assert await asyncio.to_thread(gateway.wait, 20) == 0

    for stream in streams:
        assert stream.close_code == 1001, stream.close_code
        # Replies come in frame order: each frame got one, or none if the connection
        # closed first (not acked: the device's to send again).
        assert len(stream.outcomes) <= stream.sent
        assert set(stream.outcomes) <= {"ack", "unavailable"}, "every reply: an ack or an error"
    acked = {(s.device, seq) for s in streams for seq, o in enumerate(s.outcomes) if o == "ack"}
    assert len(acked) >= 2000

    # What was refused (`unavailable`) is sent again, to the next gateway: stored once.
    refused = [(s.device, seq) for s in streams for seq, o in enumerate(s.outcomes) if o == "unavailable"]
    _, port = processes.gateway(redis_url, data_dir, env=FAST)
    if refused:
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            for device, seq in refused:
                assert await send_legacy(ws, legacy_frame(device, seq)) == [RECEIVED, STORED]

    processes.worker(redis_url, data_dir)
    wanted = acked | set(refused)
    assert wait_until(lambda: len(stored_rows(data_dir)) >= len(wanted), timeout=60)
    stored = [(device, seq) for _, device, seq, _ in stored_rows(data_dir)]
    assert acked <= set(stored), f"acked but not stored: {sorted(acked - set(stored))[:10]}"
    assert set(refused) <= set(stored), "a refused frame sent again is stored"
    assert len(stored) == len(set(stored)), "nothing stored twice"


async def test_second_sigterm_forces_the_exit(
    private_redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    """Shutdown waits (bounded) for Redis to answer the frames in flight; a second signal does not."""
    gateway, port = processes.gateway(private_redis.url, tmp_path / "data",
                                      env={"FLEETLOG_REDIS_TIMEOUT": "20"})
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        assert await send_legacy(ws, legacy_frame("D", 0)) == [RECEIVED, STORED]
        private_redis.process.send_signal(signal.SIGSTOP)  # Redis hangs: the next frame waits
        try:
            await ws.send(legacy_frame("D", 1))
            await asyncio.sleep(0.5)  # read and handed to the producer, whose call hangs
            gateway.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            assert gateway.poll() is None, "the first signal waits for the reply in flight"
            gateway.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(gateway.wait, 5) == 1
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
