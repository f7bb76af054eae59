"""``/readyz`` under ``fleetlog up``: which part is down, even while Redis (which holds the tokens) is.

A real API process on a real Redis; the file ``up`` keeps in the data dir is
written as ``up`` writes it (:meth:`RedisServer.write_up_file`, this test being
its live owner), since what is tested is how the API reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import orjson

from fleetlog.api.auth import OperatorTokens
from fleetlog.embedded import RedisServer, free_port
from fleetlog.queue.connection import connect
from fleetlog.store import open_store
from tests.conftest import Processes, wait_for_port

ALL_OK = {"redis": "ok", "gateway": "ok", "worker": "ok", "api": "ok"}
REDIS_DOWN = "down since 2026-12-04T18:23:24.555Z (killed by SIGKILL); fleetlog up restarts it"


def _running(tmp_path: Path, processes: Processes) -> tuple[RedisServer, str, str]:
    """Redis where ``up`` keeps it, a read token, an API on both: (server, API URL, token)."""
    data_dir = tmp_path / "data"
    server = RedisServer(data_dir / "redis")
    server.start()
    client = connect(server.url)
    reader = OperatorTokens(client).add("viewer", "read")
    client.close()
    open_store(f"sqlite:///{data_dir / 'fleetlog.db'}").close()  # the store check passes
    port = free_port()
    api = processes.start("api", "--redis-url", server.url, "--data-dir", str(data_dir),
                          "--port", str(port))
    wait_for_port(port, process=api)
    return server, f"http://127.0.0.1:{port}", reader


def test_readyz_says_redis_is_down_and_that_up_restarts_it(tmp_path: Path, processes: Processes) -> None:
    server, url, reader = _running(tmp_path, processes)
    try:
        server.write_up_file(ALL_OK)
        with httpx.Client(base_url=url, timeout=10) as http:
            auth = {"Authorization": f"Bearer {reader}"}
            ready = http.get("/readyz", headers=auth)
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"redis": "ok", "consumer_lag": "ok", "store": "ok",
                                              "gateway": "ok", "worker": "ok"}

            server.kill()
            # Before `up` notices (a watch tick): the client's view.
            assert http.get("/readyz", headers=auth).json()["checks"]["redis"] == "not answering"
            server.write_up_file({**ALL_OK, "redis": REDIS_DOWN})  # what `up` writes once it does
            down = http.get("/readyz", headers=auth)
            assert down.status_code == 503
            # The token cannot be checked without Redis: only which part is down is said.
            assert down.json() == {"ready": False, "checks": {
                "redis": REDIS_DOWN, "consumer_lag": "unknown", "store": "unknown",
                "gateway": "ok", "worker": "ok"}}
            assert http.get("/readyz").status_code == 401, "still no answer without a token"

            restarting = "restarting since 2026-12-04T18:23:24.800Z (loading its data)"
            server.write_up_file({**ALL_OK, "redis": restarting})
            assert http.get("/readyz", headers=auth).json()["checks"]["redis"] == restarting

            server.start()
            server.write_up_file(ALL_OK)
            assert http.get("/readyz", headers=auth).status_code == 200
    finally:
        server.stop()


def test_readyz_names_the_part_of_up_that_is_down(tmp_path: Path, processes: Processes) -> None:
    server, url, reader = _running(tmp_path, processes)
    try:
        worker_down = "down since 2026-12-04T18:23:29.387Z (exited with 1); fleetlog up restarts it"
        server.write_up_file({**ALL_OK, "worker": worker_down})
        with httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {reader}"}) as http:
            answer = http.get("/readyz")
            assert answer.status_code == 503
            assert answer.json()["checks"] == {"redis": "ok", "consumer_lag": "ok", "store": "ok",
                                               "gateway": "ok", "worker": worker_down}
            # An `up` on another Redis (this API was started by hand): none of its parts.
            (server.directory / "fleetlog-up.json").write_bytes(orjson.dumps({
                "url": "redis://127.0.0.1:1/0", "pid": os.getpid(), "owner": os.getpid(),
                "parts": {**ALL_OK, "worker": worker_down}}))
            answer = http.get("/readyz")
            assert answer.status_code == 200
            assert answer.json()["checks"] == {"redis": "ok", "consumer_lag": "ok", "store": "ok"}
    finally:
        server.stop()
