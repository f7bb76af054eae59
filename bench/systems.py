"""The two systems under test, behind one small interface.

Both are started the same way (a separate process per gateway and worker,
same interpreter, same private Redis) and differ only in what they are:

* ``baseline``: :mod:`bench.baseline`, the original PHP design ported;
* ``fleetlog``: ``python -m fleetlog gateway`` / ``worker`` from this repo.

A drain needs the queue filled the way each system's gateway fills it: the
baseline's ``LPUSH device:log:list <json>``, fleetlog's ``XADD
fleetlog:records * d <device> r <json>``.  Preloading directly (pipelined)
keeps the gateway out of the worker's measurement.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "FLEETLOG_GATEWAY_FLAGS",
    "SYSTEMS",
    "WORKER_READY",
    "count_file_lines",
    "gateway_argv",
    "preload",
    "record_json",
    "verify_sqlite",
    "worker_argv",
]

SYSTEMS = ("baseline", "fleetlog")
STREAM = "fleetlog:records"
LEGACY_LIST = "device:log:list"
_PY = sys.executable

#: Legacy devices cannot authenticate, and the original had no limits: the
#: gateway runs as it must for a legacy fleet (``--auth none``), with the
#: per-device rate limits and the per-address connection cap set out of reach
#: (they are policy, not capacity; the limiter still runs on every frame).
#: Policy limits out of reach, so that capacity is measured: per-device rates, the per-address
#: cap, and the backlog limit (no worker drains during ingest runs; a v2 run queues millions).
FLEETLOG_GATEWAY_FLAGS = ("--auth", "none", "--rate-records", "1e9", "--rate-bytes", "1e12",
                          "--max-connections-per-ip", "1000000", "--max-backlog", "1000000000")


def gateway_argv(system: str, port: int, redis_url: str, data_dir: Path) -> list[str]:
    if system == "baseline":
        return [_PY, "-m", "bench.baseline.gateway", "--port", str(port), "--redis-url", redis_url]
    return [_PY, "-m", "fleetlog", "gateway", "--redis-url", redis_url, "--port", str(port),
            "--data-dir", str(data_dir), *FLEETLOG_GATEWAY_FLAGS]


def worker_argv(
    system: str, redis_url: str, data_dir: Path, records: int, files: Path | None
) -> list[str]:
    if system == "baseline":
        assert files is not None, "the baseline worker only writes files"
        return [_PY, "-m", "bench.baseline.worker", "--redis-url", redis_url, "--dir", str(files),
                "--max-messages", str(records)]
    argv = [_PY, "-m", "fleetlog", "worker", "--redis-url", redis_url, "--data-dir", str(data_dir),
            "--max-messages", str(records)]
    if files is not None:
        argv += ["--files", str(files)]
    return argv


#: The stderr line both workers print just before their loop starts.
WORKER_READY = b"worker draining"


def record_json(device: str, seq: int) -> bytes:
    """The same record shape ``fleetlog simulate`` sends, as queued JSON."""
    return orjson.dumps({"seq": seq, "ts": 1_700_000_000_000 + seq, "level": "info",
                         "msg": f"simulated record {seq} from {device} 設備"})


def preload(system: str, client: Any, records: int, devices: int = 100) -> None:
    """Queue ``records`` records, 2000 per pipeline: as the seed's gateway does (LPUSH), or
    for fleetlog one stream entry per record, the format every fleetlog worker reads.

    The drain benchmark fills fleetlog's stream with the revision's own producer instead
    (:mod:`bench.preload`: packed entries where the revision packs them).
    """
    pipe = client.pipeline(transaction=False)
    for seq in range(records):
        device = f"drain-{seq % devices:04d}"
        if system == "baseline":
            pipe.lpush(LEGACY_LIST, record_json(device, seq))
        else:
            pipe.xadd(STREAM, {"d": device, "r": record_json(device, seq)})
        if seq % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def verify_sqlite(db_path: Path, expected: int) -> dict[str, Any]:
    """Rows, device totals and a search hit, read back from the worker's database.

    The worker builds the full-text index after the ingest commit, when it is
    idle; a worker that exits right after its last batch leaves it behind.  So
    this checks that ``--grep`` finds a record before the index has it, then
    times the index catching up (what the worker would do next) and checks the
    index itself finds the record.
    """
    from fleetlog.store import LogQuery
    from fleetlog.store.sqlite import SQLiteStore

    store = SQLiteStore(db_path)
    try:
        rows = store._db.execute("SELECT count(*) FROM records").fetchone()[0]
        devices = sum(device.records for device in store.devices())
        query = LogQuery("drain-0007", grep="record 7 from drain-0007", limit=10)
        grep_before = len(store.query(query))
        lag = store.index_lag()
        started = time.perf_counter()
        while store.index_step(5000):
            pass
        index_elapsed = time.perf_counter() - started
        # The index's own table: search_fts (schema 6 on) or records_fts (older revisions).
        table = "search_fts" if store._db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'search_fts'").fetchone() else "records_fts"
        fts_hits = store._db.execute(
            f"SELECT count(*) FROM {table} WHERE {table} MATCH ?", ['"record 7 from drain-0007"']
        ).fetchone()[0]
    finally:
        store.close()
    return {"rows": rows, "device_total": devices, "grep_hits_before_index": grep_before,
            "fts_hits": fts_hits, "index_lag_at_exit": lag,
            "index_records_per_s": round(lag / index_elapsed, 1) if lag and index_elapsed else None,
            "ok": rows == expected and devices == expected and grep_before >= 1 and fts_hits >= 1}


def count_file_lines(root: Path) -> int:
    """Lines in every daily file under ``root/device/log``."""
    total = 0
    for path in (root / "device" / "log").glob("*.log"):
        with path.open("rb") as handle:
            total += sum(1 for _ in handle)
    return total
