"""Reads never starve ingest: worker drain alone vs under a reading load, and the WAL's size.

``python -m bench.ingest_reads [--quick] [--src DIR] [--api-nice N] [--label NAME]``
(quick: a 100,000-record store, about 40 s on 2 cores; full: 1,000,000, about 70 s).

1. **Fill** a SQLite store (``bench.reading.fill``: records over the last 24 h,
   100 / 1,000 devices, the whole search index built).
2. Start the API on it (``python -m fleetlog api``) the way ``fleetlog up`` starts
   it: at the CPU priority :data:`fleetlog.supervise.API_NICE` (``--api-nice``).
3. **Alternate**, in one run: a drain alone, then a drain while 4 reading clients
   (``python -m bench.reading hammer``: each loops over a device's newest 100,
   ``/api/logs?q=`` for a word, and the fleet's volume of a day) read through
   the API, ``pairs`` times.  A drain: N records preloaded into the stream (as
   ``bench/drain.py`` does), a worker (``--max-messages N``) drains them into the
   store; records/s from its ``worker draining`` line to its exit.  A thread
   samples the size of the store's ``-wal`` file every 5 ms during every drain.
   After each drain (and once the clients stopped) the search index is caught
   up, untimed, as an idle worker does: every drain starts from the same state.

Reported: the median drain rate alone and loaded, loaded / alone (target
>= 0.8), the largest WAL seen while readers were busy (target <= 64 MiB), the
reads/s the 4 clients got, and the worker's time running, waiting for a core
and asleep (``/proc/PID/task/*/schedstat``).  ``--src`` runs the API and the
worker from another tree's ``src`` (a before/after comparison; the fill and the
load generator stay this tree's).  Results: ``bench/results/ingest-reads-<date>
[-quick][-label].json`` / ``.md``.  Timings are never asserted: a missed target
is a ``no``; the exit status is 1 only when a step failed to run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import systems
from bench.context import PY, Bench
from bench.procs import Child, ChildFailed, Children, cpu_seconds, wait_for_port
from bench.profile import QUICK as QUICK_PROFILE
from bench.reading import _rows, _Schedstat, _token, fill
from bench.runner import BENCH_DIR, child_env, machine_info, open_redis, say, shut_down
from fleetlog.embedded import RedisServer, free_port
from fleetlog.store.sqlite import SQLiteStore

try:
    from fleetlog.supervise import API_NICE
except ImportError:  # a fleetlog without it runs its API at the default priority
    API_NICE = 0

__all__ = ["FULL", "QUICK", "IngestReadsProfile", "main"]

#: Targets of issue 17 item 8.
TARGET_RATIO = 0.8
TARGET_WAL_MIB = 64.0
#: Reading clients, as in the measurement the issue quotes.
CLIENTS = 4


@dataclass(frozen=True)
class IngestReadsProfile:
    name: str
    records: int
    devices: int
    drain_records: int
    #: (alone, loaded) drains, alternating.
    pairs: int


QUICK = IngestReadsProfile("quick", 100_000, 100, drain_records=80_000, pairs=3)
FULL = IngestReadsProfile("full", 1_000_000, 1_000, drain_records=100_000, pairs=3)


class _WalWatch(threading.Thread):
    """The largest size of ``path`` (the ``-wal`` file) seen, sampled every 5 ms until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.largest = 0
        self.samples = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.largest = max(self.largest, self.path.stat().st_size)
            except OSError:
                pass
            self.samples += 1
            self.stopped.wait(0.005)

    def stop(self) -> int:
        self.stopped.set()
        self.join(5)
        return self.largest


def _mib(size: int) -> float:
    return round(size / 2**20, 1)


def _cpu(children: list[Child]) -> float:
    total = 0.0
    for child in children:
        try:
            total += cpu_seconds(child.pid)
        except psutil.Error:
            pass
    return total


def _drain(bench: Bench, data_dir: Path, records: int, label: str,
           readers: list[Child] | None = None, start_readers: Any = None,
           others: list[Child] | None = None) -> dict[str, Any]:
    """One drain of ``records`` into the store; readers started (if any) just before the worker.

    ``others`` (the API) and ``readers`` (the load generator): their CPU seconds during
    the drain are reported.
    """
    db = data_dir / "fleetlog.db"
    before = _rows(db)
    bench.reset_redis()
    systems.preload("fleetlog", bench.client, records)
    if start_readers is not None:
        start_readers()
    wal = _WalWatch(db.with_name(db.name + "-wal"))
    wal.start()
    argv = systems.worker_argv("fleetlog", bench.redis_server.url, data_dir, records, None)
    worker = bench.children.start(f"worker-{label}", argv, marker=systems.WORKER_READY)
    sampler = _Schedstat(worker.pid)
    sampler.start()
    try:
        started = worker.wait_marker(240)
        at_start = sampler.last
        cpu_before = (_cpu(others or []), _cpu(readers or []), bench.redis_cpu())
        code = worker.wait(240)
        elapsed = time.perf_counter() - started
        cpu_after = (_cpu(others or []), _cpu(readers or []), bench.redis_cpu())
    finally:
        largest = wal.stop()
    sampler.join(5)
    if code != 0:
        raise ChildFailed(f"{worker.name} exited with {code}:\n{worker.tail()}")
    stored = _rows(db) - before
    if stored != records:
        raise ChildFailed(f"{worker.name}: {stored} rows stored of {records} queued")
    wal_after = _mib(wal.path.stat().st_size if wal.path.exists() else 0)
    on_cpu = (sampler.last[0] - at_start[0]) / 1e9
    queued = (sampler.last[1] - at_start[1]) / 1e9
    cpu = (worker.cpu_at_exit or 0.0) - (worker.marker_cpu or 0.0)
    return {"records": records, "elapsed_s": round(elapsed, 3),
            "records_per_s": round(records / elapsed, 1),
            "worker_cpu_s_per_100k": round(cpu * 100_000 / records, 3),
            "worker_running_s": round(on_cpu, 3), "worker_waiting_for_cpu_s": round(queued, 3),
            "worker_asleep_s": round(max(0.0, elapsed - on_cpu - queued), 3),
            # CPU seconds during the drain of the API, the load generator and Redis.
            "api_cpu_s": round(cpu_after[0] - cpu_before[0], 3),
            "loadgen_cpu_s": round(cpu_after[1] - cpu_before[1], 3),
            "redis_cpu_s": round(cpu_after[2] - cpu_before[2], 3),
            "wal_max_mib": _mib(largest), "wal_samples": wal.samples, "wal_mib_after": wal_after}


def _catch_up(db: Path) -> None:
    """Index what the drain left unindexed, as the worker would once idle: every drain
    starts from the same state (and the index lag never passes ``index_max_lag``, which
    would make a worker index during a later drain)."""
    store = SQLiteStore(db)
    try:
        while store.upkeep(20_000) > 0:
            pass
    finally:
        store.close()


def _start_api(bench: Bench, store_url: str, nice: int) -> tuple[Child, str]:
    port = free_port()
    argv = [PY, "-m", "fleetlog", "api", "--port", str(port), "--store", store_url,
            "--redis-url", bench.redis_server.url]
    api = bench.children.start("api", ["nice", "-n", str(nice), *argv] if nice else argv)
    wait_for_port(port, api)
    return api, f"http://127.0.0.1:{port}"


def side_by_side(bench: Bench, data_dir: Path, base: str, profile: IngestReadsProfile,
                 log: Any, api: Child) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"alone": [], "loaded": []}
    for pair in range(profile.pairs):
        log(f"drain alone ({pair + 1}/{profile.pairs}) ...")
        runs["alone"].append(_drain(bench, data_dir, profile.drain_records, f"alone{pair}",
                                    others=[api]))
        _catch_up(data_dir / "fleetlog.db")
        log(f"  {runs['alone'][-1]['records_per_s']} records/s, WAL max "
            f"{runs['alone'][-1]['wal_max_mib']} MiB")
        log(f"drain under {CLIENTS} reading clients ({pair + 1}/{profile.pairs}) ...")
        readers: list[Child] = []

        def start_readers(pair: int = pair, readers: list[Child] = readers) -> None:
            token = _token(bench)  # the reset emptied Redis, tokens too
            readers.append(bench.children.start(
                f"hammer{pair}", [PY, "-m", "bench.reading", "hammer", "--url", base,
                                  "--token", token, "--devices", str(profile.devices),
                                  "--clients", str(CLIENTS), "--seconds", "600"],
                capture_stdout=True))
            time.sleep(1.0)  # the clients are looping, the WAL has readers

        try:
            result = _drain(bench, data_dir, profile.drain_records, f"loaded{pair}",
                            readers, start_readers, others=[api])
        finally:
            for reader in readers:
                reader.stop(timeout=80)
        _catch_up(data_dir / "fleetlog.db")
        out = readers[0].popen.stdout.read() if readers and readers[0].popen.stdout else b""
        load = json.loads(out) if out.strip() else {"error": readers[0].tail() if readers else ""}
        if not load.get("reads"):  # errors (a read over the API's time budget) are reported
            raise ChildFailed(f"the reading load did not read: {load}")
        result["reading_load"] = load
        runs["loaded"].append(result)
        log(f"  {result['records_per_s']} records/s, WAL max {result['wal_max_mib']} MiB, "
            f"{load['reads_per_s']} reads/s, {load.get('errors')} failed")
    alone = statistics.median(r["records_per_s"] for r in runs["alone"])
    loaded = statistics.median(r["records_per_s"] for r in runs["loaded"])
    return {"runs": runs, "alone_records_per_s": round(alone, 1),
            "loaded_records_per_s": round(loaded, 1),
            "loaded_over_alone": round(loaded / alone, 3),
            "wal_max_mib_loaded": max(r["wal_max_mib"] for r in runs["loaded"]),
            "wal_max_mib_alone": max(r["wal_max_mib"] for r in runs["alone"]),
            "reads_per_s_median": statistics.median(
                r["reading_load"]["reads_per_s"] for r in runs["loaded"]),
            "reads_failed": sum(r["reading_load"].get("errors", 0) for r in runs["loaded"])}


def table(results: dict[str, Any]) -> str:
    rows = ["| metric | value | target | met? |", "|---|---:|---:|---|"]
    drain = results.get("drain")
    if not drain:
        return "\n".join(rows)
    ratio, wal = drain["loaded_over_alone"], drain["wal_max_mib_loaded"]
    rows += [
        f"| worker drain alone, records/s (median) | {drain['alone_records_per_s']} | | |",
        f"| worker drain under {CLIENTS} reading clients, records/s (median) | "
        f"{drain['loaded_records_per_s']} | | |",
        f"| drain loaded / alone | {ratio} | >= {TARGET_RATIO} | "
        f"{'yes' if ratio >= TARGET_RATIO else 'no'} |",
        f"| largest WAL while readers were busy, MiB | {wal} | <= {TARGET_WAL_MIB:g} | "
        f"{'yes' if wal <= TARGET_WAL_MIB else 'no'} |",
        f"| largest WAL during the drains alone, MiB | {drain['wal_max_mib_alone']} | | |",
        f"| reads/s the {CLIENTS} clients got (median of the loaded drains) | "
        f"{drain['reads_per_s_median']} | | |",
        f"| reads that failed (over the API's time budget, or refused) | "
        f"{drain['reads_failed']} | | |",
    ]
    for side in ("alone", "loaded"):
        cells = "; ".join(
            f"{r['records_per_s']:.0f} r/s, {r['worker_running_s']} / {r['worker_waiting_for_cpu_s']}"
            f" / {r['worker_asleep_s']} s, {r['redis_cpu_s']} / {r['api_cpu_s']} / "
            f"{r['loadgen_cpu_s']} s" for r in drain["runs"][side])
        rows.append(f"| {side}, per run: rate, worker running / waiting for a core / asleep; CPU of "
                    f"Redis / the API / the load generator | {cells} | | |")
    return "\n".join(rows)


def markdown(results: dict[str, Any]) -> str:
    profile, machine = results["profile"], results.get("machine", {})
    md = (f"# Ingest under reads ({results['mode']}: {profile['records']:,}-record store, "
          f"{profile['drain_records']:,} drained x {profile['pairs']} pairs), {results['date']}"
          f"{' - ' + results['label'] if results.get('label') else ''}\n\n{table(results)}\n\n"
          f"fleetlog from {results['src']}; API at nice {results['api_nice']}, load generator "
          f"at 0; {machine.get('cpu_count')} CPUs ({machine.get('cpu_model')}), shared with "
          f"Redis, the API, the load generator and other engineers' work. "
          f"Wall {results['wall_s']} s.\n")
    if results["errors"]:
        md += "\nErrors:\n" + "".join(f"- {e}\n" for e in results["errors"])
    return md


def run(profile: IngestReadsProfile, out_dir: Path, src: Path, api_nice: int,
        label: str = "") -> int:
    started = time.perf_counter()

    def log(message: str) -> None:
        say(started, message)

    scratch = BENCH_DIR / ".scratch-ingest-reads"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    children = Children(scratch, child_env(src))
    redis_server = RedisServer(scratch / "redis", appendfsync="everysec")
    results: dict[str, Any] = {"date": datetime.date.today().isoformat(), "mode": profile.name,
                               "label": label, "profile": asdict(profile), "src": str(src),
                               "api_nice": api_nice,
                               "targets": {"loaded_over_alone": TARGET_RATIO,
                                           "wal_max_mib": TARGET_WAL_MIB}}
    errors: list[str] = []
    try:
        client = open_redis(redis_server)
        results["machine"] = machine_info(client)
        bench = Bench(QUICK_PROFILE, children, redis_server, client, scratch)
        data_dir = bench.fresh_dir("store")
        db = data_dir / "fleetlog.db"
        log(f"fill {profile.records} records from {profile.devices} devices ...")
        results["fill"] = fill(db, profile.records, profile.devices, int(time.time() * 1000))
        api, base = _start_api(bench, f"sqlite:///{db}", api_nice)
        try:
            results["drain"] = side_by_side(bench, data_dir, base, profile, log, api)
        except Exception as exc:
            errors.append(f"drain: {type(exc).__name__}: {exc}"[:1500])
            log(f"drain FAILED:\n{traceback.format_exc()}")
        api.stop()
        client.close()
    except Exception as exc:
        errors.append(f"setup: {type(exc).__name__}: {exc}"[:1500])
        log(f"setup FAILED:\n{traceback.format_exc()}")
    finally:
        errors += shut_down(redis_server, children)
    shutil.rmtree(scratch, ignore_errors=True)
    results["errors"] = errors
    results["wall_s"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / ("ingest-reads-" + results["date"] + ("-quick" if profile.name == "quick" else "")
                      + (f"-{label}" if label else ""))
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    Path(f"{stem}.md").write_text(md)
    log(f"wrote {stem}.json, {stem}.md")
    print(md)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_reads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 100,000-record store, ~1 min")
    parser.add_argument("--src", type=Path, default=BENCH_DIR.parent / "src",
                        help="the fleetlog src the API and the worker run (default: this tree's)")
    parser.add_argument("--api-nice", type=int, default=API_NICE,
                        help=f"the API's nice value (default {API_NICE}: as `fleetlog up` runs it)")
    parser.add_argument("--label", default="", help="added to the results' file names")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return run(QUICK if args.quick else FULL, args.out, args.src.resolve(), args.api_nice,
               args.label)


if __name__ == "__main__":
    sys.exit(main())
