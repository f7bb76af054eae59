"""The dead-letter stream: records the store kept rejecting, with why, for a human to decide.

A worker moves a record here after ``--max-deliveries`` failed attempts
(:meth:`~fleetlog.queue.consumer.StreamConsumer.dead_letter`), with its device,
its JSON, the last error and the delivery count.  ``fleetlog dlq`` lists and
shows them, replays them into the queue (once the cause is fixed) or purges them.

Replay puts a record back on the queue it came from: the records stream, or in
``--queue list`` mode ``device:log:list`` (LPUSHed as the original gateway did,
so a list worker takes it like any other).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import redis

from fleetlog import keys
from fleetlog.errors import FleetlogError
from fleetlog.records import iso_ms

__all__ = ["DeadLetter", "DeadLetters"]

#: Dead letters listed at most by default: a screenful to scroll, one cheap XRANGE.
_LIST_LIMIT = 1000
#: Dead letters replayed at most by one ``replay`` of all: bounds the memory and
#: time of one command; run it again for more.
_REPLAY_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    qid: str
    device_id: str
    record: bytes
    error: str
    deliveries: int
    failed_at: str

    def as_dict(self, *, with_record: bool = True) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id, "qid": self.qid, "device_id": self.device_id, "error": self.error,
            "deliveries": self.deliveries, "failed_at": self.failed_at,
        }
        if with_record:
            row["record"] = self.record.decode(errors="replace")
        return row


def _letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode(errors="replace")

    failed = text(b"failed_at")
    return DeadLetter(
        entry_id.decode(), text(b"qid"), text(b"d"), fields.get(b"r", b""), text(b"error"),
        int(fields.get(b"deliveries", b"0") or 0), iso_ms(int(failed)) if failed.isdigit() else failed,
    )


class DeadLetters:
    """``fleetlog dlq`` on a blocking Redis client."""

    def __init__(self, client: Any, *, dead_letter_stream: str, stream: str,
                 queue: Literal["stream", "list"] = "stream", shards: int = 1) -> None:
        self._client = client
        self._dead = dead_letter_stream
        self._stream = stream
        self._queue = queue
        self._shards = shards

    def letters(self, limit: int = _LIST_LIMIT) -> list[DeadLetter]:
        return [_letter(i, f) for i, f in self._client.xrange(self._dead, count=limit)]

    def show(self, entry_id: str) -> DeadLetter | None:
        """The dead letter ``entry_id``, or ``None``; ValueError for what is no entry id."""
        found = self._client.xrange(self._dead, min=_entry_id(entry_id), max=entry_id)
        return _letter(*found[0]) if found else None

    def replay(self, entry_ids: list[str] | None = None) -> int:
        """Queue dead letters again (all when ``entry_ids`` is None); return how many.

        Each goes back to its queue and leaves the dead-letter stream in one
        transaction, which runs only if the stream did not change since the
        letter was read (``WATCH``): two replays at once queue a letter once.
        ValueError for what is no entry id.
        """
        ids = [letter.id for letter in self.letters(limit=_REPLAY_LIMIT)] if entry_ids is None \
            else [_entry_id(entry_id) for entry_id in entry_ids]
        return sum(self._replay_one(entry_id) for entry_id in ids)

    def _replay_one(self, entry_id: str) -> bool:
        with self._client.pipeline(transaction=True) as pipe:
            for _ in range(_REPLAY_TRIES):
                try:
                    pipe.watch(self._dead)
                    found = pipe.xrange(self._dead, min=entry_id, max=entry_id)
                    if not found:
                        return False  # replayed or purged meanwhile, or never there
                    letter = _letter(*found[0])
                    pipe.multi()
                    if self._queue == "list":
                        pipe.lpush(keys.LEGACY_LIST, letter.record)
                    else:
                        stream = keys.shard_stream(
                            self._stream, keys.shard_of(letter.device_id, self._shards), self._shards)
                        pipe.xadd(stream, {"d": letter.device_id, "r": letter.record})
                    pipe.xdel(self._dead, letter.id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue  # the stream changed (a new dead letter, another replay): read again
        raise FleetlogError(f"dead letter {entry_id}: the dead-letter stream keeps changing; try again")

    def purge(self, entry_ids: list[str] | None = None) -> int:
        """Delete dead letters for good (all when ``entry_ids`` is None); ValueError for what
        is no entry id."""
        if entry_ids is None:
            count: int = self._client.xlen(self._dead)
            self._client.delete(self._dead)
            return count
        ids = [_entry_id(entry_id) for entry_id in entry_ids]
        deleted: int = self._client.xdel(self._dead, *ids) if ids else 0
        return deleted


#: Reads of the dead-letter stream one replay may need while it keeps changing.
_REPLAY_TRIES = 20
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _entry_id(text: str) -> str:
    """``text`` if it is a stream entry id (``1733480000000-0``); ValueError otherwise."""
    if not _ENTRY_ID.fullmatch(text):
        raise ValueError(f"{text!r} is not a dead letter id (like 1733480000000-0: see `fleetlog dlq list`)")
    return text
