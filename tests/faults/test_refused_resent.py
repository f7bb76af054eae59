"""Fault scenario: pipelining devices hit the backlog limit and resend refused frames out of order.

A device that keeps several frames in flight gets ``busy`` for some and acks
for later ones; it sends the refused ones again afterwards.  Every one of them
must be stored: a refusal changes no dedupe state, so a resend is never
mistaken for a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import websockets

from tests.faults.harness import Fleet

DEVICES = 20
FRAMES = 40
RECORDS = 10
WINDOW = 8


async def _device(url: str, device: str, refused: list[int]) -> None:
    """Send every frame with up to WINDOW in flight; resend the refused until all are acked."""
    pending = list(range(FRAMES))
    deadline = time.monotonic() + 120
    async with websockets.connect(url) as ws:
        while pending and time.monotonic() < deadline:
            retry: list[int] = []
            for start in range(0, len(pending), WINDOW):
                window = pending[start:start + WINDOW]
                for frame in window:
                    records = [{"seq": frame * RECORDS + n, "msg": f"{device} {frame}/{n}"}
                               for n in range(RECORDS)]
                    await ws.send(json.dumps({"type": "log", "id": f"f{frame}", "deviceId": device,
                                              "session": "boot-1", "records": records}))
                for frame in window:  # replies come in frame order
                    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    assert reply["id"] == f"f{frame}"
                    if reply["type"] != "ack":
                        assert reply["code"] == "busy", reply
                        refused.append(frame)
                        retry.append(frame)
            pending = retry
            if pending:
                await asyncio.sleep(0.2)
    assert not pending, f"{device}: {len(pending)} frames never acked"


async def _fleet(url: str) -> list[int]:
    refused: list[int] = []
    await asyncio.gather(*(_device(url, f"pipe-{n:02d}", refused) for n in range(DEVICES)))
    return refused


def test_busy_frames_resent_out_of_order_are_stored(fleet: Fleet) -> None:
    fleet.start_gateway("--max-backlog", "400")
    worker = fleet.start_worker("--batch", "100")
    worker.send_signal(signal.SIGSTOP)  # the queue backs up: the gateway answers busy
    runner = asyncio.new_event_loop()
    try:
        task = runner.create_task(_fleet(fleet.url))
        runner.run_until_complete(asyncio.sleep(1.5))
        worker.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        refused = runner.run_until_complete(task)
    finally:
        runner.close()
    assert len(refused) > 0, "the scenario did refuse frames"
    fleet.acked_file = fleet.tmp / "acked.json"
    fleet.acked_file.write_text(json.dumps({f"pipe-{n:02d}": FRAMES * RECORDS for n in range(DEVICES)}))
    outcome = fleet.verify_clean(
        "backlog full: busy frames resent out of order", time.monotonic() - resumed,
        f"{len(refused)} busy replies, each frame resent after later ones were acked")
    assert outcome.acked == DEVICES * FRAMES * RECORDS
