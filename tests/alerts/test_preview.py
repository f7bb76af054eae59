"""``POST /api/alerts/preview``: the console's live preview, against a real API process and SQLite store."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from fleetlog.api.auth import OperatorTokens
from fleetlog.embedded import free_port
from tests.api.conftest import Api
from tests.api.conftest import api as api  # the fixture
from tests.api.test_reads import rec, write
from tests.conftest import Processes, wait_for_port

pytestmark = pytest.mark.slow

T0 = int(time.time() * 1000) - 600_000


def preview(api: Api, token: str, **body: object) -> httpx.Response:
    return httpx.post(f"{api.url}/api/alerts/preview", json=body,
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_the_preview_shows_which_recent_stored_records_a_condition_matches(api: Api) -> None:
    write(api, [rec(f"1-{n}", "door-1", T0 + n, level="error" if n % 3 == 0 else "info", msg=f"m {n}",
                    temp=n * 10) for n in range(12)]
          + [rec("2-0", "kiosk-1", T0 + 50, level="error", msg="kiosk", temp=500)])
    answer = preview(api, api.reader, when='level == "error" && data.temp > 40', devices="door-*")
    assert answer.status_code == 200, answer.text
    found = answer.json()
    # Records 6 and 9 (error, temp 60 and 90) of door-1, newest first; the kiosk is not selected.
    assert [r["data"]["msg"] for r in found["records"]] == ["m 9", "m 6"]
    assert (found["checked"], found["matched"], found["errors"]) == (12, 2, 0)
    one = preview(api, api.reader, when="data.temp >= 500", devices="kiosk-1").json()
    assert [r["device_id"] for r in one["records"]] == ["kiosk-1"] and one["checked"] == 1
    # Only the newest `recent` records are tried.
    assert preview(api, api.reader, when="true", recent=5).json()["checked"] == 5


def test_an_invalid_condition_is_refused_with_its_position_and_reads_nothing(api: Api) -> None:
    answer = preview(api, api.reader, when="data.temp >")
    assert answer.status_code == 422
    [problem] = answer.json()["detail"]
    assert problem["loc"] == ["body", "when"] and problem["position"] == {"line": 1, "column": 12}
    assert preview(api, api.reader, when="x" * 5000).status_code == 422
    assert preview(api, api.reader, when="true", recent=0).status_code == 422
    assert httpx.post(f"{api.url}/api/alerts/preview", json={"when": "true"}, timeout=10).status_code == 401
    # No store yet is an empty preview, not an error.
    assert preview(api, api.reader, when="true").json()["checked"] == 0


@pytest.fixture
def quick_api(redis_url: str, tmp_path: Path, processes: Processes) -> Api:
    """An API whose reads, and so its previews' conditions, have 2 s."""
    data_dir = tmp_path / "quick-data"
    data_dir.mkdir()
    client = redis.Redis.from_url(redis_url)
    reader = OperatorTokens(client).add("quick-viewer", "read")
    client.close()
    port = free_port()
    process = processes.start("api", "--redis-url", redis_url, "--data-dir", str(data_dir),
                              "--port", str(port), env={"FLEETLOG_READ_TIMEOUT": "2"})
    wait_for_port(port, process=process)
    return Api(f"http://127.0.0.1:{port}", "", reader, redis_url, data_dir)


def test_a_condition_too_costly_for_the_records_is_stopped_and_the_api_answers_meanwhile(
        quick_api: Api) -> None:
    # A valid condition, linear per element but quadratic in the record's list: on 30,000
    # numbers ~20 s of CEL holding the interpreter.  Before the preview ran in a child
    # process, the API answered nothing else meanwhile (a read token froze it).
    write(quick_api, [rec("1-0", "door-1", T0, level="info", msg="big", a=list(range(30_000))),
                      rec("1-1", "door-1", T0 + 1, level="info", msg="small", a=[1, 2, 3])])
    quadratic = "data.a.all(x, x in data.a)"
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        slow = pool.submit(preview, quick_api, quick_api.reader, when=quadratic)
        time.sleep(0.5)
        for _ in range(5):  # the API answers other requests while the condition runs
            asked = time.monotonic()
            health = httpx.get(f"{quick_api.url}/healthz", timeout=10)
            assert health.status_code == 200 and time.monotonic() - asked < 1.0
        answer = slow.result(timeout=30)
        took = time.monotonic() - started
    assert answer.status_code == 422, answer.text
    [problem] = answer.json()["detail"]
    assert problem["loc"] == ["body", "when"] and "longer than 2 s" in problem["msg"]
    assert took < 10
    # The same condition on the small record alone (the newest) answers.
    small = preview(quick_api, quick_api.reader, when=quadratic, recent=1).json()
    assert (small["checked"], small["matched"]) == (1, 1)
    assert [r["data"]["msg"] for r in small["records"]] == ["small"]
    cheap_first = preview(quick_api, quick_api.reader, when=f"data.a.size() < 5 && {quadratic}")
    assert cheap_first.status_code == 200 and cheap_first.json()["matched"] == 1
    assert httpx.get(f"{quick_api.url}/healthz", timeout=10).status_code == 200
