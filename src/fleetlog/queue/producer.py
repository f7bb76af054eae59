"""Queue records from many connections with one Redis call per event-loop turn.

A gateway calls :meth:`Producer.submit` from its frame handlers; nothing is
awaited there.  One flusher task wakes once per loop turn, sends every record
submitted since in one atomic Lua call, and then calls each submitter back
with the outcome.  Only one call is in flight at a time: records reach Redis
in the order they were submitted, so one device's records keep their order,
and the batch grows by itself when Redis is slower than the devices.

A callback is called with ``None`` once Redis acknowledged the write (with
``appendfsync always``, once it is on disk), or with the exception that says
why the records are not queued: :class:`QueueFull` or :class:`QueueUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import redis.asyncio
import redis.exceptions

from fleetlog import keys
from fleetlog.errors import FleetlogError, QueueFull, QueueUnavailable
from fleetlog.queue import scripts
from fleetlog.queue.connection import REDIS_DOWN

__all__ = ["Done", "IngestResult", "Producer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What Redis did with one submission (see :func:`fleetlog.protocol.ack_frame`)."""

    duplicate_frame: bool = False
    duplicates: list[int] = field(default_factory=list)
    stored_through: int | None = None
    missing: list[tuple[int, int]] = field(default_factory=list)


_QUEUED: Final = IngestResult()

#: Called once per submission with its result, or the reason nothing was queued.
Done = Callable[[IngestResult | FleetlogError], None]

#: Records per Lua call: big enough to amortise the round trip, small enough
#: that one call does not stall Redis for other clients.
_MAX_PER_CALL: Final = 2000


def _result(raw: Any) -> IngestResult:
    duplicate_frame, duplicates, through, missing = raw
    if not duplicate_frame and not duplicates and through == -1:
        return _QUEUED
    return IngestResult(
        bool(duplicate_frame),
        [int(seq) for seq in duplicates],
        None if through == -1 else int(through),
        [(int(missing[n]), int(missing[n + 1])) for n in range(0, len(missing), 2)],
    )


class Producer:
    """Batches submissions into atomic Lua calls; see the module docstring."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        mode: Literal["stream", "list"],
        stream: str,
        max_backlog: int,
        dedupe_window: int = 86_400,
    ) -> None:
        self._key = stream if mode == "stream" else keys.LEGACY_LIST
        self._script = client.register_script(scripts.INGEST)
        self._head = [max_backlog, dedupe_window, mode]
        self._args: list[bytes | str | int] = []
        self._waiting: list[tuple[Done, int, int]] = []  # callback, records, args
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.calls = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="producer")

    def submit(
        self,
        device_id: str,
        records: Sequence[bytes],
        done: Done,
        *,
        seqs: Sequence[int | None] | None = None,
        session: str = "",
        frame_id: str | None = None,
    ) -> None:
        """Queue one device's records together; ``done`` is called once for all.

        With ``frame_id``, a second submission of the same id within the dedupe
        window queues nothing and reports ``duplicate_frame``.  With ``seqs``,
        records whose seq was already queued are skipped and reported.
        """
        args = self._args
        before = len(args)
        tracked = seqs is not None and any(seq is not None for seq in seqs)
        args += (
            keys.frame_seen(device_id, frame_id) if frame_id is not None else "",
            device_id,
            keys.seq_state(device_id, session) if tracked else "",
            keys.seq_above(device_id, session) if tracked else "",
            len(records),
        )
        if tracked:
            assert seqs is not None
            for seq, record in zip(seqs, records, strict=True):
                args += ("" if seq is None else str(seq), record)
        else:
            for record in records:
                args += ("", record)
        self._waiting.append((done, len(records), len(args) - before))
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            if self._waiting:
                await self._flush()
            elif self._closing:
                return
            else:
                await self._wakeup.wait()
                self._wakeup.clear()

    def _take(self) -> tuple[list[bytes | str | int], list[Done]]:
        """Take whole submissions, up to about ``_MAX_PER_CALL`` records."""
        records = 0
        cut = 0
        width = 0
        for _, size, arg_count in self._waiting:
            if cut and records + size > _MAX_PER_CALL:
                break
            records += size
            width += arg_count
            cut += 1
        taken = [done for done, _, _ in self._waiting[:cut]]
        del self._waiting[:cut]
        args = self._args[:width]
        del self._args[:width]
        return args, taken

    async def _flush(self) -> None:
        args, callbacks = self._take()
        outcomes: list[IngestResult | FleetlogError]
        try:
            self.calls += 1
            reply = await self._script(keys=[self._key], args=[*self._head, *args])
            if isinstance(reply, int):
                full = QueueFull(f"queue backlog is {reply} records, over its limit")
                outcomes = [full] * len(callbacks)
            else:
                outcomes = [_result(raw) for raw in reply]
        except REDIS_DOWN as exc:
            outcomes = [QueueUnavailable(f"Redis unavailable: {exc}")] * len(callbacks)
        except redis.exceptions.ResponseError as exc:  # OOM, MISCONF (disk), READONLY ...
            outcomes = [QueueUnavailable(f"Redis refused the write: {exc}")] * len(callbacks)
        for done, outcome in zip(callbacks, outcomes, strict=True):
            try:
                done(outcome)
            except Exception:  # one connection's bug must not stall the others
                log.exception("producer callback failed")

    async def close(self) -> None:
        """Flush what is pending (callbacks included), then stop the flusher."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
