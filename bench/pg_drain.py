"""PostgreSQL vs SQLite, same run: drain with 1, 2 and 4 workers, then reads on a big table.

``python -m bench.pg_drain [--records N] [--read-records M] [--quick]``

Drain: N records preloaded into a private Valkey stream (as ``fleetlog
simulate`` would send them, 100 devices); the clock starts when the last
worker says ``worker draining`` and stops when the store holds all N (polled
every 50 ms).  SQLite with one worker (its one writer), PostgreSQL with 1, 2
and 4, each into a fresh store; the PostgreSQL server is a private one with
fsync on (as in production: every commit durable, as SQLite's synchronous=FULL).

Reads: M records written straight through :class:`PostgresStore` (spread over
10 days, 1000 devices) and indexed for search, then the median of 20 runs of:
the newest 100 of one device, the newest 100 of the fleet, and fleet-wide
text queries (newest 100 records containing a word found in one record in
1000, and one found in a single record).  Numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis
from tests.pg import PostgresServer, find_bindir

from bench.systems import WORKER_READY, preload
from fleetlog.embedded import RedisServer
from fleetlog.records import QueuedRecord
from fleetlog.store.base import LogQuery
from fleetlog.store.postgres import PostgresStore


def _count_sqlite(path: Path) -> int:
    import sqlite3

    try:
        db = sqlite3.connect(path)
        try:
            return int(db.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def _count_pg(url: str) -> int:
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT coalesce(sum(records), 0) FROM device_counts").fetchone()
            return int(row[0]) if row else 0
    except psycopg.Error:
        return 0


def _unindexed(url: str) -> int:
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM records WHERE seq >"
                " (SELECT value::bigint FROM meta WHERE key = 'search_through')").fetchone()
            return int(row[0]) if row else 1
    except psycopg.Error:
        return 1


def drain(redis_url: str, store: str, workers: int, records: int, work: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    preload("fleetlog", client, records)
    client.close()
    procs = []
    for n in range(workers):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fleetlog", "worker", "--redis-url", redis_url, "--store", store,
             "--data-dir", str(work / f"w{n}"), "--batch", "1000", "--consumer", f"bench-{n}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))
    try:
        for proc in procs:  # wait for each one's ready line
            assert proc.stderr is not None
            deadline = time.monotonic() + 60
            while WORKER_READY not in proc.stderr.readline():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"worker not ready: exit {proc.poll()}")
        started = time.perf_counter()
        count = _count_pg if store.startswith("postgresql") else (
            lambda _: _count_sqlite(Path(store.removeprefix("sqlite:///"))))
        deadline = time.monotonic() + 600
        while count(store) < records:
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain did not finish: {count(store)} of {records}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        indexed = None
        if store.startswith("postgresql"):
            # The search index is built by the workers' upkeep once the queue is quiet.
            deadline = time.monotonic() + 600
            while _unindexed(store) > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            indexed = round(time.perf_counter() - started - elapsed, 3)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    result = {"workers": workers, "records": records, "elapsed_s": round(elapsed, 3),
              "records_per_s": round(records / elapsed)}
    if indexed is not None:
        result["then_indexed_s"] = indexed
        result["stored_and_indexed_per_s"] = round(records / (elapsed + indexed))
    return result


def load(store: PostgresStore, records: int, batch: int = 20_000) -> float:
    """Write ``records`` straight into the store; seconds taken."""
    now = int(time.time() * 1000)
    start = now - 10 * 86_400_000
    step = (now - start) // records
    started = time.perf_counter()
    for first in range(0, records, batch):
        rows = []
        for seq in range(first, min(records, first + batch)):
            device = f"dev-{seq % 1000:04d}"
            word = f" needle{seq}" if seq % 1000 == 7 else ""
            data = orjson.dumps({"seq": seq, "level": "info",
                                 "msg": f"simulated record {seq} from {device} 設備{word}"})
            at = start + seq * step
            rows.append(QueuedRecord(f"{at}-{seq % 1000}", device, at, data, stream="s"))
        store.write_batch(rows)
    return time.perf_counter() - started


def reads(store: PostgresStore, repeats: int = 20) -> dict[str, float]:
    def median_ms(action: Any) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            action()
            times.append((time.perf_counter() - started) * 1000)
        return round(statistics.median(times), 2)

    return {
        "device_newest_100_ms": median_ms(lambda: store.query(LogQuery("dev-0123", limit=100))),
        "fleet_newest_100_ms": median_ms(lambda: store.query(LogQuery(None, limit=100))),
        "fleet_text_query_ms": median_ms(
            lambda: store.query(LogQuery(None, grep="needle", limit=100))),
        "fleet_text_rare_ms": median_ms(
            lambda: store.query(LogQuery(None, grep="needle4007", limit=100))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--read-records", type=int, default=10_000_000)
    parser.add_argument("--quick", action="store_true", help="50k drained, 200k for reads")
    parser.add_argument("--workers", default="1,2,4",
                        help="PostgreSQL runs: worker counts, comma-separated")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    args = parser.parse_args()
    if args.quick:
        args.records, args.read_records = 50_000, 200_000
    bindir = find_bindir()
    if bindir is None:
        print("no PostgreSQL binaries: nothing to compare", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="fleetlog-bench-pg-"))
    valkey = RedisServer(work / "valkey")
    valkey.start()
    server = PostgresServer(bindir, durable=True)
    server.start()
    results: dict[str, Any] = {"drain": [], "records": args.records}
    try:
        sqlite = {"records_per_s": 0}
        if not args.no_sqlite:
            sqlite = drain(valkey.url, f"sqlite:///{work / 'sqlite' / 'fleetlog.db'}", 1,
                           args.records, work / "sqlite")
            results["drain"].append({"store": "sqlite", **sqlite})
            print(f"sqlite      1 worker : {sqlite['records_per_s']:>8} records/s", flush=True)
        for workers in (int(n) for n in args.workers.split(",") if n):
            url = server.create_database()
            result = drain(valkey.url, url, workers, args.records, work / f"pg{workers}")
            result["bytes_per_record"] = round(PostgresStore(url).used_bytes() / args.records)
            result["vs_sqlite"] = (round(result["records_per_s"] / sqlite["records_per_s"], 2)
                                   if sqlite["records_per_s"] else None)
            results["drain"].append({"store": "postgresql", **result})
            print(f"postgresql  {workers} workers: {result['records_per_s']:>8} records/s"
                  f" ({result['vs_sqlite']}x sqlite, {result['bytes_per_record']} B/record on disk);"
                  f" search index done {result['then_indexed_s']} s later"
                  f" ({result['stored_and_indexed_per_s']} records/s stored and indexed)",
                  flush=True)
            server.drop_database(url)
        if not args.read_records:
            return 0
        url = server.create_database()
        big = PostgresStore(url)
        seconds = load(big, args.read_records)
        started = time.perf_counter()
        for _ in range(10_000):  # the search index, as the workers' upkeep builds it
            if big.upkeep(1_000_000) == 0:
                break
        index_seconds = time.perf_counter() - started
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE records")
        results["reads"] = {"records": args.read_records, "load_s": round(seconds, 1),
                            "index_s": round(index_seconds, 1),
                            "bytes_per_record": round(big.used_bytes() / args.read_records),
                            **reads(big)}
        print(f"reads on {args.read_records} records: {results['reads']}", flush=True)
        big.close()
    finally:
        server.remove()
        valkey.stop()
    out = Path(__file__).parent / "results" / f"pg-drain-{time.strftime('%Y-%m-%d')}.json"
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
