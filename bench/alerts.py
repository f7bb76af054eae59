"""What alerts cost: the worker's drain with and without 50 rules, and match-to-notify latency.

``python -m bench.alerts [--records N] [--rounds R] [--pings P] [--quick]``

Drain (same run, interleaved rounds, medians): N records preloaded into a
private Valkey stream (100 devices: door-, kiosk-, sensor- and pump-; about 1%
errors), a fresh SQLite store, one worker with ``--max-messages N``; the clock
runs from its ``worker draining`` line to its exit, as in ``bench/drain.py``.
Three ways, each round in a rotated order:

* ``none``: no alerter at all;
* ``idle``: an alerter with no rule (what ``fleetlog up`` runs by default);
* ``rules``: an alerter with 50 rules (10 over every device, 40 with a device
  selector), evaluating the records as they are stored, delivering what fires
  to a local webhook.

Reported: drain records/s of each, the ratio rules/none, how long after the
drain the alerter had evaluated everything, and its CPU per 100k records.

Latency: a gateway, a worker, an alerter with the same 50 rules plus one that
matches ``message == "ping"`` (per device, ``--group-wait 0s``), and P pings
from 20 devices, each one ping every 1.5 s, staggered (a ping every 75 ms
in all; each its own firing).  The
latency of a ping is the time its webhook arrived minus its ``received_at``
(when the gateway queued it: queue, store, evaluation, commit, delivery), and
minus when the device sent it (the ack round trip too).

Numbers only, nothing asserted; results in ``bench/results/alerts-DATE.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis
import websockets

from fleetlog.alerts.book import AlertBook
from fleetlog.alerts.rules import parse_spec
from fleetlog.embedded import RedisServer
from fleetlog.net import free_port, wait_for_port
from fleetlog.store import open_store

_PY = sys.executable
_KINDS = ("door", "kiosk", "sensor", "pump")


class Hook:
    """A local webhook that notes when each notification arrived."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.arrivals.append((time.time(), json.loads(raw)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rules_50(hook: str) -> list[dict[str, Any]]:
    """Fifty rules of the kinds the issue names: text, levels, data fields, selectors, thresholds."""
    rules: list[dict[str, Any]] = []
    fleet = ['level == "error"', 'message.contains("jam")', "data.temp > 95",
             'level == "fatal" || message.contains("panic")', 'message.matches("^door (forced|held)")',
             'has(data.code) && data.code >= 500', 'level == "warn" && data.temp > 90',
             'device_id.endsWith("-0042")', 'message.contains("overheat") && data.temp > 80',
             "data.seq % 100000 == 99999"]
    for index, when in enumerate(fleet):
        rules.append({"name": f"fleet-{index}", "when": when, "count": 1 + index % 3 * 2, "within": "1m"})
    for index in range(40):
        kind = _KINDS[index % 4]
        devices = f"{kind}-*" if index < 24 else f"{kind}-{index:04d}"
        when = ['level == "error"', "data.temp > 90", 'message.contains("fault")',
                'level in ["error", "fatal"] && data.temp > 50'][index % 4]
        rules.append({"name": f"{kind}-{index}", "when": when, "devices": devices,
                      "count": 1 + index % 5, "within": "3m", "per": "device" if index % 2 else "fleet"})
    for rule in rules:
        rule["to"] = [hook]
        rule["group_wait"] = "10s"
    return rules


def record(device_index: int, seq: int) -> tuple[str, bytes]:
    device = f"{_KINDS[device_index % 4]}-{device_index:04d}"
    roll = random.random()
    level = "error" if roll < 0.01 else "warn" if roll < 0.05 else "info"
    data = {"seq": seq, "ts": 1_700_000_000_000 + seq, "level": level, "temp": random.randint(20, 99),
            "msg": f"reading {seq} from {device}" + (" jam" if roll < 0.001 else "")}
    return device, orjson.dumps(data)


def preload(client: redis.Redis, records: int) -> None:
    random.seed(7)
    pipe = client.pipeline(transaction=False)
    for seq in range(records):
        device, raw = record(seq % 100, seq)
        pipe.xadd("fleetlog:records", {"d": device, "r": raw})
        if seq % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def wait_line(log: Path, text: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return time.perf_counter()
        time.sleep(0.005)
    raise TimeoutError(f"{text!r} not in {log} after {timeout}s:\n{log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def drain_once(root: Path, redis_server: RedisServer, records: int, mode: str, hook: Hook,
               index: int) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    data_dir = root / f"drain-{index}-{mode}"
    data_dir.mkdir()
    open_store(f"sqlite:///{data_dir / 'fleetlog.db'}").close()
    book = AlertBook(client)
    if mode == "rules":
        for rule in rules_50(hook.url):
            book.add(parse_spec(rule))
    preload(client, records)
    alerter = None
    alerter_cpu0 = 0.0
    if mode != "none":
        log = data_dir / "alerter.log"
        alerter = start([_PY, "-m", "fleetlog", "alerter", "--redis-url", redis_server.url, "--data-dir",
                         str(data_dir), "--consumer", "bench"], log)
        wait_line(log, "took the alerter lease", 30)
        time.sleep(1.0)  # an empty store: every rule joins at once
        alerter_cpu0 = _cpu(alerter.pid)
    log = data_dir / "worker.log"
    worker = start([_PY, "-m", "fleetlog", "worker", "--redis-url", redis_server.url, "--data-dir",
                    str(data_dir), "--max-messages", str(records)], log)
    started = wait_line(log, "worker draining", 60)
    alerter_cpu_start = _cpu(alerter.pid) if alerter is not None else 0.0
    worker.wait(600)
    elapsed = time.perf_counter() - started
    alerter_cpu_drain = (_cpu(alerter.pid) - alerter_cpu_start) if alerter is not None else 0.0
    result: dict[str, Any] = {"mode": mode, "records": records, "elapsed_s": round(elapsed, 3),
                              "records_per_s": round(records / elapsed, 1)}
    if alerter is not None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            cursor = client.get("fleetlog:{alerts}:cursor")
            if cursor and orjson.loads(cursor)["seq"] >= records:
                break
            time.sleep(0.01)
        result["alerter_cpu_share_during_drain"] = round(alerter_cpu_drain / elapsed, 3)
        result["alerter_done_after_drain_s"] = round(time.perf_counter() - started - elapsed, 3)
        result["alerter_cpu_s_per_100k"] = round((_cpu(alerter.pid) - alerter_cpu0) * 100_000 / records, 3)
        stats = book.stats()
        result["evaluations"] = stats.get("evaluations", 0)
        result["firings"] = stats.get("firings", 0)
        stop(alerter)
    client.close()
    return result


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def drain(root: Path, records: int, rounds: int, hook: Hook) -> dict[str, Any]:
    redis_server = RedisServer(root / "redis", appendfsync="everysec")
    redis_server.start()
    runs: list[dict[str, Any]] = []
    modes = ["none", "idle", "rules"]
    try:
        for round_index in range(rounds):
            order = modes[round_index % 3:] + modes[:round_index % 3]
            for mode in order:
                result = drain_once(root, redis_server, records, mode, hook, round_index)
                print(json.dumps(result), flush=True)
                runs.append(result)
    finally:
        redis_server.stop()
    medians = {mode: statistics.median(r["records_per_s"] for r in runs if r["mode"] == mode)
               for mode in modes}
    return {"runs": runs, "median_records_per_s": medians,
            "ratio_rules_vs_none": round(medians["rules"] / medians["none"], 3),
            "ratio_idle_vs_none": round(medians["idle"] / medians["none"], 3)}


async def _pinger(url: str, device: str, pings: int, spacing: float, sent: dict[str, float],
                  offset: float) -> None:
    async with websockets.connect(url) as ws:
        await asyncio.sleep(offset)
        for n in range(pings):
            key = f"{device}/{n}"
            sent[key] = time.time()
            await ws.send(json.dumps({"deviceId": device, "type": 4, "data": {"msg": "ping", "key": key}}))
            await ws.recv()
            await ws.recv()
            await asyncio.sleep(spacing)


def latency(root: Path, pings: int, hook: Hook) -> dict[str, Any]:
    redis_server = RedisServer(root / "redis-latency")
    redis_server.start()
    data_dir = root / "latency"
    port = free_port()
    env = {"FLEETLOG_RATE_RECORDS": "1000000", "FLEETLOG_PROCESSES": "1"}
    common = ["--redis-url", redis_server.url, "--data-dir", str(data_dir)]
    client = redis.Redis.from_url(redis_server.url)
    book = AlertBook(client)
    for rule in rules_50(hook.url):
        book.add(parse_spec(rule))
    book.add(parse_spec({"name": "ping", "when": 'message == "ping"', "within": "1s", "group_wait": "0s",
                         "to": [hook.url]}))
    processes = [
        start([_PY, "-m", "fleetlog", "gateway", *common, "--port", str(port), "--auth", "none"],
              root / "latency-gateway.log", env),
        start([_PY, "-m", "fleetlog", "worker", *common], root / "latency-worker.log", env),
    ]
    try:
        wait_for_port(port, timeout=30)
        while not (data_dir / "fleetlog.db").exists():
            time.sleep(0.05)
        processes.append(start([_PY, "-m", "fleetlog", "alerter", *common], root / "latency-alerter.log",
                               env))
        wait_line(root / "latency-alerter.log", "took the alerter lease", 60)
        time.sleep(1.0)
        sent: dict[str, float] = {}
        devices = 20
        per_device = max(1, pings // devices)

        async def fleet() -> None:
            await asyncio.gather(*(_pinger(f"ws://127.0.0.1:{port}", f"pinger-{d:02d}", per_device, 1.5, sent,
                                           1.5 * d / devices) for d in range(devices)))

        asyncio.run(fleet())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _pings(hook) < devices * per_device:
            time.sleep(0.05)
    finally:
        for process in reversed(processes):
            stop(process)
        client.close()
        redis_server.stop()
    from_queue, from_send = [], []
    for arrived, body in hook.arrivals:
        if body["rule"]["name"] != "ping":
            continue
        for sample in body["firing"]["samples"]:
            received = datetime.datetime.fromisoformat(sample["received_at"].replace("Z", "+00:00"))
            from_queue.append((arrived - received.timestamp()) * 1000)
            from_send.append((arrived - sent[sample["data"]["key"]]) * 1000)
    return {"pings": devices * per_device, "notified": len(from_queue),
            "from_received_at_ms": _percentiles(from_queue), "from_device_send_ms": _percentiles(from_send)}


def _pings(hook: Hook) -> int:
    return sum(1 for _, body in hook.arrivals if body["rule"]["name"] == "ping")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alerts", description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pings", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="100k records, 3 rounds, 200 pings.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.records, args.rounds, args.pings = 100_000, 3, 200
    hook = Hook()
    with tempfile.TemporaryDirectory(prefix="fleetlog-bench-alerts-") as tmp:
        root = Path(tmp)
        drained = drain(root, args.records, args.rounds, hook)
        print(json.dumps({key: drained[key] for key in drained if key != "runs"}), flush=True)
        hook.arrivals.clear()
        latencies = latency(root, args.pings, hook)
        print(json.dumps(latencies), flush=True)
    hook.close()
    result = {"date": datetime.date.today().isoformat(), "machine": {"cpus": os.cpu_count(),
              "python": platform.python_version()}, "drain": drained, "latency": latencies,
              "config": vars(args) | {"out": str(args.out)}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"alerts-{result['date']}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
