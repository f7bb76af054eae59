"""Worker drain: preload N records, time a worker from its loop start to its exit after N.

The queue is filled the way each system's gateway fills it, so that only the
worker is measured: the seed's list by pipelined ``LPUSH``es, fleetlog's stream
by the revision's own producer (:mod:`bench.preload`: packed entries where the
revision packs them).  The clock starts at the worker's
``worker draining`` stderr line (after imports, Redis connect, store open),
and its CPU is counted from the same moment to its exit (rusage).  What it
stored is read back and must match what was queued, or the drain failed.
"""

from __future__ import annotations

import time
from typing import Any

from bench import systems
from bench.context import PY, Bench
from bench.procs import ChildFailed

__all__ = ["drain"]


def drain(bench: Bench, system: str, with_files: bool) -> dict[str, Any]:
    records = bench.profile.drain_records
    bench.reset_redis()
    if system == "fleetlog":  # as this revision's own gateway queues them (packed entries)
        loader = bench.children.start("preload", [PY, "-m", "bench.preload", "--redis-url",
                                                  bench.redis_server.url, "--records", str(records)])
        if loader.wait(bench.profile.run_timeout) != 0:
            raise ChildFailed(f"preload exited with {loader.popen.returncode}:\n{loader.tail()}")
    else:
        systems.preload(system, bench.client, records)
    sink = "files" if system == "baseline" else ("sqlite+files" if with_files else "sqlite")
    data_dir = bench.fresh_dir(f"drain-{system}-{sink.replace('+', '-')}")
    files = data_dir / "files" if with_files or system == "baseline" else None
    argv = systems.worker_argv(system, bench.redis_server.url, data_dir, records, files)
    worker = bench.children.start(f"{system}-worker-{sink}", argv, marker=systems.WORKER_READY)
    timeout = bench.profile.run_timeout * 2
    started = worker.wait_marker(timeout)
    code = worker.wait(timeout)
    elapsed = time.perf_counter() - started
    if code != 0:
        raise ChildFailed(f"{worker.name} exited with {code}:\n{worker.tail()}")
    cpu = (worker.cpu_at_exit or 0.0) - (worker.marker_cpu or 0.0)
    result: dict[str, Any] = {
        "sink": sink,
        "records": records,
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(records / elapsed, 1),
        "worker_cpu_s_per_100k": round(cpu * 100_000 / records, 3),
    }
    if system == "fleetlog":
        result["verify_sqlite"] = systems.verify_sqlite(data_dir / "fleetlog.db", records)
        verified = bool(result["verify_sqlite"]["ok"])
    else:
        result["queue_left"] = bench.client.llen(systems.LEGACY_LIST)
        verified = result["queue_left"] == 0
    if files is not None:
        result["file_lines"] = systems.count_file_lines(files)
        verified = verified and result["file_lines"] == records
    result["verified"] = verified
    if not verified:
        raise ChildFailed(f"{worker.name}: stored data does not match what was queued: {result}")
    return result
