"""Take records off the queue for a worker, at least once, and let go of them.

Two consumers with one interface (:class:`Consumer`):

* :class:`StreamConsumer` reads a Redis Stream through a consumer group.  An
  entry is packed: the records of one gateway call (:func:`unpack_entry`; an
  entry of one record, written before packing, is read too), each with a qid
  of its own.  An entry stays in the group's pending list until :meth:`ack`
  was given all its records (stored or dead-lettered: a poison record blocks
  none of its neighbours, which are stored, and only the entry's ack waits for
  it); when a worker dies, another one claims its entries with XAUTOCLAIM once
  they have been idle for ``claim_idle`` seconds.  The ack takes the entry's
  records off the backlog counter the gateway limits
  (:func:`fleetlog.keys.queue_backlog`); acknowledged entries are trimmed
  (never one that some group has not acknowledged).
* :class:`ListConsumer` drains the original design's ``device:log:list``
  without its flaw: BLMOVE puts each batch on a processing list of its own
  before anything is written, so a worker killed mid-batch loses nothing; a
  stale batch is claimed by the next worker and replayed with the same ids
  and the same ``received_at`` (the time it was first taken), so the store
  sees the same records again.

A worker drains a queue only while it holds its lease
(:mod:`fleetlog.queue.lease`): several consumers reading one queue at once
would store a device's records out of order.

Both are blocking (redis-py's sync client): a worker has nothing else to do
while it waits, and a blocking loop is the easiest to stop cleanly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
import redis

from fleetlog import keys
from fleetlog.device_id import device_id_problem
from fleetlog.queue import scripts
from fleetlog.queue.connection import is_cluster
from fleetlog.records import QueuedRecord

__all__ = ["REDIS_REFUSING", "Consumer", "ListConsumer", "StreamConsumer"]

#: Errors that mean "Redis is up but refuses writes": ``maxmemory`` reached
#: under ``noeviction``.  Reads, XACK and XTRIM still work (they free memory).
REDIS_REFUSING: tuple[type[BaseException], ...] = (redis.exceptions.OutOfMemoryError,)

#: The store's reason kept in a dead letter: enough for any error message, and a
#: bound on what a pathological one costs the dead-letter stream.
_MAX_REASON_CHARS = 2000
#: Never look for idle records to claim more often than this (seconds), however
#: short ``claim_idle`` is: XAUTOCLAIM scans the pending list.
_MIN_CLAIM_EVERY = 0.2
#: Entries a reader asks for when it cannot know their size (an empty stream).
_FIRST_ENTRIES = 256
#: The shortest blocking read of the legacy list (ms): BLMOVE with a smaller
#: timeout would spin.
_MIN_LEGACY_BLOCK_MS = 10


class Consumer(Protocol):
    def fetch(self, count: int, block_ms: int | None) -> list[QueuedRecord]:
        """Up to ``count`` records, waiting at most ``block_ms`` for the first (None: not at all)."""

    def ack(self, records: Sequence[QueuedRecord]) -> None:
        """Let go of records that are stored (or dead-lettered) for good."""

    def dead_letter(self, record: QueuedRecord, reason: str) -> None:
        """Move a record the store keeps rejecting to the dead-letter stream."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dead_letter_fields(record: QueuedRecord, reason: str) -> dict[str, Any]:
    return {
        "qid": record.qid,
        "d": record.device_id,
        "r": record.data,
        "error": reason[:_MAX_REASON_CHARS],
        "deliveries": record.deliveries,
        "failed_at": _now_ms(),
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def entry_id(qid: str) -> str:
    """The stream entry id of a record's qid (after its shard, ``s3:``; before its place, ``.7``)."""
    return qid.rpartition(":")[2].partition(".")[0]


def packed_runs(fields: dict[bytes, bytes]) -> list[tuple[str, list[bytes]]] | None:
    """(device, its record JSONs) of each run of a packed stream entry, in queue order.

    The ingest script (:data:`~fleetlog.queue.scripts.INGEST`) writes ``n``
    records, ``r`` newline-joined, ``d`` the devices of its runs (newline-joined)
    and ``c`` the runs' lengths.  Returns None for an entry that is not packed
    (``d`` and ``r``, one record, as written before packing) and raises
    :class:`ValueError` for one whose parts do not agree.
    """
    count = fields.get(b"n")
    if count is None:
        return None
    data = fields.get(b"r", b"").split(b"\n")
    devices = fields.get(b"d", b"").split(b"\n")
    if len(devices) == 1:  # one device (the usual entry of a busy device or a v2 frame)
        if fields.get(b"c") != count or int(count) != len(data):
            raise ValueError(f"a packed entry of {count!r} records does not add up")
        return [(devices[0].decode(errors="replace"), data)]
    runs = [int(run) for run in fields.get(b"c", b"").split(b",")]
    if not (int(count) == len(data) == sum(runs)) or len(runs) != len(devices):
        raise ValueError(f"a packed entry of {count!r} records does not add up")
    out: list[tuple[str, list[bytes]]] = []
    at = 0
    for device, run in zip(devices, runs, strict=True):
        out.append((device.decode(errors="replace"), data[at:at + run]))
        at += run
    return out


def unpack_entry(fields: dict[bytes, bytes]) -> list[tuple[str, bytes]] | None:
    """(device, record JSON) of each record of a packed stream entry (:func:`packed_runs`)."""
    runs = packed_runs(fields)
    if runs is None:
        return None
    return [(device, record) for device, records in runs for record in records]


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class StreamConsumer:
    """Consumer-group reader of the records stream; see the module docstring."""

    def __init__(
        self,
        client: redis.Redis,  # redis-py's reply types depend on options: replies are Any here
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_letter_stream: str,
        claim_idle: float,
        trim_interval: float = 0.2,
        qid_prefix: str = "",
    ) -> None:
        self._client: Any = client
        self.stream = stream
        #: Put before each entry id to make the qid (``s3:`` with several shards).
        self._qid_prefix = qid_prefix
        #: After :meth:`take_over`: claim every pending entry, however recent, once.
        self._claim_all = False
        self.group = group
        self.consumer = consumer
        self._dead = dead_letter_stream
        self._claim_idle_ms = int(claim_idle * 1000)
        self._claim_every = max(claim_idle / 2, _MIN_CLAIM_EVERY)
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._own_pending_checked = False
        self._trim_interval = trim_interval
        self._next_trim = 0.0
        self._untrimmed = False
        self._backlog = keys.queue_backlog(stream)
        self._ack = client.register_script(scripts.ACK)
        self._ack_old = client.register_script(scripts.ACK.partition("\n")[2])
        self._ack_flags = True  # False: the server predates script flags
        #: Records per entry in the last read (0: none yet): how many entries the next read asks for.
        self.per_entry = 0

    def ensure_group(self) -> None:
        """Create the group (reading from the very first entry) if it is missing.

        Looks first (a read) and writes only when the group is missing: Redis
        refuses XGROUP CREATE, even of an existing group, when it is out of memory.
        """
        try:
            groups = self._client.xinfo_groups(self.stream)
        except redis.ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise
            groups = []
        if any(_text(info["name"]) == self.group for info in groups):
            return
        try:
            self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _records(self, entries: list[Any], deliveries: dict[str, int]) -> list[QueuedRecord]:
        records: list[QueuedRecord] = []
        prefix, stream = self._qid_prefix, self.stream
        for raw_id, fields in entries:
            entry = raw_id.decode()
            received, delivered = int(entry.partition("-")[0]), deliveries.get(entry, 1)
            try:
                runs = packed_runs(fields)
            except ValueError:  # cannot happen short of a bug: one record, which the store rejects
                records.append(QueuedRecord(f"{prefix}{entry}.0", "", received, fields.get(b"r", b""),
                                            delivered, stream, 1))
                continue
            if runs is not None:  # packed: the usual case
                qid = f"{prefix}{entry}."
                total = sum(len(run) for _, run in runs)
                at = 0
                for device, run in runs:
                    records += [QueuedRecord(qid + str(k), device, received, record, delivered, stream, total)
                                for k, record in enumerate(run, at)]
                    at += len(run)
                continue
            records.append(QueuedRecord(  # positional: an entry of one record, as written before packing
                prefix + entry, fields.get(b"d", b"").decode(errors="replace"),
                received, fields.get(b"r", b""), delivered, stream,
            ))
        if entries:
            self.per_entry = max(1, len(records) // len(entries))
        return records

    def entries_for(self, count: int) -> int:
        """How many entries to read for about ``count`` records (entries hold several).

        Before the first read the size of an entry is that of the stream's
        first entry (a gateway call's records, up to 2,000): reading ``count``
        entries would bring in thousands of times ``count`` records
        (``--max-messages 10`` stored 1,500).
        """
        if not self.per_entry:
            first = self._client.xrange(self.stream, count=1)
            if not first:
                return max(1, min(count, _FIRST_ENTRIES))
            self.per_entry = max(1, int(first[0][1].get(b"n", 1)))
        return max(1, count // self.per_entry)

    def take_over(self) -> None:
        """This consumer now holds the stream alone (a lease): claim every pending
        entry at once, before reading new ones, so a device's older records are
        stored before its newer ones."""
        self._claim_all = True
        self._claim_cursor = "0-0"

    def owns_pending(self) -> bool:
        """Whether entries read by this consumer are still unacknowledged."""
        return bool(self._client.xpending_range(self.stream, self.group, min="-", max="+",
                                                count=1, consumername=self.consumer))

    def _delivery_counts(self, entries: list[Any]) -> dict[str, int]:
        ids = [raw_id.decode() for raw_id, _ in entries]
        low, high = min(ids, key=_id_key), max(ids, key=_id_key)
        pending = self._client.xpending_range(
            self.stream, self.group, min=low, max=high, count=len(ids) * 2 + 10
        )
        return {row["message_id"].decode(): row["times_delivered"] for row in pending}

    def fetch(self, count: int, block_ms: int | None) -> list[QueuedRecord]:
        now = time.monotonic()
        while self._claim_all:
            claimed = self._claim(count, idle_ms=0)
            if self._claim_cursor == "0-0":
                self._claim_all = False
            if claimed:
                return claimed
        if now >= self._next_claim:
            self._next_claim = now + self._claim_every
            claimed = self._claim(count)
            if claimed:
                return claimed
        if not self._own_pending_checked:
            # Records this consumer name took in an earlier life and never acked.
            self._own_pending_checked = True
            mine = self._read("0", count, None)
            if mine:
                return mine
        records = self._read(">", count, block_ms)
        if not records and self._untrimmed:
            self.trim()  # idle now: catch up on the trims skipped while busy
        return records

    def _read(self, start: str, count: int, block_ms: int | None) -> list[QueuedRecord]:
        reply = self._client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.entries_for(count), block=block_ms
        )
        if not reply:
            return []
        entries = [entry for entry in reply[0][1] if entry[1]]
        if not entries:
            return []
        deliveries = self._delivery_counts(entries) if start != ">" else {}
        return self._records(entries, deliveries)

    def _claim(self, count: int, idle_ms: int | None = None) -> list[QueuedRecord]:
        cursor, entries, *_ = self._client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self._claim_idle_ms if idle_ms is None else idle_ms,
            start_id=self._claim_cursor,
            count=self.entries_for(count),
        )
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        entries = [entry for entry in entries if entry[1]]
        if not entries:
            return []
        return self._records(entries, self._delivery_counts(entries))

    def ack(self, records: Sequence[QueuedRecord]) -> None:
        """Acknowledge the entries whose records are all in ``records`` (the others stay pending)."""
        if records:
            done: dict[str, int] = {}
            sizes: dict[str, int] = {}
            for record in records:
                entry = entry_id(record.qid)
                done[entry] = done.get(entry, 0) + 1
                sizes[entry] = record.packed
            args: list[Any] = [self.group]
            for entry, size in sizes.items():
                if done[entry] >= size:  # an unpacked entry (0) is its one record
                    args += (entry, size)
            if len(args) > 1:
                self._acknowledge(args)
                self._untrimmed = True
        if time.monotonic() >= self._next_trim:
            self.trim()

    def _acknowledge(self, args: list[Any]) -> None:
        """XACK entries, taking their records off the backlog counter, as one step."""
        if self._ack_flags:
            try:
                self._ack(keys=[self.stream, self._backlog], args=args)
                return
            except redis.ResponseError as exc:
                text = str(exc).lower()
                if not ("compiling" in text or "shebang" in text):
                    raise
                self._ack_flags = False  # Redis < 7 reads no shebang
        self._ack_old(keys=[self.stream, self._backlog], args=args)

    def trim(self) -> int:
        """Delete the entries every group has acknowledged; return how many."""
        self._next_trim = time.monotonic() + self._trim_interval
        self._untrimmed = False
        safe: tuple[int, int] | None = None
        for info in self._client.xinfo_groups(self.stream):
            pending = self._client.xpending(self.stream, info["name"])
            if pending["pending"]:
                low = pending["min"]
                low = low.decode() if isinstance(low, bytes) else low
            else:
                last = info["last-delivered-id"]
                low = _next_id(last.decode() if isinstance(last, bytes) else last)
            if safe is None or _id_key(low) < safe:
                safe = _id_key(low)
        if safe is None or safe == (0, 1):
            return 0
        trimmed: int = self._client.xtrim(self.stream, minid=f"{safe[0]}-{safe[1]}", approximate=False)
        return trimmed

    def dead_letter(self, record: QueuedRecord, reason: str) -> None:
        """Dead-letter one record; its entry is acknowledged by :meth:`ack` with the rest of it.

        A record of a packed entry is only added to the dead letters: its
        neighbours may still be pending.  A crash before that ack redelivers the
        entry, and the record may be dead-lettered twice, never lost.
        """
        if record.packed:
            self._client.xadd(self._dead, _dead_letter_fields(record, reason))
            return
        if is_cluster(self._client):
            # Two slots: no transaction.  Dead-lettered first, so a crash between
            # the two can only dead-letter it twice, never lose it.
            self._client.xadd(self._dead, _dead_letter_fields(record, reason))
            self._client.xack(self.stream, self.group, entry_id(record.qid))
            return
        with self._client.pipeline(transaction=True) as pipe:
            pipe.xadd(self._dead, _dead_letter_fields(record, reason))
            pipe.xack(self.stream, self.group, entry_id(record.qid))
            pipe.execute()


class ListConsumer:
    """Reliable reader of the legacy ``device:log:list``; see the module docstring."""

    def __init__(self, client: redis.Redis, *, dead_letter_stream: str, claim_idle: float) -> None:
        self._client: Any = client
        self._dead = dead_letter_stream
        self._claim_idle_ms = int(claim_idle * 1000)
        self._take = client.register_script(scripts.LIST_TAKE)
        self._next_batch = client.register_script(scripts.LIST_BATCH)
        self._claim_script = client.register_script(scripts.LIST_CLAIM)
        self._open: dict[int, set[str]] = {}
        #: After :meth:`take_over`: claim every batch in flight, however recent, once;
        #: those up to this batch id are done.
        self._claim_all = False
        self._claimed_through = -1

    def take_over(self) -> None:
        """This consumer now drains the list alone (a lease): claim every batch still in
        flight, in the order they were taken, before taking new ones, so a device's
        older records are stored before its newer ones."""
        self._claim_all = True
        self._claimed_through = -1

    def fetch(self, count: int, block_ms: int | None) -> list[QueuedRecord]:
        if self._claim_all:
            claimed = self._claim_in_flight()
            if claimed is not None:
                return claimed
            self._claim_all = False
        claimed = self._claim_stale()
        if claimed is not None:
            return claimed
        client = self._client
        batch = int(self._next_batch(keys=[keys.LEGACY_BATCH_SEQ], args=[_now_ms() * 1000]))
        processing = keys.legacy_processing(batch)
        client.zadd(keys.LEGACY_INFLIGHT, {str(batch): _now_ms()})
        # Never block for as long as a batch may sit before others claim it: an
        # empty batch claimed while we block would strand the record we then take.
        block = max(_MIN_LEGACY_BLOCK_MS, min(block_ms or 0, self._claim_idle_ms // 2)) / 1000
        first = client.blmove(keys.LEGACY_LIST, processing, block, "RIGHT", "LEFT")
        if first is None:
            self._forget(batch)
            return []
        if count > 1:
            self._take(keys=[keys.LEGACY_LIST, processing], args=[count - 1])
        taken = _now_ms()
        client.hset(keys.LEGACY_RECEIVED, str(batch), taken)
        return self._batch_records(batch, deliveries=1, received_at=taken)

    def _claim_stale(self) -> list[QueuedRecord] | None:
        now = _now_ms()
        stale = self._client.zrangebyscore(
            keys.LEGACY_INFLIGHT, "-inf", now - self._claim_idle_ms, start=0, num=1, withscores=True
        )
        if not stale:
            return None
        member, score = stale[0]
        return self._claim(member, int(score), now, forget_empty=True)

    def _claim_in_flight(self) -> list[QueuedRecord] | None:
        """The first batch in flight (in the order taken) with records, claimed; None: none left.

        An empty batch taken less than ``claim_idle`` ago is left alone: its
        taker may still be moving a record into it (it is forgotten once stale).
        """
        now = _now_ms()
        in_flight = self._client.zrange(keys.LEGACY_INFLIGHT, 0, -1, withscores=True)
        for member, score in sorted(in_flight, key=lambda pair: int(pair[0])):
            if int(member) <= self._claimed_through:
                continue
            self._claimed_through = int(member)
            stale = now - int(score) >= self._claim_idle_ms
            claimed = self._claim(member, int(score), now, forget_empty=stale)
            if claimed:
                return claimed
        return None

    def _claim(self, member: bytes | str, score: int, now: int, *, forget_empty: bool
               ) -> list[QueuedRecord] | None:
        """Claim one batch in flight (compare-and-set of its claim time); its records."""
        if not self._claim_script(keys=[keys.LEGACY_INFLIGHT], args=[member, score, now]):
            return None
        batch = int(member)
        deliveries = int(self._client.hincrby(keys.LEGACY_DELIVERIES, str(batch), 1)) + 1
        received = self._client.hget(keys.LEGACY_RECEIVED, str(batch))
        if received is None:  # taken by a worker that died before noting when: now, from now on
            received = now
            self._client.hset(keys.LEGACY_RECEIVED, str(batch), now)
        records = self._batch_records(batch, deliveries, int(received))
        if not records and forget_empty:
            self._forget(batch)
        return records

    def _batch_records(self, batch: int, deliveries: int, received_at: int) -> list[QueuedRecord]:
        items = self._client.lrange(keys.legacy_processing(batch), 0, -1)
        items.reverse()  # LMOVE ... LEFT pushed the newest first
        records = []
        for index, item in enumerate(items):
            device_id = "unknown"
            try:
                value = orjson.loads(item)
                if isinstance(value, dict) and isinstance(value.get("deviceId"), str | int) and (
                        device_id_problem(str(value["deviceId"])) is None):
                    # (Not a valid id, 4,000 characters or a NUL: under "unknown", its data whole;
                    # as the device id of a row it stopped PostgreSQL's worker for good.)
                    device_id = str(value["deviceId"])
            except orjson.JSONDecodeError:
                pass
            records.append(QueuedRecord(f"L{batch}-{index}", device_id, received_at, item, deliveries))
        if records:
            self._open[batch] = {record.qid for record in records}
        return records

    def _forget(self, batch: int) -> None:
        with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(keys.legacy_processing(batch))
            pipe.zrem(keys.LEGACY_INFLIGHT, str(batch))
            pipe.hdel(keys.LEGACY_DELIVERIES, str(batch))
            pipe.hdel(keys.LEGACY_RECEIVED, str(batch))
            pipe.execute()
        self._open.pop(batch, None)

    def ack(self, records: Sequence[QueuedRecord]) -> None:
        for record in records:
            batch = int(record.qid[1:].partition("-")[0])
            outstanding = self._open.get(batch)
            if outstanding is None:
                continue
            outstanding.discard(record.qid)
            if not outstanding:
                self._forget(batch)

    def dead_letter(self, record: QueuedRecord, reason: str) -> None:
        self._client.xadd(self._dead, _dead_letter_fields(record, reason))
