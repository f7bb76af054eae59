"""Counting v2 devices: the ledger a fault scenario settles against the store.

Each device sends v2 ``log`` frames (an id, a session, records with ``seq``),
one at a time, and keeps every frame until it is acked: after ``busy``,
``unavailable``, ``unconfirmed`` or ``rate_limited``, and after a connection
lost or a reply that did not come in time, it sends the same frame (same id)
again, on a new connection if need be.

The :class:`Ledger` counts what the devices saw: frames sent, records acked,
refusals by code, lost connections, duplicate acks, and the answers each frame
got on its way (its history).  It finds a *lying refusal* two ways:

* a frame acked as a duplicate (``"duplicate": true``, or seqs listed in
  ``duplicates``) although every earlier attempt was answered with a code that
  promises nothing was written (``busy``, ``unavailable``, ``rate_limited``):
  no attempt of it that may have stored it (``unconfirmed``, a lost connection
  or a reply that never came) came before, so a refusal stored it;
* (:meth:`Ledger.refused_but_stored`, against the store) a frame never acked
  whose every answer was such a refusal, yet whose records are stored.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import websockets

#: Codes after which a device sends the same frame again.
RETRY = frozenset({"busy", "unavailable", "unconfirmed", "rate_limited"})
#: Codes that promise nothing of the frame was written.
NOT_STORED = frozenset({"busy", "unavailable", "rate_limited"})
#: A history entry for an attempt that may have stored the frame without an ack.
LOST = "lost"


@dataclass
class Frame:
    device: str
    seqs: range
    history: list[str] = field(default_factory=list)  # answers before the ack, in order
    acked: bool = False
    lost_at: float | None = None  # when (monotonic) an attempt last lost its connection


@dataclass
class Ledger:
    """What the devices sent and were told; shared by every device of a run (one loop)."""

    sent: int = 0  # frames sent (every attempt)
    records_sent: int = 0  # records in those frames
    acked: set[tuple[str, int]] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)
    lost_connection: int = 0
    duplicate_acks: int = 0
    #: Frame ids acked as duplicates after nothing but not-stored refusals.
    lying: list[str] = field(default_factory=list)
    frames: dict[str, Frame] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)  # monotonic, one per ack
    #: Seconds from a frame's lost connection to its ack (reconnected, resent).
    reacked_after: list[float] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # replies no scenario expects

    def ack(self, frame_id: str, reply: dict[str, Any]) -> None:
        frame = self.frames[frame_id]
        if reply.get("duplicate") or reply.get("duplicates"):
            self.duplicate_acks += 1
            if not any(answer not in NOT_STORED for answer in frame.history):
                self.lying.append(frame_id)  # stored before, yet only refusals came back
        now = time.monotonic()
        frame.acked = True
        self.acked.update((frame.device, seq) for seq in frame.seqs)
        self.ack_times.append(now)
        if frame.lost_at is not None:
            self.reacked_after.append(now - frame.lost_at)

    def first_ack_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` (monotonic) to the first ack after it; None: no ack since."""
        later = [at for at in self.ack_times if at >= moment]
        return min(later) - moment if later else None

    def unacked(self) -> list[str]:
        return [frame_id for frame_id, frame in self.frames.items() if not frame.acked]

    def refused_but_stored(self, stored: Counter[tuple[str, int]] | set[tuple[str, int]]) -> list[str]:
        """Frames a refusal promised were not written, never resent to an ack, yet stored:
        the ledger's lying refusals and the frames the store convicts."""
        convicted = [frame_id for frame_id, frame in self.frames.items()
                     if not frame.acked and frame.history
                     and all(answer in NOT_STORED for answer in frame.history)
                     and any((frame.device, seq) in stored for seq in frame.seqs)]
        return self.lying + convicted

    def summary(self) -> str:
        refused = ", ".join(f"{code} {count}" for code, count in sorted(self.refused.items())) or "none"
        return (f"sent {self.sent} frames ({self.records_sent} records); refused: {refused}; "
                f"{self.lost_connection} lost connections; {self.duplicate_acks} duplicate acks")


async def device(url: str, name: str, ledger: Ledger, *, stop_at: float, give_up_at: float,
                 records: int = 10, pause: float = 0.05, recv_timeout: float = 15.0,
                 max_frames: int = 10_000) -> None:
    """Send frames of ``records`` records until ``stop_at`` (monotonic), ``pause`` s apart;
    the frame in hand is sent until acked, or until ``give_up_at``."""
    ws: Any = None
    number = 0
    try:
        while number < max_frames and time.monotonic() < stop_at:
            frame_id = f"{name}-f{number}"
            seqs = range(number * records, (number + 1) * records)
            frame = ledger.frames[frame_id] = Frame(name, seqs)
            text = json.dumps({"type": "log", "id": frame_id, "deviceId": name, "session": "s1",
                               "records": [{"seq": seq, "msg": f"{name} record {seq}"} for seq in seqs]})
            attempt = 0
            while not frame.acked and time.monotonic() < give_up_at:
                attempt += 1
                try:
                    if ws is None:
                        ws = await websockets.connect(url, open_timeout=5, close_timeout=1,
                                                      ping_interval=None)
                except (OSError, websockets.WebSocketException, TimeoutError):
                    ws = None
                    await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
                    continue
                try:
                    ledger.sent += 1
                    ledger.records_sent += records
                    await ws.send(text)
                    reply = json.loads(await asyncio.wait_for(ws.recv(), recv_timeout))
                except (OSError, websockets.WebSocketException, TimeoutError):
                    frame.history.append(LOST)  # sent, perhaps in part: it may have been stored
                    frame.lost_at = time.monotonic()
                    ledger.lost_connection += 1
                    await _drop(ws)
                    ws = None
                    await asyncio.sleep(0.1)
                    continue
                if reply.get("id") != frame_id:
                    ledger.unexpected.append(f"{frame_id}: reply for another frame: {reply}")
                    await _drop(ws)
                    ws = None
                    frame.history.append(LOST)
                    continue
                if reply.get("type") == "ack":
                    ledger.ack(frame_id, reply)
                    continue
                code = str(reply.get("code"))
                ledger.refused[code] += 1
                frame.history.append(code)
                if code not in RETRY:
                    ledger.unexpected.append(f"{frame_id}: {reply}")
                    return
                await asyncio.sleep(max(0.1, reply.get("retry_after_ms", 0) / 1000))
            if not frame.acked:
                return  # given up: the ledger shows it unacked
            number += 1
            await asyncio.sleep(pause)
    finally:
        if ws is not None:
            await _drop(ws)


async def _drop(ws: Any) -> None:
    try:
        await asyncio.wait_for(ws.close(), 2)
    except Exception:  # a dead connection: nothing to close cleanly
        pass


class Devices:
    """``count`` counting devices in a thread of their own, so the test's thread injects faults.

    They send for ``seconds``; the frame each holds then is sent until acked, for
    at most ``grace`` seconds more.
    """

    def __init__(self, url: str, count: int, *, seconds: float, grace: float = 60.0,
                 prefix: str = "dev", **options: Any) -> None:
        self.ledger = Ledger()
        self.started = time.monotonic()
        self._error: BaseException | None = None

        async def run() -> None:
            stop_at = time.monotonic() + seconds
            await asyncio.gather(*(device(url, f"{prefix}-{n:02d}", self.ledger, stop_at=stop_at,
                                          give_up_at=stop_at + grace, **options)
                                   for n in range(count)))

        def main() -> None:
            try:
                asyncio.run(run())
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=main, name="devices", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> Ledger:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the devices did not finish within {timeout} s"
        if self._error is not None:
            raise self._error
        return self.ledger
