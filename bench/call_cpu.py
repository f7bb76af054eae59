"""``python -m bench.call_cpu``: the gateway's CPU for one ingest call, without the gateway.

What one call costs the process that makes it (its CPU, not Redis's): the
runners of :mod:`fleetlog.queue.script_runner` send ``calls`` calls of
``records`` legacy records each, one after the other, to a private Valkey
(``appendfsync everysec``, as the other benchmarks), after a warm-up; the
plain append (``MULTI``/``EXEC``, what a legacy call under the backlog limit
is) and the ingest script of legacy calls (``EVALSHA``), each the median of
``--repeats`` runs.  Below the gateway's saturation a call carries a handful
of records (6-10 at half of the maximum legacy rate on 2 cores), so what a
call costs is a good part of what a record does.  ``git stash`` or a checkout
of another revision runs it against that revision's runners.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.systems import record_json
from fleetlog.embedded import RedisServer
from fleetlog.queue import scripts
from fleetlog.queue.connection import connect_async
from fleetlog.queue.script_runner import RedisAppend, RedisScript, ScriptRunner

__all__ = ["main", "measure"]

_STREAM, _COUNTER = "fleetlog:records", "fleetlog:records:backlog"


async def _cpu_per_call(url: str, kind: str, calls: int, records: int) -> dict[str, float]:
    client = connect_async(url, timeout=5.0)
    try:
        runner: ScriptRunner
        blob = b"\n".join(record_json("dev-0001", seq) for seq in range(records))
        if kind == "append":
            runner, args = RedisAppend(client), [records, "dev-0001", records, blob]
        else:
            runner = RedisScript(client, scripts.INGEST_PLAIN)
            args = [10**12, records, "dev-0001", records, blob]
        for _ in range(max(100, calls // 10)):  # connections made, script loaded
            await runner.run([_STREAM, _COUNTER], args)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await runner.run([_STREAM, _COUNTER], args)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await client.delete(_STREAM, _COUNTER)
        return {"cpu_us_per_call": cpu * 1e6 / calls, "wall_us_per_call": wall * 1e6 / calls}
    finally:
        await client.aclose()


def measure(root: Path, calls: int, records: int, repeats: int) -> dict[str, Any]:
    server = RedisServer(root / "redis", appendfsync="everysec")
    server.start()
    try:
        result: dict[str, Any] = {"calls": calls, "records_per_call": records}
        for kind in ("append", "script"):
            runs = [uvloop.run(_cpu_per_call(server.url, kind, calls, records)) for _ in range(repeats)]
            result[kind] = {key: round(statistics.median(run[key] for run in runs), 1)
                            for key in runs[0]}
            result[kind]["cpu_us_per_call_repeats"] = [round(run["cpu_us_per_call"], 1) for run in runs]
        return result
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.call_cpu", description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--records", type=int, default=10, help="Legacy records per call.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetlog-call-cpu-") as directory:
        result = measure(Path(directory), args.calls, args.records, args.repeats)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
