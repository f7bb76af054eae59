"""The original ThinkPHP ``device:log:list`` command, ported.

It loops on ``BRPOP device:log:list`` (one record per round trip, no
acknowledgement), ``json_decode``s the record and logs it with a Monolog-style
``info('設備日誌', $data)`` to the ``device/log`` channel: one line per record,
appended to ``ROOT/device/log/YYYYMMDD.log`` by opening the file, writing and
closing it (the write reaches the kernel at once, as Monolog's StreamHandler
flushes every record; neither fsyncs).  The PHP version also printed two
console lines per record; they go nowhere here, which only favours the port.

``--max-messages N`` makes it exit after N records, so a benchmark can time a
drain; ``worker draining`` on stderr marks the moment the loop starts.

Run: ``python -m bench.baseline.worker --redis-url URL --dir ROOT --max-messages N``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

LOG_LIST = "device:log:list"
CHANNEL = "device/log"
MESSAGE = "設備日誌"  # "device log"


def monolog_line(context: Any, now: datetime) -> str:
    """Monolog's LineFormatter: ``[%datetime%] %channel%.%level_name%: %message% %context% %extra%``."""
    encoded = json.dumps(context, ensure_ascii=False, separators=(",", ":"))
    return f"[{now.isoformat()}] {CHANNEL}.INFO: {MESSAGE} {encoded} []\n"


def write_record(root: Path, context: Any) -> None:
    """Open, append one line, close: what a per-call logger does for every record."""
    now = datetime.now().astimezone()
    directory = root / "device" / "log"
    with (directory / f"{now:%Y%m%d}.log").open("a", encoding="utf-8") as handle:
        handle.write(monolog_line(context, now))


def run(redis_url: str, root: Path, max_messages: int | None, max_runtime: float) -> int:
    client: Any = redis.Redis.from_url(redis_url)
    (root / "device" / "log").mkdir(parents=True, exist_ok=True)
    print(f"worker draining {LOG_LIST}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = 0
    while max_messages is None or done < max_messages:
        remaining = max_runtime - (time.monotonic() - started)
        if remaining <= 0:
            return 1
        task = client.brpop(LOG_LIST, timeout=max(1, min(int(remaining), 5)))
        if not task:
            continue
        write_record(root, json.loads(task[1]))
        done += 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--dir", type=Path, required=True, help="Log root (ROOT/device/log/).")
    parser.add_argument("--max-messages", type=int, default=None)
    parser.add_argument("--max-runtime", type=float, default=3600.0, help="As the original: 3600 s.")
    args = parser.parse_args()
    sys.exit(run(args.redis_url, args.dir, args.max_messages, args.max_runtime))
