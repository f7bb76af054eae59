"""Reading at scale: reads of a big SQLite store, SSE fan-out, and ingest under a reading load.

``python -m bench.reading [--quick]`` (quick: 100k records from 100 devices, < 2 min;
full: 1,000,000 from 1,000).  In order:

1. **Fill** a store through its own write path (:meth:`SQLiteStore.write_batch`,
   5,000 records per batch) with records spread over the last 24 h (level mix,
   messages partly Chinese), then let :meth:`SQLiteStore.upkeep` build the whole
   search index; both are timed.
2. **Reads** through the real API (``python -m fleetlog api``, an admin token from
   ``fleetlog api-token add``) with one keep-alive httpx client: a device's newest
   100, fleet-wide text queries (a common, a rare and a Chinese word), the volume
   chart of a day (fleet and one device).  Warm-up, then ``repeats`` timed calls:
   p50/p95/max.  The same reads through :class:`~fleetlog.reading.Reader` in this
   process separate the HTTP overhead.
3. **SSE fan-out**: ``subscribers`` concurrent ``/api/stream`` readers (httpx
   streaming with the Authorization header, as the console's ``fetch()`` does)
   while ``fleetlog simulate --rate R`` sends through a gateway and a worker
   drains into the same store.  The simulator stamps each record's ``ts`` with the
   wall time just before sending; latency = event arrival - ``ts``.  Every
   subscriber must receive every acked record.
4. **Drain with and without a reading load**, same run, alternating: N records
   preloaded into the stream, the worker's drain into the big store timed alone,
   then while a reader process (4 clients looping over the three reads) hammers
   the API.

Results: ``bench/results/reading-<date>.json`` / ``.md``.  Timings are never
asserted: a missed target is a ``no``.  The machine's 2 cores are shared with the
load generators and with other users, which the results say.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import systems
from bench.context import PY, Bench
from bench.procs import Child, ChildFailed, Children, wait_for_port
from bench.profile import QUICK as QUICK_PROFILE
from bench.runner import BENCH_DIR, child_env, machine_info, open_redis, say, shut_down
from fleetlog.embedded import RedisServer, free_port
from fleetlog.reading import Reader, logs_request, volume_request
from fleetlog.records import QueuedRecord
from fleetlog.store.sqlite import SQLiteStore

__all__ = ["FULL", "QUICK", "ReadingProfile", "main"]


@dataclass(frozen=True)
class ReadingProfile:
    name: str
    records: int
    devices: int
    #: Timed calls per read (after ``warmup``).
    repeats: int
    warmup: int
    subscribers: int
    sse_rate: float
    sse_seconds: float
    drain_records: int
    #: Drain runs per side (alone, loaded), alternating.
    drain_repeats: int


QUICK = ReadingProfile("quick", 100_000, 100, repeats=20, warmup=3, subscribers=200,
                       sse_rate=100.0, sse_seconds=10.0, drain_records=50_000, drain_repeats=1)
FULL = ReadingProfile("full", 1_000_000, 1_000, repeats=30, warmup=3, subscribers=200,
                      sse_rate=100.0, sse_seconds=20.0, drain_records=100_000, drain_repeats=2)

TARGETS_MS = {"device_newest_100": 20.0, "text_query": 300.0, "volume_day": 200.0,
              "sse_p99": 1000.0}
#: Words the text queries look for, and how often the fill puts them in a message.
COMMON, RARE, CHINESE = "connection", "segfault", "传感器"
DAY_MS = 86_400_000
BATCH = 5_000

_MESSAGES = (
    "connection established to {host} in {n} ms",
    "connection lost to {host}, retrying in {n} s",
    "heartbeat ok uptime={n}",
    "temperature reading {n} C",
    "battery at {n}%",
    "传感器读数 {n}",
    "固件更新完成 版本 {n}",
    "disk usage {n}%",
    "config reloaded ({n} keys)",
    "网络连接已恢复 {n}",
)
_LEVELS = ("debug",) * 10 + ("info",) * 70 + ("warning",) * 15 + ("error",) * 4 + ("fatal",)


# -- 1. fill ----------------------------------------------------------------------


def _record(rng: random.Random, index: int, ts: int) -> bytes:
    if index % 100_000 == 77:  # ten in a million: the rare word
        msg = f"segfault in module {rng.randrange(100)} at 0x{rng.randrange(2**32):08x}"
    else:
        msg = rng.choice(_MESSAGES).format(host=f"10.0.{rng.randrange(256)}.{rng.randrange(256)}",
                                           n=rng.randrange(10_000))
    return orjson.dumps({"seq": index, "ts": ts, "level": rng.choice(_LEVELS), "msg": msg})


def fill(path: Path, records: int, devices: int, now_ms: int) -> dict[str, Any]:
    """Write ``records`` over the last 24 h through ``write_batch``, then index them all."""
    rng = random.Random(1)
    store = SQLiteStore(path)
    try:
        start = now_ms - DAY_MS
        step = DAY_MS / records
        started = time.perf_counter()
        for first in range(0, records, BATCH):
            batch = []
            for index in range(first, min(records, first + BATCH)):
                received = int(start + index * step)
                device = f"dev-{rng.randrange(devices):04d}"
                batch.append(QueuedRecord(f"fill-{index}", device, received,
                                          _record(rng, index, received - rng.randrange(500))))
            store.write_batch(batch)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        while store.upkeep(20_000) > 0:
            pass
        index_s = time.perf_counter() - started
        rows = store._db.execute("SELECT count(*) FROM records").fetchone()[0]
    finally:
        store.close()
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {"records": rows, "devices": devices, "write_s": round(write_s, 1),
            "write_records_per_s": round(records / write_s), "index_s": round(index_s, 1),
            "index_records_per_s": round(records / index_s), "db_mib": round(size / 2**20, 1)}


# -- 2. reads ---------------------------------------------------------------------


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95, 2),
            "max_ms": round(ordered[-1], 2), "n": len(ordered)}


def _timed(call: Callable[[], int], warmup: int, repeats: int) -> dict[str, Any]:
    for _ in range(warmup):
        call()
    samples, rows = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        rows = call()
        samples.append((time.perf_counter() - started) * 1000)
    return {**_stats(samples), "rows": rows}


def _reads(device: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Name -> (path, query) of every timed read."""
    return {
        "device_newest_100": (f"/api/devices/{device}/logs", {"limit": "100"}),
        "text_common": ("/api/logs", {"q": COMMON}),
        "text_rare": ("/api/logs", {"q": RARE}),
        "text_chinese": ("/api/logs", {"q": CHINESE}),
        "volume_day_fleet": ("/api/stats/volume", {"since": "24h", "step": "hour"}),
        "volume_day_device": ("/api/stats/volume", {"since": "24h", "step": "hour",
                                                    "device": device}),
    }


def http_reads(base: str, token: str, device: str, profile: ReadingProfile) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"},
                      timeout=60) as client:
        for name, (path, params) in _reads(device).items():
            def call(path: str = path, params: dict[str, str] = params) -> int:
                response = client.get(path, params=params)
                response.raise_for_status()
                body = response.json()
                return len(body.get("records", body.get("buckets", [])))
            results[name] = _timed(call, profile.warmup, profile.repeats)
    return results


def direct_reads(store_url: str, device: str, profile: ReadingProfile) -> dict[str, Any]:
    """The same reads through :class:`Reader`, in process: the store's share of the time."""
    results: dict[str, Any] = {}
    with Reader.open(store_url) as reader:
        for name, (_path, params) in _reads(device).items():
            def call(name: str = name, params: dict[str, str] = params) -> int:
                now = int(time.time() * 1000)
                if name.startswith("volume"):
                    return len(reader.volume(volume_request(
                        params.get("device"), now_ms=now, since=params["since"],
                        step=params["step"])))
                target = device if name == "device_newest_100" else None
                return len(reader.page(logs_request(target, now_ms=now, q=params.get("q"),
                                                    limit=100)).records)
            results[name] = _timed(call, profile.warmup, profile.repeats)
    return results


# -- 3. SSE fan-out ---------------------------------------------------------------


async def _subscribe(client: httpx.AsyncClient, prefix: str, latencies: list[float],
                     seen: set[tuple[str, int]], ready: asyncio.Event, opened: list[int],
                     stop: asyncio.Event) -> None:
    async with client.stream("GET", "/api/stream") as response:
        response.raise_for_status()
        buffer = b""
        async for chunk in response.aiter_bytes():
            now = time.time() * 1000
            if not ready.is_set():
                opened[0] += 1
                ready.set()
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        row = orjson.loads(line[6:])
                        if row["device_id"].startswith(prefix):
                            data = row["data"]
                            latencies.append(now - data["ts"])
                            seen.add((row["device_id"], data["seq"]))
            if stop.is_set():
                return


async def _fan_out(base: str, token: str, profile: ReadingProfile, prefix: str,
                   run_load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    count = profile.subscribers
    latencies: list[list[float]] = [[] for _ in range(count)]
    seen: list[set[tuple[str, int]]] = [set() for _ in range(count)]
    opened = [0]
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(60, read=None), limits=limits) as client:
        readies = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(_subscribe(client, prefix, latencies[i], seen[i], readies[i],
                                                opened, stop)) for i in range(count)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
        load = await asyncio.to_thread(run_load)
        expected = int(load.get("acked", 0))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(len(s) < expected for s in seen):  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # bounded: the stragglers' last events, at most 15 s
        stop.set()
        for task in tasks:
            task.cancel()
        failures = [r for r in await asyncio.gather(*tasks, return_exceptions=True)
                    if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    every = sorted(x for lat in latencies for x in lat)
    got = [len(s) for s in seen]
    return {
        "subscribers": count, "opened": opened[0], "load": load, "expected_per_subscriber": expected,
        "min_received": min(got), "max_received": max(got),
        "complete_subscribers": sum(1 for n in got if n == expected),
        "events": len(every),
        "latency_p50_ms": round(statistics.median(every), 1) if every else None,
        "latency_p99_ms": round(every[min(len(every) - 1, int(0.99 * len(every)))], 1)
        if every else None,
        "latency_max_ms": round(every[-1], 1) if every else None,
        "subscriber_errors": [f"{type(e).__name__}: {e}"[:200] for e in failures[:5]],
    }


# -- 4. drain with and without a reading load -----------------------------------


def _drain_into(bench: Bench, data_dir: Path, records: int, label: str,
                before_start: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """bench/drain.py's measurement, into the big store the API reads.

    ``before_start`` runs once the queue is loaded, just before the worker starts.
    """
    db = data_dir / "fleetlog.db"
    before = _rows(db)
    bench.reset_redis()
    systems.preload("fleetlog", bench.client, records)
    before_start()
    argv = systems.worker_argv("fleetlog", bench.redis_server.url, data_dir, records, None)
    worker = bench.children.start(f"worker-{label}", argv, marker=systems.WORKER_READY)
    sampler = _Schedstat(worker.pid)
    sampler.start()
    started = worker.wait_marker(240)
    at_start = sampler.last
    code = worker.wait(240)
    elapsed = time.perf_counter() - started
    sampler.join(5)
    on_cpu, queued = (sampler.last[0] - at_start[0]) / 1e9, (sampler.last[1] - at_start[1]) / 1e9
    if code != 0:
        raise ChildFailed(f"{worker.name} exited with {code}:\n{worker.tail()}")
    stored = _rows(db) - before
    if stored != records:
        raise ChildFailed(f"{worker.name}: {stored} rows stored of {records} queued")
    cpu = (worker.cpu_at_exit or 0.0) - (worker.marker_cpu or 0.0)
    voluntary, involuntary = worker.switches_at_exit or (0, 0)
    return {"records": records, "elapsed_s": round(elapsed, 3),
            "records_per_s": round(records / elapsed, 1),
            "worker_cpu_s_per_100k": round(cpu * 100_000 / records, 3),
            # Below 100%: the worker waited (for I/O, a lock) or was not given a core.
            "worker_on_cpu_pct": round(100 * cpu / elapsed, 1),
            "worker_switches_voluntary": voluntary, "worker_switches_involuntary": involuntary,
            # /proc/PID/schedstat over the drain: running, runnable but waiting for a core,
            # and the rest: asleep (fsync, Redis replies, a lock).
            "worker_running_s": round(on_cpu, 3), "worker_waiting_for_cpu_s": round(queued, 3),
            "worker_asleep_s": round(max(0.0, elapsed - on_cpu - queued), 3),
            "wal_mib_after": round(_size(db.with_name(db.name + "-wal")) / 2**20, 1)}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Schedstat(threading.Thread):
    """Samples ``/proc/PID/task/*/schedstat`` (ns running, ns runnable but waiting for a
    core) of every thread until PID exits; ``last`` sums each thread's last sample."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.tasks = Path(f"/proc/{pid}/task")
        self.threads: dict[str, tuple[int, int]] = {}
        self.last = (0, 0)

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                tids = os.listdir(self.tasks)
            except OSError:
                return  # gone: the last samples stand
            for tid in tids:
                try:
                    running, waiting, _ = (self.tasks / tid / "schedstat").read_text().split()
                except (OSError, ValueError):
                    continue
                self.threads[tid] = (int(running), int(waiting))
            self.last = (sum(r for r, _ in self.threads.values()),
                         sum(w for _, w in self.threads.values()))
            time.sleep(0.01)


def _rows(db: Path) -> int:
    store = SQLiteStore(db, readonly=True)
    try:
        rows: int = store._db.execute("SELECT count(*) FROM records").fetchone()[0]
    finally:
        store.close()
    return rows


def hammer(base: str, token: str, devices: int, clients: int, seconds: float) -> None:
    """The reading load: ``clients`` threads looping over the three reads until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counts = [0] * clients
    errors = [0] * clients

    def loop(index: int) -> None:
        rng = random.Random(index)
        words = (COMMON, RARE, CHINESE)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"},
                          timeout=60) as client:
            while not stop.is_set():
                device = f"dev-{rng.randrange(devices):04d}"
                for path, params in ((f"/api/devices/{device}/logs", {"limit": "100"}),
                                     ("/api/logs", {"q": rng.choice(words)}),
                                     ("/api/stats/volume", {"since": "24h", "step": "hour"})):
                    try:
                        client.get(path, params=params).raise_for_status()
                        counts[index] += 1
                    except httpx.HTTPError:
                        errors[index] += 1
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(70)
    elapsed = time.perf_counter() - started
    sys.stdout.write(json.dumps({"reads": sum(counts), "errors": sum(errors),
                                 "reads_per_s": round(sum(counts) / elapsed, 1)}) + "\n")


def drain_side_by_side(bench: Bench, data_dir: Path, base: str, token: str,
                       profile: ReadingProfile, log: Callable[[str], None]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"alone": [], "loaded": []}
    for repeat in range(profile.drain_repeats):
        log(f"drain alone ({repeat + 1}/{profile.drain_repeats}) ...")
        runs["alone"].append(_drain_into(bench, data_dir, profile.drain_records, f"alone{repeat}"))
        log(f"drain under a reading load ({repeat + 1}/{profile.drain_repeats}) ...")
        readers: list[Child] = []

        def start_reading(repeat: int = repeat, readers: list[Child] = readers) -> None:
            token = _token(bench)  # the reset emptied Redis, tokens too
            readers.append(bench.children.start(
                f"hammer{repeat}", [PY, "-m", "bench.reading", "hammer", "--url", base,
                                    "--token", token, "--devices", str(profile.devices),
                                    "--clients", "4", "--seconds", "600"], capture_stdout=True))
            time.sleep(1.0)  # the four clients are looping

        try:
            result = _drain_into(bench, data_dir, profile.drain_records, f"loaded{repeat}",
                                 start_reading)
        finally:
            for reader in readers:
                reader.stop(timeout=80)
        out = readers[0].popen.stdout.read() if readers and readers[0].popen.stdout else b""
        load = json.loads(out) if out.strip() else {"error": readers[0].tail() if readers else ""}
        if not load.get("reads") or load.get("errors"):
            raise ChildFailed(f"the reading load did not read: {load}")
        result["reading_load"] = load
        runs["loaded"].append(result)
    alone = statistics.median(r["records_per_s"] for r in runs["alone"])
    loaded = statistics.median(r["records_per_s"] for r in runs["loaded"])
    return {"runs": runs, "alone_records_per_s": round(alone, 1),
            "loaded_records_per_s": round(loaded, 1),
            "loaded_over_alone": round(loaded / alone, 3)}


# -- the run ----------------------------------------------------------------------


def _token(bench: Bench) -> str:
    """An admin token, from ``fleetlog api-token add`` (again after each Redis reset)."""
    token_child = bench.children.start("api-token", [
        PY, "-m", "fleetlog", "api-token", "add", "bench", "--role", "admin",
        "--redis-url", bench.redis_server.url], capture_stdout=True)
    out, code = token_child.collect(30)
    if code != 0:
        raise ChildFailed(f"api-token add failed ({code}):\n{token_child.tail()}")
    return out.decode().strip()


def _start_api(bench: Bench, store_url: str) -> tuple[Child, str, str]:
    token = _token(bench)
    port = free_port()
    api = bench.children.start("api", [PY, "-m", "fleetlog", "api", "--port", str(port),
                                       "--store", store_url, "--redis-url", bench.redis_server.url])
    wait_for_port(port, api)
    return api, f"http://127.0.0.1:{port}", token


def _sse(bench: Bench, data_dir: Path, base: str, token: str,
         profile: ReadingProfile) -> dict[str, Any]:
    port = free_port()
    gateway = bench.children.start("gateway", systems.gateway_argv(
        "fleetlog", port, bench.redis_server.url, bench.fresh_dir("gateway")))
    wait_for_port(port, gateway)
    worker = bench.children.start("worker", [PY, "-m", "fleetlog", "worker", "--redis-url",
                                             bench.redis_server.url, "--data-dir", str(data_dir)],
                                  marker=systems.WORKER_READY)
    worker.wait_marker(60)
    devices = 50
    messages = max(1, round(profile.sse_rate * profile.sse_seconds / devices))

    def run_load() -> dict[str, Any]:
        sim = bench.children.start("simulate", [
            PY, "-m", "fleetlog", "simulate", "--url", f"ws://127.0.0.1:{port}/", "--devices",
            str(devices), "--messages", str(messages), "--rate", str(profile.sse_rate),
            "--prefix", "sse-", "--json", "--timeout", str(profile.sse_seconds * 4 + 30)],
            capture_stdout=True)
        out, code = sim.collect(profile.sse_seconds * 4 + 60)
        summary: dict[str, Any] = orjson.loads(out) if out.strip() else {}
        summary["exit"] = code
        return summary

    try:
        return asyncio.run(_fan_out(base, token, profile, "sse-", run_load))
    finally:
        worker.stop()
        gateway.stop()


def _met(value: float | None, target: float) -> str:
    return "-" if value is None else ("yes" if value <= target else "no")


def table(results: dict[str, Any]) -> str:
    """The markdown table: metric, value, target, met?"""
    rows = ["| metric | value | target | met? |", "|---|---:|---:|---|"]
    http, direct = results.get("http", {}), results.get("direct", {})
    tag = "" if results["mode"] == "full" else " (quick)"
    for name, target in (("device_newest_100", 20.0), ("text_common", 300.0),
                         ("text_rare", 300.0), ("text_chinese", 300.0),
                         ("volume_day_fleet", 200.0), ("volume_day_device", 200.0)):
        if name in http:
            h, d = http[name], direct.get(name, {})
            rows.append(f"| {name} via HTTP, p50 / p95 / max ms ({h['rows']} rows) | "
                        f"{h['p50_ms']} / {h['p95_ms']} / {h['max_ms']} | <= {target:g} (p95) | "
                        f"{_met(h['p95_ms'], target)}{tag} |")
            if d:
                rows.append(f"| {name} via Reader (in process), p50 / p95 ms | "
                            f"{d['p50_ms']} / {d['p95_ms']} | | |")
    sse = results.get("sse")
    if sse:
        rows.append(f"| SSE: {sse['subscribers']} subscribers, ack->event p50 / p99 / max ms "
                    f"({sse['load'].get('records_per_s')} rec/s) | {sse['latency_p50_ms']} / "
                    f"{sse['latency_p99_ms']} / {sse['latency_max_ms']} | <= 1000 (p99) | "
                    f"{_met(sse['latency_p99_ms'], 1000.0)} |")
        rows.append(f"| SSE: subscribers that got every record ({sse['expected_per_subscriber']}) "
                    f"| {sse['complete_subscribers']} / {sse['subscribers']} | all | "
                    f"{'yes' if sse['complete_subscribers'] == sse['subscribers'] else 'no'} |")
    drain = results.get("drain")
    if drain:
        reads = [r.get("reading_load", {}).get("reads_per_s") for r in drain["runs"]["loaded"]]
        rows.append(f"| worker drain alone, records/s | {drain['alone_records_per_s']} | | |")
        rows.append(f"| worker drain under a reading load ({reads} reads/s), records/s | "
                    f"{drain['loaded_records_per_s']} | | |")
        rows.append(f"| drain loaded / alone | {drain['loaded_over_alone']} | | |")
        for side in ("alone", "loaded"):
            times = [(r.get("worker_running_s"), r.get("worker_waiting_for_cpu_s"),
                      r.get("worker_asleep_s"), r.get("wal_mib_after")) for r in drain["runs"][side]]
            cells = "; ".join(" / ".join(map(str, t[:3])) + f" ({t[3]})" for t in times)
            rows.append(f"| worker during the drain {side}: running / waiting for a core / asleep s"
                        f" (WAL MiB after), per run | {cells} | | |")
        asleep = {side: statistics.median(r.get("worker_asleep_s", 0.0) for r in runs)
                  for side, runs in drain["runs"].items()}
        blocked = asleep["loaded"] > 1.5 * asleep["alone"] + 0.5
        rows.append(f"| reads never block ingest: worker asleep (I/O, locks) loaded vs alone, "
                    f"median s | {asleep['loaded']} vs {asleep['alone']} | not longer | "
                    f"{'no' if blocked else 'yes'} |")
    fill_ = results.get("fill")
    if fill_:
        rows.append(f"| fill: write_batch records/s; index build s ({fill_['records']} records, "
                    f"{fill_['db_mib']} MiB) | {fill_['write_records_per_s']}; "
                    f"{fill_['index_s']} | | |")
    return "\n".join(rows)


def markdown(results: dict[str, Any]) -> str:
    """The results file: a title, :func:`table`, the machine, errors if any."""
    profile = results["profile"]
    machine = results.get("machine", {})
    md = (f"# Reading at scale ({results['mode']}: {profile['records']:,} records, "
          f"{profile['devices']:,} devices), {results['date']}\n\n{table(results)}\n\n"
          f"{results['note']}; {machine.get('cpu_count')} CPUs ({machine.get('cpu_model')}). "
          f"Wall {results['wall_s']} s.\n")
    if results["errors"]:
        md += "\nErrors:\n" + "".join(f"- {e}\n" for e in results["errors"])
    return md


def run(profile: ReadingProfile, out_dir: Path, keep: bool = False) -> int:
    started = time.perf_counter()

    def log(message: str) -> None:
        say(started, message)

    scratch = BENCH_DIR / ".scratch-reading"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    children = Children(scratch, child_env(BENCH_DIR.parent / "src"))
    redis_server = RedisServer(scratch / "redis", appendfsync="everysec")
    results: dict[str, Any] = {"date": datetime.date.today().isoformat(), "mode": profile.name,
                               "profile": asdict(profile), "targets_ms": TARGETS_MS,
                               "note": "2 cores shared with the load generators, the API, Redis, "
                                       "gateway and worker, and with other engineers' work"}
    errors: list[str] = []
    try:
        client = open_redis(redis_server)
        results["machine"] = machine_info(client)
        bench = Bench(QUICK_PROFILE, children, redis_server, client, scratch)
        data_dir = bench.fresh_dir("store")
        db = data_dir / "fleetlog.db"
        store_url = f"sqlite:///{db}"
        log(f"fill {profile.records} records from {profile.devices} devices ...")
        results["fill"] = fill(db, profile.records, profile.devices, int(time.time() * 1000))
        log(f"fill: {results['fill']}")
        api, base, token = _start_api(bench, store_url)
        device = "dev-0007"
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("http", lambda: http_reads(base, token, device, profile)),
            ("direct", lambda: direct_reads(store_url, device, profile)),
            ("sse", lambda: _sse(bench, data_dir, base, token, profile)),
            ("drain", lambda: drain_side_by_side(bench, data_dir, base, token, profile, log)),
        ]
        for name, step in steps:
            log(f"{name} ...")
            try:
                results[name] = step()
                log(f"{name}: {json.dumps(results[name])[:600]}")
            except Exception as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}"[:1500])
                log(f"{name} FAILED:\n{traceback.format_exc()}")
        api.stop()
        client.close()
    except Exception as exc:
        errors.append(f"setup: {type(exc).__name__}: {exc}"[:1500])
        log(f"setup FAILED:\n{traceback.format_exc()}")
    finally:
        errors += shut_down(redis_server, children)
    if not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    results["errors"] = errors
    results["wall_s"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"reading-{results['date']}{'-quick' if profile.name == 'quick' else ''}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    md = markdown(results)
    Path(f"{stem}.md").write_text(md)
    log(f"wrote {stem}.json, {stem}.md")
    print(md)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    ham = sub.add_parser("hammer", help="(internal) the reading load of the drain measurement")
    ham.add_argument("--url", required=True)
    ham.add_argument("--token", required=True)
    ham.add_argument("--devices", type=int, required=True)
    ham.add_argument("--clients", type=int, default=4)
    ham.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scratch store")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if args.command == "hammer":
        hammer(args.url, args.token, args.devices, args.clients, args.seconds)
        return 0
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return run(QUICK if args.quick else FULL, args.out, args.keep)


if __name__ == "__main__":
    sys.exit(main())
