"""How much work waits in the queue: what ``/metrics`` and ``/readyz`` report.

Read-only Redis commands, each on one key, so they are cheap enough for a
scrape and allowed while Redis refuses writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from fleetlog import keys

__all__ = ["QueueStats", "queue_stats"]


@dataclass(frozen=True, slots=True)
class QueueStats:
    """``backlog``: entries kept in the queue; ``lag``: not yet read by the workers' group;
    ``pending``: read but not acknowledged; ``dead_letters``: given up on."""

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


def _stream_stats(client: Any, stream: str, group: str) -> tuple[int, int, int]:
    """(backlog, lag, pending) of one stream."""
    backlog = int(client.xlen(stream))
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
            return backlog, backlog if lag is None else int(lag), pending
    return backlog, backlog, 0
