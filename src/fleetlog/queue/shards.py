"""Workers split the queue's shards between them: a lease per shard, renewed, rebalanced.

With ``--shards N`` the queue is N streams (``fleetlog:{s3}:records``); with
the default ``--shards 1`` it is the one stream ``fleetlog:records``, leased
as a whole the same way.  A worker reads only the shards it holds a lease on
(:class:`~fleetlog.queue.lease.Lease`): a string key per shard
(``fleetlog:{s3}:records:lease``; ``fleetlog:records:lease`` with one shard),
value the worker's consumer name, renewed every third of its life by a
compare-and-expire script, so a worker that dies loses its shards within one
lease and another takes them.  Holding a shard alone is what keeps a device's
records in order across workers (see :mod:`fleetlog.queue.lease`): on taking
a shard the new holder first claims every entry the group still has pending
there (:meth:`StreamConsumer.take_over`), then reads new ones.  Parallelism is
the number of shards: a worker beyond one per shard is a hot standby.

Balance: every worker announces itself in a sorted set (score: until when it
counts as alive) and aims for ``ceil(shards / live workers)`` shards.  Above
that it gives back shards on which it has nothing unacknowledged (checked
between batches, so nothing it read is left for the next holder to reorder);
below, it takes free ones, starting at a place of its own (CRC-32 of its
name) so workers do not all race for shard 0.  Every key touched is one key
per command, so this works unchanged on a Redis Cluster.  Leases are renewed
(and taken) even while Redis refuses writes for lack of memory: draining is
what frees it.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Sequence
from typing import Any

from fleetlog import keys
from fleetlog.queue.consumer import REDIS_REFUSING, StreamConsumer
from fleetlog.queue.lease import RELEASE, RENEW, Lease
from fleetlog.records import QueuedRecord

__all__ = ["RELEASE", "RENEW", "ShardedConsumer"]

log = logging.getLogger("fleetlog.worker")


class ShardedConsumer:
    """A :class:`~fleetlog.queue.consumer.Consumer` over the shards this worker holds."""

    def __init__(
        self,
        client: Any,
        *,
        stream: str,
        shards: int,
        group: str,
        consumer: str,
        dead_letter_stream: str,
        claim_idle: float,
        lease: float,
        multi_stream_reads: bool = True,
    ) -> None:
        self._client = client
        self._base = stream
        self.shards = shards
        self.group = group
        self.consumer = consumer
        self._dead = dead_letter_stream
        self._claim_idle = claim_idle
        self._lease_ms = int(lease * 1000)
        self._balance_every = lease / 3
        self._next_balance = 0.0
        #: One XREADGROUP over every held stream (one Redis); a cluster waits per shard.
        self._multi = multi_stream_reads
        self._leases = [Lease(client, keys.shard_lease(stream, shard, shards), consumer, lease)
                        for shard in range(shards)]
        self._start = zlib.crc32(consumer.encode()) % shards
        self._rotation = 0
        #: The shards held now: shard -> its consumer.
        self.held: dict[int, StreamConsumer] = {}
        self._by_stream: dict[str, StreamConsumer] = {}

    # -- leases ------------------------------------------------------------------

    def balance(self) -> None:
        """Renew what is held, give back what is over the fair share, take what is free.

        The renewals come first and the next balance is due a third of a lease
        after they were sent: a worker reads only within its leases' life.
        """
        started = time.monotonic()
        for shard in list(self.held):
            if not self._leases[shard].renew():
                log.warning("lost the lease on shard %d (expired); another worker has it", shard)
                self._drop(shard)
        self._next_balance = started + self._balance_every
        live = self._live_workers()
        target = math.ceil(self.shards / live)
        for shard in sorted(self.held, reverse=True)[:max(0, len(self.held) - target)]:
            if not self.held[shard].owns_pending():
                self._leases[shard].release()
                self._drop(shard)
                log.info("gave shard %d back (%d live workers)", shard, live)
        for step in range(self.shards):
            if len(self.held) >= target:
                break
            shard = (self._start + step) % self.shards
            if shard in self.held:
                continue
            if self._leases[shard].acquire():
                self._take(shard)

    def _live_workers(self) -> int:
        """Announce this worker; the number alive (1 at least, and while Redis refuses writes)."""
        client = self._client
        now_ms = int(time.time() * 1000)
        workers = keys.shard_workers(self._base)
        try:
            client.zadd(workers, {self.consumer: now_ms + self._lease_ms})
            client.zremrangebyscore(workers, "-inf", now_ms)
        except REDIS_REFUSING as exc:  # out of memory: keep the shards, count the others as before
            log.debug("live workers not updated (%s)", exc)
        return max(1, int(client.zcount(workers, now_ms, "+inf")))

    def _take(self, shard: int) -> None:
        stream = keys.shard_stream(self._base, shard, self.shards)
        consumer = StreamConsumer(
            self._client, stream=stream, group=self.group, consumer=self.consumer,
            dead_letter_stream=self._dead, claim_idle=self._claim_idle,
            qid_prefix=f"s{shard}:" if self.shards > 1 else "",
        )
        consumer.ensure_group()
        consumer.take_over()
        self.held[shard] = consumer
        self._by_stream[stream] = consumer
        log.info("took shard %d (%s)", shard, stream)

    def _drop(self, shard: int) -> None:
        consumer = self.held.pop(shard)
        self._by_stream.pop(consumer.stream, None)

    def close(self) -> None:
        """Give every lease back and leave the live set: the others take over at once."""
        for shard in list(self.held):
            self._leases[shard].release()
            self._drop(shard)
        self._client.zrem(keys.shard_workers(self._base), self.consumer)

    # -- Consumer -------------------------------------------------------------------

    def fetch(self, count: int, block_ms: int | None) -> list[QueuedRecord]:
        if time.monotonic() >= self._next_balance:
            self.balance()
        held = sorted(self.held)
        wait_ms = min(block_ms or 0, int(self._balance_every * 1000))
        if not held:
            time.sleep(wait_ms / 1000)
            return []
        # Without waiting, each shard in turn (claims first), so none is starved.
        for step in range(len(held)):
            shard = held[(self._rotation + step) % len(held)]
            records = self.held[shard].fetch(count, None)
            if records:
                self._rotation = (self._rotation + step + 1) % len(held)
                return records
        if not wait_ms:
            return []
        if not self._multi:
            per_shard = max(1, wait_ms // len(held))
            for shard in held:
                records = self.held[shard].fetch(count, per_shard)
                if records:
                    return records
            return []
        reply = self._client.xreadgroup(
            self.group, self.consumer, {self.held[shard].stream: ">" for shard in held},
            count=self.held[held[0]].entries_for(count), block=wait_ms)
        records = []
        for raw_stream, entries in reply or []:
            name = raw_stream.decode() if isinstance(raw_stream, bytes) else raw_stream
            consumer = self._by_stream.get(name)
            if consumer is not None:
                records += consumer._records([entry for entry in entries if entry[1]], {})
        return records

    def _grouped(self, records: Sequence[QueuedRecord]) -> dict[str, list[QueuedRecord]]:
        grouped: dict[str, list[QueuedRecord]] = {}
        for record in records:
            grouped.setdefault(record.stream, []).append(record)
        return grouped

    def _consumer_of(self, stream: str) -> StreamConsumer:
        consumer = self._by_stream.get(stream)
        if consumer is None:  # the lease was lost meanwhile: ack anyway, it was stored
            shard = next(k for k in range(self.shards)
                         if keys.shard_stream(self._base, k, self.shards) == stream)
            consumer = StreamConsumer(
                self._client, stream=stream, group=self.group, consumer=self.consumer,
                dead_letter_stream=self._dead, claim_idle=self._claim_idle,
                qid_prefix=f"s{shard}:" if self.shards > 1 else "")
        return consumer

    def ack(self, records: Sequence[QueuedRecord]) -> None:
        for stream, of_stream in self._grouped(records).items():
            self._consumer_of(stream).ack(of_stream)

    def dead_letter(self, record: QueuedRecord, reason: str) -> None:
        self._consumer_of(record.stream).dead_letter(record, reason)
