"""Commit announcements, /metrics of the API, gateway and worker, and the schema under schemathesis."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import schemathesis
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from fleetlog.api.commits import CommitSubscriber
from fleetlog.embedded import free_port
from fleetlog.queue.connection import connect_async
from fleetlog.store import open_store
from tests.api.conftest import Api
from tests.conftest import Processes, wait_for_port
from tests.helpers import STORED, legacy_frame, send_legacy
from tests.pg import PostgresServer

pytestmark = pytest.mark.slow


async def test_a_commit_is_announced_within_a_second_of_its_ack(
        api: Api, processes: Processes, tmp_path: Path) -> None:
    gateway_metrics_port = free_port()
    _, port = processes.gateway(api.redis_url, api.data_dir,
                                env={"FLEETLOG_GATEWAY_METRICS_PORT": str(gateway_metrics_port)})
    metrics_port = free_port()
    worker = processes.worker(api.redis_url, api.data_dir, "--metrics-port", str(metrics_port))
    wait_for_port(metrics_port, process=worker)
    client = connect_async(api.redis_url)
    try:
        async with CommitSubscriber(client) as commits, websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            assert (await send_legacy(ws, legacy_frame("live-1", 1)))[1] == STORED
            acked = time.monotonic()
            commit = await commits.next(timeout=10)
            assert commit is not None and commit.devices == ("live-1",) and commit.count == 1
            assert commit.seq >= 1
            assert time.monotonic() - acked < 1.0
            await ws.send(legacy_frame("live-1", 2))  # a second, to see the cursor move
            later = await commits.next(timeout=10)
            assert later is not None and later.seq > commit.seq
    finally:
        await client.aclose()
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert "fleetlog_worker_records_stored_total 2.0" in text
        assert "fleetlog_queue_consumer_lag 0.0" in text
        assert "fleetlog_worker_store_write_seconds_bucket" in text
        # The gateway's metrics are on its metrics listener, not on the device port.
        assert (await http.get(f"http://127.0.0.1:{port}/metrics")).status_code == 404
        gateway = (await http.get(f"http://127.0.0.1:{gateway_metrics_port}/metrics")).text
        assert "fleetlog_gateway_frames_total 2.0" in gateway
        assert "fleetlog_gateway_acks_total 2.0" in gateway
        assert 'fleetlog_gateway_ack_latency_seconds_count 2.0' in gateway
        assert "fleetlog_gateway_connections 1.0" in gateway or "fleetlog_gateway_connections 0.0" in gateway
        answer = await http.get(f"{api.url}/metrics", headers={"Authorization": f"Bearer {api.reader}"})
        assert "fleetlog_queue_backlog" in answer.text and "fleetlog_api_requests_total" in answer.text
        ready = await http.get(f"{api.url}/readyz", headers={"Authorization": f"Bearer {api.reader}"})
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"redis": "ok", "consumer_lag": "ok", "store": "ok"}


def test_readyz_is_503_without_a_store(api: Api) -> None:
    answer = httpx.get(f"{api.url}/readyz", headers={"Authorization": f"Bearer {api.reader}"}, timeout=10)
    assert answer.status_code == 503
    assert answer.json()["checks"]["store"].startswith("cannot open the store")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_schemathesis_no_5xx_and_responses_match_the_schema(
        api: Api, processes: Processes, backend: str, request: pytest.FixtureRequest) -> None:
    """Positive and negative data (what the schema forbids), on each store: never a 5xx."""
    url = api.url
    if backend == "postgresql":
        store = request.getfixturevalue("pg_url")
        open_store(store).close()  # the schema: ready
        port = free_port()
        process = processes.start("api", "--redis-url", api.redis_url, "--data-dir", str(api.data_dir),
                                  "--port", str(port), "--store", store)
        wait_for_port(port, process=process)
        url = f"http://127.0.0.1:{port}"
    else:
        open_store(f"sqlite:///{api.data_dir / 'fleetlog.db'}").close()  # ready: /readyz is 200
    headers = {"Authorization": f"Bearer {api.admin}"}
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json", headers=headers,
                                                      timeout=10).json())
    schema.config.update(base_url=url, headers=headers)
    ran, negated = [], []
    for operation in schema.get_all_operations():
        op = operation.ok()
        if op.path == "/api/stream":
            continue  # never ends by design: tests/api/test_reads.py covers it

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case: schemathesis.Case) -> None:
            # No 5xx, and every answer (status, content type, body) matches the schema.
            # positive_data_acceptance is left out: a device id the schema cannot describe
            # (control characters) is refused with a 422 in the schema's own shape.
            case.call_and_validate(headers=headers, timeout=30, checks=[
                checks.not_a_server_error, checks.status_code_conformance,
                checks.content_type_conformance, checks.response_schema_conformance])

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(GenerationMode.NEGATIVE))
        def check_negative(case: schemathesis.Case) -> None:
            # Data the schema forbids (wrong types, out of range, malformed bodies): a 4xx,
            # never a 5xx.
            case.call_and_validate(headers=headers, timeout=30, checks=[checks.not_a_server_error])

        check()
        try:
            check_negative()
            negated.append(op.label)
        except Unsatisfiable:
            pass  # nothing to get wrong: no parameter, no body (/healthz, /metrics ...)
        ran.append(op.label)
    assert len(ran) >= 13, ran
    assert len(negated) >= 7, negated


def test_readyz_says_when_the_postgresql_store_is_down(
        api: Api, processes: Processes, private_postgres: PostgresServer) -> None:
    """It said ``store: ok`` (200) with PostgreSQL stopped, while every read was a 503."""
    store = private_postgres.create_database()
    open_store(store).close()  # the schema
    port = free_port()
    process = processes.start("api", "--redis-url", api.redis_url, "--data-dir", str(api.data_dir),
                              "--port", str(port), "--store", store)
    wait_for_port(port, process=process)
    headers = {"Authorization": f"Bearer {api.reader}"}

    def ready() -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", headers=headers, timeout=10)

    assert ready().status_code == 200 and ready().json()["checks"]["store"] == "ok"
    private_postgres.stop()
    down = ready()
    assert down.status_code == 503, down.text
    assert down.json()["checks"]["store"].startswith("cannot reach the store at postgresql://")
    assert down.json()["checks"]["redis"] == "ok"
    private_postgres.start()
    assert ready().status_code == 200
