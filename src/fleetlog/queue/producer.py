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
from typing import Final, Literal

import redis.asyncio
import redis.exceptions

from fleetlog import keys
from fleetlog.errors import FleetlogError, QueueFull, QueueUnavailable
from fleetlog.queue import scripts
from fleetlog.queue.connection import REDIS_DOWN

__all__ = ["Done", "Producer"]

log = logging.getLogger(__name__)

#: Called once per submission with ``None`` (queued) or the reason it was not.
Done = Callable[[FleetlogError | None], None]

#: Records per Lua call: big enough to amortise the round trip, small enough
#: that one call does not stall Redis for other clients.
_MAX_PER_CALL: Final = 2000


class Producer:
    """Batches submissions into atomic Lua calls; see the module docstring."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        mode: Literal["stream", "list"],
        stream: str,
        max_backlog: int,
    ) -> None:
        self._client = client
        self._key = stream if mode == "stream" else keys.LEGACY_LIST
        self._script = client.register_script(
            scripts.STREAM_INGEST if mode == "stream" else scripts.LIST_INGEST
        )
        self._max_backlog = max_backlog
        self._records: list[bytes | str] = []
        self._waiting: list[tuple[Done, int]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.calls = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="producer")

    def submit(self, records: Sequence[tuple[str, bytes]], done: Done) -> None:
        """Queue ``(device_id, record_json)`` pairs; ``done`` is called once for all."""
        append = self._records.append
        for device_id, record in records:
            append(device_id)
            append(record)
        self._waiting.append((done, len(records)))
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

    def _take(self) -> tuple[list[bytes | str], list[Done]]:
        """Take whole submissions, up to about ``_MAX_PER_CALL`` records."""
        count = 0
        cut = 0
        for _done, size in self._waiting:
            if cut and count + size > _MAX_PER_CALL:
                break
            count += size
            cut += 1
        taken = [done for done, _ in self._waiting[:cut]]
        del self._waiting[:cut]
        args = self._records[: 2 * count]
        del self._records[: 2 * count]
        return args, taken

    async def _flush(self) -> None:
        args, callbacks = self._take()
        outcome: FleetlogError | None = None
        try:
            self.calls += 1
            result = await self._script(keys=[self._key], args=[self._max_backlog, *args])
            if isinstance(result, int):
                outcome = QueueFull(f"queue backlog is {result} records, over its limit")
        except REDIS_DOWN as exc:
            outcome = QueueUnavailable(f"Redis unavailable: {exc}")
        except redis.exceptions.ResponseError as exc:  # OOM, MISCONF (disk), READONLY ...
            outcome = QueueUnavailable(f"Redis refused the write: {exc}")
        for done in callbacks:
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
