"""One worker at a time on a queue: the lease that keeps a device's records in order.

A queue read by several workers at once is stored out of order: each worker
commits the batch it read whenever its transaction ends, so a device's newer
records can land (in ``seq``, the order of every reader that reads "after a
cursor") before older ones another worker still holds.  So every queue,
whatever the deployment, is drained by one worker at a time, holding a
:class:`Lease` on it; the others are hot standbys that try to take it every
third of its life.  Parallelism comes from ``--shards N`` (N streams, one lease
each: :class:`~fleetlog.queue.shards.ShardedConsumer`, which also drains the
single stream of the default ``--shards 1``); the legacy list is one queue with
one lease (:class:`LeasedListConsumer`).

What makes it hold, for a new holder and for an old one that stalled:

* A holder reads only while its lease is alive: it renews the lease (to its
  full life) at least every third of the life, before reading, and no blocking
  read waits longer than a third of it; whatever it reads was read before the
  lease could expire.
* A new holder first claims everything its predecessors left unacknowledged
  (pending stream entries, in-flight list batches), in queue order, before
  reading anything new (:meth:`StreamConsumer.take_over`,
  :meth:`ListConsumer.take_over`).
* An old holder that stalled past its lease (a long store retry) and commits
  its batch afterwards cannot put it after newer records: every record of that
  batch was still unacknowledged when the new holder took over, so the new
  holder stored it before anything newer, and the store ignores a record it
  holds (the qid, with a list batch's ``received_at`` kept through claims).
  Its acknowledgement only acknowledges what is stored.  Then its next read
  finds the lease gone, and it becomes a standby.

The one window left is a worker frozen (SIGSTOP, a VM paused) for longer than
two thirds of the lease between renewing and its next read: records it then
reads are the new holder's to claim later, so they may be stored after newer
ones.  Nothing is lost or doubled either way.

Taking a lease writes a key, which Redis refuses once ``maxmemory`` is reached
(``noeviction``); but a worker is what frees that memory, so the take is a
script flagged ``allow-oom`` (Redis 7 / Valkey; on an older server a plain
``SET NX PX``).  Renewing is a ``PEXPIRE``, which Redis allows anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import redis

from fleetlog import keys
from fleetlog.queue.consumer import ListConsumer
from fleetlog.records import QueuedRecord

__all__ = ["ACQUIRE", "RELEASE", "RENEW", "Lease", "LeasedListConsumer"]

log = logging.getLogger("fleetlog.worker")

#: KEYS[1] a lease; ARGV[1] its holder, ARGV[2] its life (ms).  Renews it only if still ours.
RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

#: KEYS[1] a lease; ARGV[1] its holder.  Gives it back only if still ours.
RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: KEYS[1] a lease; ARGV[1] the holder, ARGV[2] its life (ms).  Takes it when free, or
#: renews it when it is ours already (this consumer name restarted); allowed when Redis
#: is out of memory, since only a holder drains what would free it.
ACQUIRE: Final = """#!lua flags=allow-oom
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class Lease:
    """A string key (value: the holder's consumer name, with a TTL): who drains one queue."""

    def __init__(self, client: Any, key: str, holder: str, life: float) -> None:
        self._client = client
        self.key = key
        self.holder = holder
        self.life_ms = int(life * 1000)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._acquire = client.register_script(ACQUIRE)
        self._flags = True  # False: the server predates script flags

    def acquire(self) -> bool:
        """Take the lease if it is free (or ours already): True if held now, for its full life."""
        if self._flags:
            try:
                return bool(self._acquire(keys=[self.key], args=[self.holder, self.life_ms]))
            except redis.exceptions.ResponseError as exc:
                text = str(exc).lower()
                if isinstance(exc, redis.exceptions.OutOfMemoryError) or not (
                        "compiling" in text or "shebang" in text):
                    raise
                # Redis < 7 reads no shebang: a plain SET, which it refuses when out of memory.
                self._flags = False
        if self._client.set(self.key, self.holder, nx=True, px=self.life_ms):
            return True
        return self.renew()

    def renew(self) -> bool:
        """Extend the lease to its full life if it is still ours; False: lost (expired, taken)."""
        return bool(self._renew(keys=[self.key], args=[self.holder, self.life_ms]))

    def release(self) -> None:
        """Give the lease back (if still ours), so a standby takes over at once."""
        self._release(keys=[self.key], args=[self.holder])


class LeasedListConsumer:
    """The legacy list drained by the one worker holding :data:`~fleetlog.keys.LEGACY_LEASE`.

    A :class:`~fleetlog.queue.consumer.Consumer`: while this worker does not
    hold the lease, :meth:`fetch` waits (a third of the lease at most) and
    returns nothing; once it takes the lease it first claims every batch still
    in flight (a dead or stalled predecessor's), in the order they were taken,
    then takes new ones.  See the module docstring.
    """

    def __init__(self, client: Any, consumer: ListConsumer, *, holder: str, lease: float) -> None:
        self.lease = Lease(client, keys.LEGACY_LEASE, holder, lease)
        self._inner = consumer
        self._every = lease / 3
        self._next_check = 0.0
        self.held = False

    def _check(self) -> None:
        """Renew the lease, or try to take it; every third of its life (before reading)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        if self.held and not self.lease.renew():
            log.warning("lost the lease on the legacy list (expired); another worker has it")
            self.held = False
        if not self.held and self.lease.acquire():
            self.held = True
            self._inner.take_over()
            log.info("took the legacy list %s: this worker drains it", keys.LEGACY_LIST)
        self._next_check = now + self._every  # from before the renewal: on the safe side

    def fetch(self, count: int, block_ms: int | None) -> list[QueuedRecord]:
        self._check()
        wait_ms = min(block_ms or 0, int(self._every * 1000))
        if not self.held:
            time.sleep(wait_ms / 1000)
            return []
        return self._inner.fetch(count, wait_ms)

    def ack(self, records: Sequence[QueuedRecord]) -> None:
        self._inner.ack(records)

    def dead_letter(self, record: QueuedRecord, reason: str) -> None:
        self._inner.dead_letter(record, reason)

    def close(self) -> None:
        """Give the lease back on the way out: a standby takes the list at once."""
        if self.held:
            self.lease.release()
            self.held = False
