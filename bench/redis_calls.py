"""``python -m bench.redis_calls``: where Redis's CPU goes while the gateway ingests.

One legacy (or ``--batch N`` v2) closed-loop run against one gateway and a
private Valkey (``appendfsync everysec``, as the other benchmarks), with the
server's ``INFO commandstats`` reset before it: records per ingest call, the
Redis CPU per record (``INFO cpu``), the part of it spent inside
commands, and so the part spent around them (event loop, socket reads and
writes, the AOF write of each loop turn); then the floor of
:mod:`bench.floor` on the same server.  It explains ``redis_vs_plain_xadd``:
what a record costs is mostly what a call costs, divided by the records a call
carries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.context import redis_cpu_seconds
from bench.floor import FLOOR_STREAM
from bench.runner import child_env
from bench.systems import gateway_argv, record_json
from fleetlog.embedded import RedisServer
from fleetlog.net import free_port, wait_for_port

__all__ = ["main", "measure"]

_PY = sys.executable
#: The calls the gateway makes per ingest call: the scripts (by SHA), and the legacy
#: calls it knows are under the backlog limit, as a MULTI/EXEC (scripts.plain_append).
_INGEST = "cmdstat_evalsha"
_APPEND = "cmdstat_exec"


def measure(
    root: Path, devices: int, messages: int, batch: int, linger: float | None = None
) -> dict[str, Any]:
    server = RedisServer(root / "redis", appendfsync="everysec")
    server.start()
    port = free_port()
    # One gateway process, as the other benchmarks (child_env): two would each make smaller calls.
    argv = gateway_argv("fleetlog", port, server.url, root / "data")
    if linger is not None:
        argv += ["--ingest-linger", str(linger)]
    gateway = subprocess.Popen(argv, env=child_env(), stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30)
        client = redis.Redis(port=server.port)
        client.config_resetstat()
        started = redis_cpu_seconds(client)
        argv = [_PY, "-m", "fleetlog", "simulate", "--url", f"ws://127.0.0.1:{port}", "--devices",
                str(devices), "--messages", str(messages), "--json", "--prefix", "calls-"]
        if batch:
            argv += ["--batch", str(batch)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
        spent = redis_cpu_seconds(client) - started
        acked = int(json.loads(out.strip().splitlines()[-1])["acked"])
        stats = client.info("commandstats")
        in_commands = sum(float(value["usec"]) for value in stats.values()) / 1e6
        scripts = int(stats.get(_INGEST, {}).get("calls", 0))
        appends = int(stats.get(_APPEND, {}).get("calls", 0))
        calls = scripts + appends

        client.delete(FLOOR_STREAM)
        floor_started = redis_cpu_seconds(client)
        for at in range(0, acked, 100):
            pipe = client.pipeline(transaction=False)
            for seq in range(at, min(at + 100, acked)):
                device = f"floor-{seq % 100:04d}"
                pipe.xadd(FLOOR_STREAM, {"d": device, "r": record_json(device, seq)})
            pipe.execute()
        floor = redis_cpu_seconds(client) - floor_started
        client.close()
        per_record = spent * 1e6 / acked
        return {
            "acked": acked,
            "ingest_calls": calls,
            "of_them_appends": appends,
            "records_per_call": round(acked / calls, 1) if calls else None,
            "redis_us_per_record": round(per_record, 2),
            "in_commands_us_per_record": round(in_commands * 1e6 / acked, 2),
            "around_commands_us_per_call": round((spent - in_commands) * 1e6 / calls, 1) if calls else None,
            "ingest_script_us_per_call": float(stats.get(_INGEST, {}).get("usec_per_call", 0.0)),
            "plain_xadd_us_per_record": round(floor * 1e6 / acked, 2),
            "redis_vs_plain_xadd": round(spent / floor, 3) if floor else None,
        }
    finally:
        gateway.terminate()
        gateway.wait(30)
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_calls", description=__doc__)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--messages", type=int, default=1000, help="Frames per device.")
    parser.add_argument("--batch", type=int, default=0, help="Records per v2 frame (0: legacy).")
    parser.add_argument("--linger", type=float, default=None,
                        help="The gateway's --ingest-linger (seconds; 0: off; default: the gateway's).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetlog-redis-calls-") as directory:
        started = time.monotonic()
        result = measure(Path(directory), args.devices, args.messages, args.batch, args.linger)
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
