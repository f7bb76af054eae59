"""A real fleet for the alert tests: the session's Redis, a gateway, workers, alerters, a receiver."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import websockets

from tests.alerts.receiver import Receiver
from tests.conftest import Processes
from tests.helpers import run_fleetlog, send_legacy

#: Short settings so that the scenarios take seconds: presence looked at twice a second,
#: a 3 s lease, retries 0.5 s doubling to 3 s.
FAST = {"FLEETLOG_ALERT_POLL": "0.5", "FLEETLOG_ALERT_LEASE": "3", "FLEETLOG_ALERT_RETRY_INITIAL": "0.5",
        "FLEETLOG_ALERT_RETRY_CAP": "3", "FLEETLOG_ALERT_SEND_TIMEOUT": "3",
        "FLEETLOG_RATE_RECORDS": "1000000", "FLEETLOG_RATE_BYTES": "1000000000"}


class Stack:
    def __init__(self, redis_url: str, tmp_path: Path, processes: Processes) -> None:
        self.redis_url = redis_url
        self.data_dir = tmp_path / "data"
        self.procs = processes
        self.port = 0
        self.env = dict(FAST)
        self.alerters: list[subprocess.Popen[bytes]] = []

    def start(self, *, shards: int = 1, workers: int = 1, alerters: int = 1) -> None:
        extra = ("--shards", str(shards)) if shards > 1 else ()
        _, self.port = self.procs.gateway(self.redis_url, self.data_dir, *extra, env=self.env)
        for index in range(workers):
            self.procs.start("worker", "--redis-url", self.redis_url, "--data-dir", str(self.data_dir),
                             "--consumer", f"w{index}", *extra, env=self.env)
        self.wait_store()
        for _ in range(alerters):
            self.start_alerter()

    def wait_store(self) -> None:
        deadline = time.monotonic() + 20
        while not (self.data_dir / "fleetlog.db").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def start_alerter(self, name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or f"a{len(self.alerters)}"
        process = self.procs.start("alerter", "--redis-url", self.redis_url, "--data-dir", str(self.data_dir),
                                   "--consumer", name, log_name=f"alerter-{name}", env=self.env)
        self.alerters.append(process)
        return process

    def fleetlog(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_fleetlog(*args, "--redis-url", self.redis_url, "--data-dir", str(self.data_dir))

    def add(self, name: str, *args: str) -> None:
        done = self.fleetlog("alert", "add", name, *args)
        assert done.returncode == 0, done.stderr

    def show(self, name: str) -> dict[str, Any]:
        done = self.fleetlog("alert", "show", name, "--json")
        assert done.returncode == 0, done.stderr
        value: dict[str, Any] = json.loads(done.stdout)
        return value

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def lease_holder(self) -> str | None:
        client = self.client()
        try:
            holder = client.get("fleetlog:{alerts}:lease")
        finally:
            client.close()
        return holder.decode() if holder else None

    def wait_lease(self, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            holder = self.lease_holder()
            if holder:
                return holder
            time.sleep(0.05)
        raise TimeoutError("no alerter took the lease")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def send(self, device: str, records: Sequence[dict[str, Any]], per_second: float = 0) -> None:
        """Send ``records`` as legacy frames from ``device`` (each acked), ``per_second`` at most."""
        asyncio.run(self._send(device, records, per_second))

    async def _send(self, device: str, records: Sequence[dict[str, Any]], per_second: float) -> None:
        started = time.monotonic()
        async with websockets.connect(self.url) as ws:
            for index, record in enumerate(records):
                if per_second:
                    await asyncio.sleep(max(0.0, started + index / per_second - time.monotonic()))
                frame = json.dumps({"deviceId": device, "type": 4, "data": record})
                replies = await send_legacy(ws, frame)
                assert replies[1] == "log_upload_response", replies


@pytest.fixture
def stack(redis_url: str, tmp_path: Path, processes: Processes) -> Stack:
    return Stack(redis_url, tmp_path, processes)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()
