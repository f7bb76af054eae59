"""fleetlog.queue.stats: the queue's numbers as the gateway, the API and /metrics report them (real Redis)."""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fleetlog import keys
from fleetlog.metrics import render
from fleetlog.queue import scripts
from fleetlog.queue.stats import QueueCollector, QueueStats, queue_stats

STREAM = "fleetlog:stats-test"
GROUP = "workers"


def queue(client: redis.Redis, stream: str, records: int) -> None:
    """One packed entry of ``records`` records, as the gateway's ingest script writes it."""
    ingest = client.register_script(scripts.INGEST_PLAIN)
    blob = b"\n".join(b'{"n":%d}' % n for n in range(records))
    args = [1_000_000, records, "d", records, blob]
    assert ingest(keys=[stream, keys.queue_backlog(stream)], args=args)[0] == 0  # queued


def stats(client: redis.Redis, shards: int = 1, queue_mode: str = "stream") -> QueueStats:
    return queue_stats(client, queue=queue_mode, stream=STREAM, group=GROUP,
                       dead_letter_stream="fleetlog:stats-dead", shards=shards)


def test_backlog_counts_records_lag_and_pending_count_entries(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert stats(client) == QueueStats(0, 0, 0, 0)  # nothing yet: no stream, no group
    queue(client, STREAM, 30)
    queue(client, STREAM, 20)
    assert stats(client) == QueueStats(50, 2, 0, 0)  # no group yet: every entry unread
    client.xgroup_create(STREAM, GROUP, id="0")
    client.xreadgroup(GROUP, "w1", {STREAM: ">"}, count=1)
    assert stats(client) == QueueStats(50, 1, 1, 0)
    client.xadd("fleetlog:stats-dead", {"r": "x"})
    assert stats(client).dead_letters == 1
    # An entry written by a version that did not pack (one record, no counter) counts one.
    client.delete(keys.queue_backlog(STREAM))
    assert stats(client).backlog == 2


def test_shards_are_summed(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    for shard, records in enumerate((5, 7, 11)):
        queue(client, keys.shard_stream(STREAM, shard, 3), records)
    assert stats(client, shards=3) == QueueStats(23, 3, 0, 0)


def test_list_mode_counts_the_original_keys(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.lpush(keys.LEGACY_LIST, "a", "b", "c")
    client.zadd(keys.LEGACY_INFLIGHT, {"batch-1": 1})
    assert stats(client, queue_mode="list") == QueueStats(3, 3, 1, 0)


def test_the_gauges_are_read_at_scrape_time_and_left_out_when_redis_is_down(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    queue(client, STREAM, 4)
    registry = CollectorRegistry()
    registry.register(QueueCollector(lambda: stats(client)))
    down = CollectorRegistry()
    down.register(QueueCollector(lambda: stats(redis.Redis(port=1, socket_connect_timeout=0.2))))

    def scraped(where: CollectorRegistry) -> dict[str, float]:
        return {sample.name: sample.value
                for family in text_string_to_metric_families(render(where).decode())
                for sample in family.samples}

    assert scraped(registry) == {"fleetlog_queue_backlog": 4, "fleetlog_queue_consumer_lag": 1,
                                 "fleetlog_queue_pending": 0, "fleetlog_queue_dead_letters": 0}
    assert scraped(down) == {}
