"""How much work waits in the queue: what ``/metrics`` and ``/readyz`` report.

Read-only Redis commands, each on one key, so they are cheap enough for a
scrape and allowed while Redis refuses writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetlog import keys
from fleetlog.config import Settings

__all__ = ["QueueCollector", "QueueStats", "queue_stats", "queue_stats_for"]


@dataclass(frozen=True, slots=True)
class QueueStats:
    """``backlog``: records queued and not yet acknowledged (the number the gateway's
    ``max_backlog`` limits); ``lag``: stream entries not yet read by the workers'
    group; ``pending``: entries read but not acknowledged (an entry holds the records
    of one gateway call; in list mode, records and batches); ``dead_letters``: records
    given up on."""

    backlog: int
    lag: int
    pending: int
    dead_letters: int


def queue_stats(client: Any, *, queue: str, stream: str, group: str, dead_letter_stream: str,
                shards: int = 1) -> QueueStats:
    """Read the numbers from Redis (a blocking client); raises redis-py's errors.

    With several shards, the sums over their streams.
    """
    dead = int(client.xlen(dead_letter_stream))
    if queue == "list":
        waiting = int(client.llen(keys.LEGACY_LIST))
        return QueueStats(waiting, waiting, int(client.zcard(keys.LEGACY_INFLIGHT)), dead)
    backlog = lag = pending = 0
    for shard in range(shards):
        one = _stream_stats(client, keys.shard_stream(stream, shard, shards), group)
        backlog, lag, pending = backlog + one[0], lag + one[1], pending + one[2]
    return QueueStats(backlog, lag, pending, dead)


def queue_stats_for(client: Any, settings: Settings) -> QueueStats:
    """:func:`queue_stats` of the queue ``settings`` name."""
    return queue_stats(client, queue=settings.queue, stream=settings.stream, group=settings.group,
                       dead_letter_stream=settings.dead_letter_stream, shards=settings.shards)


class QueueCollector(Collector):
    """The queue's gauges for ``/metrics``, read once per scrape (left out while Redis is down)."""

    def __init__(self, read: Callable[[], QueueStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._read()
        except Exception:  # the gauges cannot be read now; the rest of the scrape can
            return
        for name, documentation, value in (
            ("fleetlog_queue_backlog", "Records queued, not yet acknowledged.", stats.backlog),
            ("fleetlog_queue_consumer_lag", "Entries the workers' group has not read yet.", stats.lag),
            ("fleetlog_queue_pending", "Entries read but not acknowledged.", stats.pending),
            ("fleetlog_queue_dead_letters", "Entries in the dead-letter stream.", stats.dead_letters),
        ):
            yield GaugeMetricFamily(name, documentation, value=float(value))


def _stream_stats(client: Any, stream: str, group: str) -> tuple[int, int, int]:
    """(backlog, lag, pending) of one stream; the backlog as the ingest script counts it."""
    length = int(client.xlen(stream))
    counted = client.get(keys.queue_backlog(stream)) if length else None
    backlog = max(length, int(counted or 0))
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no stream yet
        groups = []
    for info in groups:
        name = info["name"]
        if (name.decode() if isinstance(name, bytes) else name) == group:
            lag = info.get("lag")
            pending = int(info.get("pending") or 0)
            # ``lag`` is None when Redis cannot tell (after deletions): count it all then.
            return backlog, length if lag is None else int(lag), pending
    return backlog, length, 0
