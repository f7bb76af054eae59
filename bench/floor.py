"""The floor of Redis work per record: plain pipelined ``XADD``s, one entry per record.

``redis_vs_plain_xadd`` divides the Redis CPU a gateway spent per record acked by
the Redis CPU of appending as many records to the same server with plain
``XADD fleetlog:floor * d <device> r <json>`` in pipelines of 100, measured right
after it: the ratio says how far the ingest path is from the cheapest way of
putting records on a stream, whatever the machine's speed that moment.
"""

from __future__ import annotations

from typing import Any

from bench.context import Bench
from bench.systems import record_json

__all__ = ["FLOOR_STREAM", "add_floor", "plain_xadd_us_per_record"]

FLOOR_STREAM = "fleetlog:floor"
_PIPELINE = 100


def plain_xadd_us_per_record(bench: Bench, records: int, devices: int = 100) -> float:
    """Redis CPU (µs) per record of ``records`` plain pipelined XADDs (the stream is deleted after)."""
    client = bench.client
    client.delete(FLOOR_STREAM)
    payloads = [(f"floor-{seq % devices:04d}", record_json(f"floor-{seq % devices:04d}", seq))
                for seq in range(records)]
    started = bench.redis_cpu()
    for at in range(0, records, _PIPELINE):
        pipe = client.pipeline(transaction=False)
        for device, record in payloads[at:at + _PIPELINE]:
            pipe.xadd(FLOOR_STREAM, {"d": device, "r": record})
        pipe.execute()
    spent = bench.redis_cpu() - started
    client.delete(FLOOR_STREAM)
    return spent * 1e6 / records


def add_floor(bench: Bench, run: dict[str, Any]) -> dict[str, Any]:
    """Add the floor and the ratio to an ingest run (``acked`` records, ``redis_cpu_s_per_100k``)."""
    acked = int(run.get("acked") or 0)
    if acked <= 0 or "redis_cpu_s_per_100k" not in run:
        return run
    floor = plain_xadd_us_per_record(bench, min(acked, 200_000))
    per_record = float(run["redis_cpu_s_per_100k"]) * 10  # s per 100k -> µs per record
    run["redis_us_per_record"] = round(per_record, 3)
    run["plain_xadd_us_per_record"] = round(floor, 3)
    run["redis_vs_plain_xadd"] = round(per_record / floor, 3) if floor else None
    return run
