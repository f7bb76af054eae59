"""``python -m bench.preload``: fill the queue as the gateway of the fleetlog on ``PYTHONPATH`` would.

The drain benchmark measures a worker on a preloaded queue.  Writing that queue by
hand (one ``XADD`` per record) measured every revision on the entries of the oldest:
since the gateway packs a call's records into one entry, a worker reads far fewer,
larger entries.  So each side of ``bench.compare`` preloads with its own
:class:`~fleetlog.queue.producer.Producer`, the way its gateway queues legacy frames:
calls of one record from each of ``--devices`` devices (the same records as
:func:`bench.systems.record_json`), ``--in-flight`` calls at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bench.systems import STREAM, record_json
from fleetlog.queue.connection import connect_async
from fleetlog.queue.producer import Producer


async def _preload(redis_url: str, records: int, devices: int) -> int:
    client = connect_async(redis_url, timeout=30)
    producer = Producer(client, mode="stream", stream=STREAM, max_backlog=1 << 40)
    producer.start()
    failures: list[Any] = []
    try:
        for start in range(0, records, devices):
            loop = asyncio.get_running_loop()
            waits = []
            for seq in range(start, min(start + devices, records)):
                done: asyncio.Future[Any] = loop.create_future()
                device = f"drain-{seq % devices:04d}"
                producer.submit(device, [record_json(device, seq)], done.set_result)
                waits.append(done)
            for outcome in await asyncio.gather(*waits):
                if isinstance(outcome, Exception):
                    failures.append(outcome)
    finally:
        await producer.close()
        await client.aclose()
    if failures:
        print(f"preload: {len(failures)} submissions failed: {failures[0]!r}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--devices", type=int, default=100)
    args = parser.parse_args()
    return asyncio.run(_preload(args.redis_url, args.records, args.devices))


if __name__ == "__main__":
    sys.exit(main())
