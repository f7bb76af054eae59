"""Scale-out ratios in one run: gateway processes, drain workers over shards, cluster, replicas.

``python -m bench.scale [--quick]`` measures, on this machine, against private
servers it starts and always stops:

* **ingest against gateway processes, 1 .. the cores** (``fleetlog gateway
  --processes N``, one port; N in 1, 2, 4, 8, 12, 16, ... up to the cores, or
  ``--processes 1,2,4``): legacy (one record per frame, closed loop) and v2
  (100 records per frame), 100 devices from one ``fleetlog simulate`` process
  per gateway process, so the load side grows with the server side; with the
  Redis CPU per record of each point (``INFO cpu``), since one Redis core is
  what a shard is bounded by.  Run unchanged on a machine with many cores, it
  gives the whole curve.  ``--fixed-load``: one simulator for every count, the
  same 100 devices split over more processes (each process's calls then carry
  fewer records);
* **drain, 1, 2 and 4 workers over 4 shards**: records preloaded into the 4
  shard streams the way a gateway queues them, then the time from the first
  worker's ``worker draining`` line until the shared SQLite store holds them
  all (checked by count, and nothing left pending);
* **single Redis vs the 6-node cluster** (3 masters, 3 replicas, all on this
  machine): v2 ingest through one gateway process with ``--shards 4``;
* **ack p99 with and without ``--ack-replicas 1``**: a master with one
  replica, one gateway process, a fixed offered rate (half of the rate
  without ``WAIT``), ack p50/p99 from the simulator.

Every number is in ``bench/results/scale-<date>[-quick].json``, the table in
the ``.md`` next to it.  Timings are never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.context import redis_cpu_seconds
from bench.procs import Child, ChildFailed, Children, wait_for_port
from bench.runner import child_env, machine_info
from bench.systems import FLEETLOG_GATEWAY_FLAGS, WORKER_READY, record_json
from fleetlog import keys
from fleetlog.embedded import LocalCluster, RedisServer, free_port

__all__ = ["main"]

PY = sys.executable
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Scale:
    name: str
    devices: int
    legacy_messages: int  # per device
    v2_frames: int  # per device, 100 records each
    drain_records: int
    latency_seconds: float
    timeout: float


QUICK = Scale("quick", devices=100, legacy_messages=300, v2_frames=30, drain_records=20_000,
              latency_seconds=3, timeout=120)
FULL = Scale("full", devices=100, legacy_messages=400, v2_frames=40, drain_records=100_000,
             latency_seconds=8, timeout=300)


def _simulate(children: Children, url: str, scale: Scale, *, prefix: str, messages: int,
              batch: int = 0, rate: float = 0.0) -> Child:
    argv = [PY, "-m", "fleetlog", "simulate", "--url", url, "--devices", str(scale.devices),
            "--messages", str(messages), "--json", "--timeout", str(scale.timeout), "--prefix", prefix]
    if batch:
        argv += ["--batch", str(batch)]
    if rate:
        argv += ["--rate", f"{rate:.1f}"]
    return children.start(f"simulate-{prefix}", argv, capture_stdout=True)


def _summary(child: Child, timeout: float) -> dict[str, Any]:
    out, code = child.collect(timeout + 15)
    if not out.strip():
        raise ChildFailed(f"{child.name} printed nothing (exit {code}):\n{child.tail()}")
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if not summary.get("acked"):
        raise ChildFailed(f"{child.name}: nothing acknowledged: {summary}")
    return summary


@contextmanager
def _gateway(children: Children, redis_url: str, data_dir: Path, *extra: str) -> Iterator[tuple[str, Child]]:
    """A gateway (``fleetlog gateway`` with ``extra``) listening: its URL and its process."""
    port = free_port()
    child = children.start("gateway", [
        PY, "-m", "fleetlog", "gateway", "--redis-url", redis_url, "--port", str(port),
        "--data-dir", str(data_dir), *FLEETLOG_GATEWAY_FLAGS, *extra])
    try:
        wait_for_port(port, child, timeout=60)
        time.sleep(0.5)  # every process of a pool listening, not just the first
        yield f"ws://127.0.0.1:{port}/", child
    finally:
        child.stop()


def _ingest(children: Children, url: str, scale: Scale, clients: int, *, v2: bool) -> dict[str, Any]:
    """``clients`` simulators at once; the rate is the sum of theirs."""
    started = time.perf_counter()
    running = [
        _simulate(children, url, scale, prefix=f"{'v2' if v2 else 'l'}{n}-",
                  messages=scale.v2_frames * 100 if v2 else scale.legacy_messages,
                  batch=100 if v2 else 0)
        for n in range(clients)]
    summaries = [_summary(child, scale.timeout) for child in running]
    return {
        "clients": clients,
        "records_per_s": round(sum(float(s["records_per_s"]) for s in summaries), 1),
        "acked": sum(int(s["acked"]) for s in summaries),
        "wall_s": round(time.perf_counter() - started, 2),
        "ack_p99_ms": max(float(s.get("ack_p99_ms", 0)) for s in summaries),
        "per_client": summaries,
    }


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (a gateway pool's processes), so far."""
    parent = psutil.Process(pid)
    total = 0.0
    for process in (parent, *parent.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def process_counts(cores: int | None = None) -> list[int]:
    """1, 2, 4, 8, 12, 16, 24, 32 ... up to the machine's cores, and the cores themselves."""
    cores = cores or os.cpu_count() or 1
    steps = [1, 2, 4, 8, *range(12, cores + 1, 4)]
    return sorted({n for n in steps if n <= cores} | {cores})


def ingest_processes(children: Children, redis_url: str, client: redis.Redis, scratch: Path,
                     scale: Scale, counts: list[int], repeats: int = 1,
                     fixed_load: bool = False) -> dict[str, Any]:
    """Each point ``repeats`` times, the counts interleaved (1, 2, 4 ..., then again), so that
    a busy moment of the machine hits every count alike; each point is its median run.
    One simulator per gateway process, or one for all with ``fixed_load``."""
    results: dict[str, Any] = {"counts": counts, "repeats": repeats, "fixed_load": fixed_load}
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for processes in counts:
            for v2 in (False, True):
                client.flushall()
                with _gateway(children, redis_url, scratch / f"gw-{processes}", "--processes",
                              str(processes)) as (url, gateway):
                    before, gateway_before = redis_cpu_seconds(client), _tree_cpu(gateway.pid)
                    run = _ingest(children, url, scale, 1 if fixed_load else processes, v2=v2)
                    spent = redis_cpu_seconds(client) - before
                    gateway_spent = _tree_cpu(gateway.pid) - gateway_before
                    acked = run["acked"]
                    run["redis_us_per_record"] = round(spent * 1e6 / acked, 3) if acked else None
                    run["gateway_us_per_record"] = round(gateway_spent * 1e6 / acked, 2) if acked else None
                    runs.setdefault(f"{'v2' if v2 else 'legacy'}_{processes}p", []).append(run)
    for key, measured in runs.items():
        median = sorted(measured, key=lambda run: float(run["records_per_s"]))[len(measured) // 2]
        results[key] = {**median, "repeats": [
            {k: run[k] for k in ("records_per_s", "redis_us_per_record", "gateway_us_per_record",
                                 "ack_p99_ms")}
            for run in measured]}
    return results


def _preload_shards(client: redis.Redis, records: int, shards: int, devices: int = 100) -> None:
    pipe = client.pipeline(transaction=False)
    for seq in range(records):
        device = f"drain-{seq % devices:04d}"
        stream = keys.shard_stream("fleetlog:records", keys.shard_of(device, shards), shards)
        pipe.xadd(stream, {"d": device, "r": record_json(device, seq)})
        if seq % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return int(connection.execute("SELECT count(*) FROM records").fetchone()[0])
    except sqlite3.Error:
        return 0


def drain_workers(children: Children, redis_url: str, client: redis.Redis, scratch: Path,
                  scale: Scale, shards: int = 4) -> dict[str, Any]:
    results: dict[str, Any] = {}
    records = scale.drain_records
    for workers in (1, 2, 4):
        client.flushall()
        _preload_shards(client, records, shards)
        data_dir = scratch / f"drain-{workers}"
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        running = [children.start(f"worker-{workers}-{n}", [
            PY, "-m", "fleetlog", "worker", "--redis-url", redis_url, "--data-dir", str(data_dir),
            "--shards", str(shards)], marker=WORKER_READY) for n in range(workers)]
        try:
            started = min(child.wait_marker(scale.timeout) for child in running)
            deadline = time.monotonic() + scale.timeout
            rows = 0
            while time.monotonic() < deadline:
                rows = _rows(data_dir / "fleetlog.db")
                if rows >= records:
                    break
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
        finally:
            for child in running:
                child.stop()
        if rows != records:
            raise ChildFailed(f"{workers} workers stored {rows} of {records} records")
        pending = sum(int(group["pending"]) for shard in range(shards)
                      for group in client.xinfo_groups(keys.shard_stream("fleetlog:records", shard, shards)))
        if pending:
            raise ChildFailed(f"{workers} workers left {pending} records unacknowledged")
        results[f"{workers}_workers"] = {"records": records, "shards": shards,
                                         "elapsed_s": round(elapsed, 3),
                                         "records_per_s": round(records / elapsed, 1)}
    return results


def cluster_vs_single(children: Children, redis_url: str, client: redis.Redis, scratch: Path,
                      scale: Scale) -> dict[str, Any]:
    results: dict[str, Any] = {}
    client.flushall()
    with _gateway(children, redis_url, scratch / "gw-single", "--processes", "1",
                  "--shards", "4") as (url, _):
        results["single"] = _ingest(children, url, scale, 1, v2=True)
    cluster = LocalCluster(scratch / "cluster", appendfsync="everysec")
    cluster.start()
    try:
        with _gateway(children, cluster.url, scratch / "gw-cluster", "--processes", "1",
                      "--shards", "4") as (url, _):
            results["cluster"] = _ingest(children, url, scale, 1, v2=True)
    finally:
        cluster.stop()
    return results


def ack_replicas(children: Children, scratch: Path, scale: Scale) -> dict[str, Any]:
    master = RedisServer(scratch / "master", appendfsync="everysec")
    master.start()
    replica = RedisServer(scratch / "replica", appendfsync="everysec",
                          extra=["--replicaof", "127.0.0.1", str(master.port)])
    replica.start()
    results: dict[str, Any] = {}
    try:
        client = redis.Redis.from_url(master.url)
        deadline = time.monotonic() + 30
        while client.info("replication").get("connected_slaves", 0) < 1:
            if time.monotonic() > deadline:
                raise ChildFailed("the replica did not connect within 30 s")
            time.sleep(0.1)
        rate = 0.0
        for replicas in (0, 1):
            client.flushall()
            with _gateway(children, master.url, scratch / f"gw-ack{replicas}", "--processes", "1",
                          "--ack-replicas", str(replicas)) as (url, _):
                if not rate:  # half of the closed-loop rate without WAIT
                    probe = _summary(_simulate(children, url, scale, prefix="probe-", messages=40),
                                     scale.timeout)
                    rate = float(probe["records_per_s"]) / 2
                    results["offered_rate"] = round(rate, 1)
                messages = max(5, int(rate * scale.latency_seconds / scale.devices))
                summary = _summary(_simulate(children, url, scale, prefix=f"ack{replicas}-",
                                             messages=messages, rate=rate), scale.timeout)
                results[f"replicas_{replicas}"] = {
                    key: summary.get(key) for key in ("records_per_s", "acked", "ack_p50_ms", "ack_p99_ms")}
        client.close()
    finally:
        replica.stop()
        master.stop()
    return results


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _row(label: str, a: Any, b: Any) -> str:
    return f"| {label} | {a} | {b} | {_ratio(b, a)} |"


def markdown(results: dict[str, Any]) -> str:
    rows = ["| measurement | A | B | B / A |", "|---|---:|---:|---:|"]
    ingest = results.get("ingest_processes", {})
    for kind in ("legacy", "v2"):
        one = ingest.get(f"{kind}_1p", {})
        for n in ingest.get("counts", [1, 2])[1:]:
            other = ingest.get(f"{kind}_{n}p", {})
            each = ", ".join(_ratio(b["records_per_s"], a["records_per_s"])
                             for a, b in zip(one.get("repeats", []), other.get("repeats", []), strict=False))
            repeats = f" (median of {ingest.get('repeats', 1)}; each repeat: {each})" if each else ""
            load = ", one simulator for all" if ingest.get("fixed_load") else ""
            rows.append(_row(f"{kind} ingest records/s: 1 vs {n} gateway processes{load}{repeats}",
                             one.get("records_per_s"), other.get("records_per_s")))
            rows.append(_row(f"{kind} Redis CPU µs per record: 1 vs {n} gateway processes",
                             one.get("redis_us_per_record"), other.get("redis_us_per_record")))
            rows.append(_row(f"{kind} gateway CPU µs per record (all its processes): 1 vs {n}",
                             one.get("gateway_us_per_record"), other.get("gateway_us_per_record")))
    drain = results.get("drain_workers", {})
    base = drain.get("1_workers", {}).get("records_per_s")
    for workers in (2, 4) if drain else ():
        other = drain.get(f"{workers}_workers", {}).get("records_per_s")
        rows.append(_row(f"drain records/s over 4 shards: 1 vs {workers} workers", base, other))
    cluster = results.get("cluster_vs_single", {})
    single, many = (cluster.get(k, {}).get("records_per_s") for k in ("single", "cluster"))
    if cluster:
        rows.append(_row("v2 ingest records/s, 1 gateway process, 4 shards: single Redis vs 6-node cluster",
                     single, many))
    acks = results.get("ack_replicas", {})
    for key in ("ack_p50_ms", "ack_p99_ms") if acks else ():
        no, yes = (acks.get(f"replicas_{n}", {}).get(key) for n in (0, 1))
        rows.append(_row(f"{key.replace('_', ' ')} at {acks.get('offered_rate')} records/s: "
                         "without vs with --ack-replicas 1", no, yes))
    lines = [f"# Scale benchmark ({results['mode']}, {results['date']})", "", *rows, ""]
    if results.get("errors"):
        lines += ["Failed:", "", *(f"* {error}" for error in results["errors"]), ""]
    lines.append(f"Machine: {results.get('machine')}; wall {results.get('wall_s')} s.")
    return "\n".join(lines) + "\n"


def run(scale: Scale, out_dir: Path, counts: list[int] | None = None, only: set[str] | None = None,
        repeats: int = 1, fixed_load: bool = False) -> int:
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    children = Children(scratch, child_env())
    server = RedisServer(scratch / "redis", appendfsync="everysec")
    results: dict[str, Any] = {"date": datetime.date.today().isoformat(), "mode": scale.name,
                               "scale": vars(scale)}
    errors: list[str] = []
    try:
        server.start()
        client = redis.Redis.from_url(server.url)
        results["machine"] = machine_info(client)
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("ingest_processes", lambda: ingest_processes(children, server.url, client, scratch, scale,
                                                          counts or process_counts(), repeats,
                                                          fixed_load)),
            ("drain_workers", lambda: drain_workers(children, server.url, client, scratch, scale)),
            ("cluster_vs_single", lambda: cluster_vs_single(children, server.url, client, scratch, scale)),
            ("ack_replicas", lambda: ack_replicas(children, scratch, scale)),
        ]
        for name, step in steps:
            if only is not None and name not in only:
                continue
            print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = step()
            except Exception as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}"[:1500])
                traceback.print_exc()
        client.close()
    finally:
        children.close()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    results["errors"] = errors
    results["wall_s"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"scale-{results['date']}" + ("-quick" if scale is QUICK else "")
            + ("-fixed-load" if fixed_load else ""))
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out_dir / f"{stem}.md").write_text(table)
    print(table)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--processes", default=None,
                        help="Gateway process counts to measure, e.g. 1,2,4,8,12 (default: 1, 2, 4, 8, "
                             "12 ... up to the cores).")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Runs of each gateway process count, interleaved; the median is reported "
                             "(default 3).")
    parser.add_argument("--fixed-load", action="store_true",
                        help="ingest_processes: one simulator for every process count (the same load "
                             "split over more processes), instead of one per process.")
    parser.add_argument("--only", default=None, help="Comma-separated steps: ingest_processes, "
                        "drain_workers, cluster_vs_single, ack_replicas (default: all).")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.processes.split(",")] if args.processes else None
    only = set(args.only.split(",")) if args.only else None
    return run(QUICK if args.quick else FULL, args.out, counts, only, max(1, args.repeats),
               args.fixed_load)


if __name__ == "__main__":
    raise SystemExit(main())
