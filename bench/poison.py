"""``python -m bench.poison --before REV --after REV``: how long a worker takes past poison records.

A batch the store rejects is stored again around the records it rejects (left
pending, dead-lettered after ``--max-deliveries``): 6,000 good records in packed
entries with 3 poison ones among them (a raw NUL, bytes that are not UTF-8,
broken JSON), queued straight into a private Valkey; a worker of each side
drains them into a fresh database of a private PostgreSQL (``durable``: fsync
on), or a fresh SQLite file, and the clock stops when every good record is
stored.  Sides alternate, ``--repeats`` times each; the medians and
after/before are printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.pg import PostgresServer, find_bindir

from bench.revisions import Checkouts, Side
from bench.runner import child_env
from fleetlog.embedded import RedisServer
from fleetlog.queue.connection import connect_async
from fleetlog.queue.producer import Producer
from fleetlog.store import open_store

__all__ = ["main"]

GOOD = 6_000
POISON = (b'{"msg":"raw\x00nul"}', b'{"msg":"bad \xff utf8"}', b'{"seq": 99, broken')
#: Seconds a side may take before it counts as stuck.
LIMIT = 120.0


async def _queue(url: str) -> None:
    """Six packed entries of 1,000 good records, three with a poison record in their middle."""
    client = connect_async(url)
    producer = Producer(client, mode="stream", stream="fleetlog:records", max_backlog=10_000_000)
    refused: list[Any] = []
    for k in range(6):
        records = [json.dumps({"seq": k * 1000 + n}).encode() for n in range(1000)]
        producer.submit(f"d{k}", records[:500], refused.append)
        if k < len(POISON):
            producer.submit("bad", [POISON[k]], refused.append)
        producer.submit(f"d{k}", records[500:], refused.append)
    producer.start()
    await producer.close()
    await client.aclose()
    if any(isinstance(outcome, Exception) for outcome in refused):
        raise RuntimeError(f"queueing failed: {refused}")


def _stored(store_url: str) -> int:
    try:
        store = open_store(store_url, readonly=True)
    except Exception:
        return 0
    try:
        return sum(device.records for device in store.devices() if device.device_id != "bad")
    finally:
        store.close()


def once(side: Side, store_url: str, work: Path) -> float:
    """Seconds until a worker of ``side`` stored every good record into ``store_url``."""
    valkey = RedisServer(work / "valkey", appendfsync="everysec")
    valkey.start()
    try:
        asyncio.run(_queue(valkey.url))
        started = time.monotonic()
        worker = subprocess.Popen(
            [sys.executable, "-m", "fleetlog", "worker", "--redis-url", valkey.url, "--store", store_url,
             "--data-dir", str(work / "data"), "--claim-idle", "1", "--max-deliveries", "3",
             "--max-runtime", str(LIMIT)],
            env=child_env(side.src), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.monotonic() - started < LIMIT:
                if _stored(store_url) >= GOOD:
                    return time.monotonic() - started
                time.sleep(0.05)
            return float("nan")
        finally:
            worker.terminate()
            worker.wait(30)
    finally:
        valkey.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.poison", description=__doc__)
    parser.add_argument("--before", required=True, help="A revision or a directory holding src/fleetlog.")
    parser.add_argument("--after", default=".", help="The same (default: this working tree).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    bindir = find_bindir()
    work = Path(tempfile.mkdtemp(prefix="fleetlog-bench-poison-"))
    checkouts = Checkouts(Path.cwd(), work / "trees")
    server = PostgresServer(bindir, durable=True) if bindir is not None else None
    results: dict[str, dict[str, list[float]]] = {"sqlite": {}, "postgresql": {}}
    try:
        sides = [checkouts.side("before", args.before), checkouts.side("after", args.after)]
        if server is not None:
            server.start()
        for repeat in range(args.repeats):
            for side in sides:
                run = work / f"{side.name}-{repeat}"
                stores = {"sqlite": f"sqlite:///{run / 'sqlite' / 'fleetlog.db'}"}
                if server is not None:
                    stores["postgresql"] = server.create_database()
                for store, url in stores.items():
                    took = once(side, url, run / store)
                    results[store].setdefault(side.name, []).append(round(took, 2))
                    print(f"{store:10} {side.name:6} {took:6.2f} s", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.remove()
        for problem in checkouts.close():
            print(problem, file=sys.stderr)
    summary: dict[str, Any] = {"good_records": GOOD, "poison_records": len(POISON),
                               "before": args.before, "after": args.after}
    for store, by_side in results.items():
        if not by_side:
            continue
        before, after = statistics.median(by_side["before"]), statistics.median(by_side["after"])
        summary[store] = {"seconds": by_side, "median_before_s": before, "median_after_s": after,
                          "after_over_before": round(after / before, 3) if before else None}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
