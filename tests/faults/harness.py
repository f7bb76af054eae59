"""A whole fleetlog under load, with handles to break its parts, and the loss check.

Every scenario runs real processes: a private Redis (AOF, appendfsync always),
gateways, workers and the simulator (v2 frames with per-device ``seq``, the
reference client that resends until acked).  :meth:`Fleet.verify` compares what
the simulator was acked with what the store holds: lost = acked but not stored,
duplicated = stored more than once.  Each scenario appends its row to
``$FLEETLOG_FAULTS_REPORT`` (``make faults`` prints them as a table).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from fleetlog.embedded import RedisServer, free_port
from tests.conftest import Processes, wait_for_port
from tests.helpers import read_only


@dataclass
class Outcome:
    scenario: str
    acked: int
    stored: int
    lost: int
    duplicated: int
    recovery_s: float
    note: str = ""

    def record(self) -> None:
        report = os.environ.get("FLEETLOG_FAULTS_REPORT")
        if report:
            with open(report, "a") as handle:
                handle.write(json.dumps(self.__dict__) + "\n")


class Fleet:
    """``store_url``: the workers' store (default: SQLite in the data dir)."""

    def __init__(self, tmp_path: Path, *, heartbeat_ttl: float = 2.0,
                 store_url: str | None = None) -> None:
        self.tmp = tmp_path
        self.data_dir = tmp_path / "data"
        self.store_url = store_url
        self.redis = RedisServer(tmp_path / "redis", appendfsync="always")
        self.redis.start()
        self.procs = Processes(tmp_path)
        self.port = free_port()
        self.metrics_port = free_port()  # the gateway's metrics listener: /metrics, detailed /healthz
        # One gateway process: the scenarios kill and restart "the gateway" as one node
        # (`gateway --processes` has its own test of a killed child).
        self.env = {"FLEETLOG_HEARTBEAT_TTL": str(heartbeat_ttl), "FLEETLOG_RATE_RECORDS": "1000000",
                    "FLEETLOG_RATE_BYTES": "1000000000", "FLEETLOG_PROCESSES": "1",
                    "FLEETLOG_GATEWAY_METRICS_PORT": str(self.metrics_port)}
        self.gateway: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.simulator: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start_gateway(self, *extra: str) -> subprocess.Popen[bytes]:
        self.gateway = self.procs.start(
            "gateway", "--redis-url", self.redis.url, "--data-dir", str(self.data_dir),
            "--port", str(self.port), "--auth", "none", *extra, env=self.env)
        wait_for_port(self.port, process=self.gateway)
        return self.gateway

    def start_worker(self, *extra: str, consumer: str = "w") -> subprocess.Popen[bytes]:
        self.worker = self.procs.start(
            "worker", "--redis-url", self.redis.url, "--data-dir", str(self.data_dir),
            "--files", str(self.data_dir / "logs"), "--claim-idle", "1", "--consumer", consumer,
            *(("--store", self.store_url) if self.store_url else ()), *extra, env=self.env)
        return self.worker

    def start(self, *gateway_args: str, worker_args: Sequence[str] = ()) -> None:
        """Start the gateway (``gateway_args``), then a worker (``worker_args``): a scenario's opening."""
        self.start_gateway(*gateway_args)
        self.start_worker(*worker_args)

    def simulate(self, devices: int, messages: int, *, batch: int = 10, rate: float = 0,
                 timeout: float = 180) -> subprocess.Popen[bytes]:
        self.acked_file = self.tmp / "acked.json"
        self.sim_out = self.tmp / "simulate.json"
        self.simulator = subprocess.Popen(
            [sys.executable, "-m", "fleetlog", "simulate", "--url", self.url, "--devices",
             str(devices), "--messages", str(messages), "--batch", str(batch), "--rate", str(rate),
             "--timeout", str(timeout), "--json", "--acked-file", str(self.acked_file)],
            stdout=self.sim_out.open("wb"), stderr=subprocess.DEVNULL)
        return self.simulator

    def wait_simulation(self, *, acked: int, timeout: float = 240) -> dict[str, Any]:
        """Wait for the simulator to finish; assert it was acked ``acked`` records; its summary."""
        assert self.simulator is not None
        self.simulator.wait(timeout)
        summary: dict[str, Any] = json.loads(self.sim_out.read_text())
        assert summary["acked"] == acked, summary
        return summary

    def healthz(self, *, detail: bool = False) -> tuple[int, dict[str, Any] | None]:
        """The gateway's ``/healthz``: its HTTP status, and its JSON body when that is 200.

        ``detail``: the metrics listener's, with the node id and the connection count.
        """
        port = self.metrics_port if detail else self.port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                body: dict[str, Any] = json.loads(response.read())
                return int(response.status), body
        except urllib.error.HTTPError as error:
            return error.code, None

    def connections(self) -> int:
        """The devices connected to the gateway, per its detailed ``/healthz`` (which must answer 200)."""
        status, body = self.healthz(detail=True)
        assert status == 200 and body is not None, f"/healthz answered {status}"
        return int(body["connections"])

    def worker_log(self, n: int = 1) -> str:
        """The output of the worker that was the ``n``-th process started (counting from 0):
        ``worker-1.log`` is the first worker after the gateway."""
        return (self.tmp / f"worker-{n}.log").read_text()

    @contextmanager
    def redis_client(self) -> Iterator[redis.Redis]:
        """A client of the fleet's Redis, closed on leaving the block."""
        client = redis.Redis.from_url(self.redis.url)
        try:
            yield client
        finally:
            client.close()

    def stored(self) -> Counter[tuple[str, int]]:
        """(device, seq) of every stored record, with how many times each is there."""
        if self.store_url is not None:
            return self._stored_postgresql(self.store_url)
        try:  # read-only: never a file created at the path (see tests.helpers.read_only)
            db = read_only(self.data_dir, timeout=30)
        except sqlite3.OperationalError:
            return Counter()
        try:
            rows = db.execute("SELECT device_id, json_extract(data, '$.seq') FROM records").fetchall()
        except sqlite3.OperationalError:
            return Counter()
        finally:
            db.close()
        return Counter((device, seq) for device, seq in rows if seq is not None)

    @staticmethod
    def _stored_postgresql(url: str) -> Counter[tuple[str, int]]:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                rows = conn.execute(
                    "SELECT device_id, (data::jsonb ->> 'seq')::bigint FROM records"
                    " WHERE left(data, 1) = '{'").fetchall()
        except psycopg.Error:  # the server down (a scenario stopped it), or no schema yet
            return Counter()
        return Counter((device, seq) for device, seq in rows if seq is not None)

    def filed(self) -> Counter[tuple[str, int]]:
        """(device, seq) of every line of the daily files, with how many times each is there."""
        lines: Counter[tuple[str, int]] = Counter()
        for path in sorted((self.data_dir / "logs" / "device" / "log").glob("*.log")):
            for raw in path.read_bytes().splitlines():
                line = json.loads(raw)
                data = line["data"]
                if isinstance(data, dict) and "seq" in data:
                    lines[(line["device_id"], data["seq"])] += 1
        return lines

    def wait_drained(self, expected: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.stored()) >= expected:
                return
            time.sleep(0.25)

    def until_flowing(self, timeout: float = 60) -> float:
        """Seconds until the store grows again: records flow end to end once more."""
        started = time.monotonic()
        before = len(self.stored())
        while len(self.stored()) <= before and time.monotonic() - started < timeout:
            time.sleep(0.05)
        return time.monotonic() - started

    def verify(self, scenario: str, recovery_s: float, note: str = "", *,
               source: str = "store") -> Outcome:
        """Compare what was acked with the store (or, ``source="files"``, the daily files)."""
        acked_through: dict[str, int] = json.loads(self.acked_file.read_text())
        acked = {(device, seq) for device, count in acked_through.items() for seq in range(count)}
        if source == "store":
            self.wait_drained(len(acked))
        stored = self.stored()
        if source == "files":
            deadline = time.monotonic() + 30
            while len(self.filed()) < len(acked) and time.monotonic() < deadline:
                time.sleep(0.25)
            stored = self.filed()
        outcome = Outcome(
            scenario, len(acked), sum(stored.values()), len(acked - stored.keys()),
            sum(count - 1 for count in stored.values() if count > 1), round(recovery_s, 2), note)
        outcome.record()
        return outcome

    def verify_clean(self, scenario: str, recovery_s: float, note: str = "", *,
                     source: str = "store") -> Outcome:
        """:meth:`verify`, then assert nothing acked was lost or duplicated; the outcome."""
        outcome = self.verify(scenario, recovery_s, note, source=source)
        assert outcome.lost == 0, outcome
        assert outcome.duplicated == 0, outcome
        return outcome

    def kill(self, process: subprocess.Popen[bytes] | None) -> None:
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def rss_mb(self, process: subprocess.Popen[bytes] | None) -> float:
        assert process is not None
        return float(psutil.Process(process.pid).memory_info().rss) / 2**20

    def close(self) -> None:
        if self.simulator is not None and self.simulator.poll() is None:
            self.simulator.kill()
            self.simulator.wait()
        self.procs.stop_all()
        self.redis.stop()
