"""The reading routes and the live tail, against a real API process, Redis and SQLite store."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis
import websockets

from fleetlog import keys
from fleetlog.embedded import free_port
from fleetlog.records import QueuedRecord
from fleetlog.store.sqlite import SQLiteStore
from tests.api.conftest import Api
from tests.conftest import Processes, wait_for_port
from tests.helpers import STORED, legacy_frame, send_legacy, stored_rows, wait_until

pytestmark = pytest.mark.slow

T0 = int(time.time() * 1000) - 600_000  # ten minutes ago: inside the default volume hour

AWKWARD = ['say "hi"', "a*b", "NEAR(x y)", "-x minus", "温度传感器故障", "back\\slash"]


def write(api: Api, records: list[QueuedRecord]) -> None:
    store = SQLiteStore(api.data_dir / "fleetlog.db")
    store.write_batch(records)
    store.close()


def rec(qid: str, device: str, at: int, **data: Any) -> QueuedRecord:
    return QueuedRecord(qid, device, at, orjson.dumps(data))


def get(api: Api, path: str, token: str | None = None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or api.reader}"}
    return httpx.get(f"{api.url}{path}", params=params, headers=headers, timeout=10)


@pytest.fixture
def stored(api: Api) -> Api:
    records = [rec(f"1-{n}", "door-1", T0 + n * 1000, level="info", msg=f"open {n}") for n in range(7)]
    records += [rec(f"2-{n}", "door-2", T0 + n * 1000 + 500, level="error", msg=text)
                for n, text in enumerate(AWKWARD)]
    write(api, records)
    return api


def test_pages_are_newest_first_and_the_cursor_neither_repeats_nor_skips(stored: Api) -> None:
    seen: list[int] = []
    cursor = None
    for _ in range(10):  # 7 records, 2 a page: 4 pages
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = get(stored, "/api/devices/door-1/logs", **params).json()
        seen += [r["seq"] for r in page["records"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) == 7
    first = get(stored, "/api/devices/door-1/logs", limit=1).json()["records"][0]
    assert first["message"] == "open 6" and first["data"] == {"level": "info", "msg": "open 6"}
    assert first["received_at"].endswith("Z") and first["device_id"] == "door-1"


@pytest.mark.parametrize("text", AWKWARD)
def test_q_is_plain_text_on_one_device_and_the_fleet(stored: Api, text: str) -> None:
    for path, params in (("/api/devices/door-2/logs", {}), ("/api/logs", {})):
        answer = get(stored, path, q=text, **params)
        assert answer.status_code == 200, answer.text
        assert [r["message"] for r in answer.json()["records"]] == [text]
    assert get(stored, "/api/logs", q=text, device="door-1").json()["records"] == []


def test_fleet_logs_filter_by_level_time_and_device(stored: Api) -> None:
    errors = get(stored, "/api/logs", level="error", limit=100).json()["records"]
    assert {r["device_id"] for r in errors} == {"door-2"} and len(errors) == len(AWKWARD)
    recent = get(stored, "/api/logs", since=f"{(time.time() * 1000 - T0 - 3000) / 1000:.0f}s").json()
    assert {r["message"] for r in recent["records"]} >= {"open 6", "back\\slash"}
    assert len(get(stored, "/api/logs", device="door-1", limit=100).json()["records"]) == 7


@pytest.mark.parametrize(("params", "field"), [
    ({"level": "loud"}, "level"), ({"since": "yesterday"}, "since"), ({"cursor": "nope"}, "cursor"),
    ({"limit": 0}, "limit"), ({"device": "bad\x00id"}, "device"),
])
def test_a_bad_read_is_a_422_naming_the_field(stored: Api, params: dict[str, Any], field: str) -> None:
    answer = get(stored, "/api/logs", **params)
    assert answer.status_code == 422, answer.text
    assert field in str(answer.json()["detail"])


def test_reading_routes_need_a_token(stored: Api) -> None:
    for path in ("/api/logs", "/api/devices", "/api/stats/volume", "/api/export", "/api/stream",
                 "/api/overview", "/api/devices/door-1/logs"):
        assert httpx.get(f"{stored.url}{path}", timeout=10).status_code == 401, path


def test_devices_list_online_last_error_and_refusals(stored: Api) -> None:
    client = redis.Redis.from_url(stored.redis_url)
    client.hset(keys.refusals("door-1"), "rate_limited", 3)
    client.close()
    answer = get(stored, "/api/devices", sort="last_error", order="desc").json()
    rows = {row["device_id"]: row for row in answer["devices"]}
    assert [row["device_id"] for row in answer["devices"]] == ["door-2", "door-1"]
    assert rows["door-1"]["records"] == 7 and rows["door-1"]["last_error"] is None
    assert rows["door-2"]["last_error"] is not None and rows["door-1"]["refused"] == {"rate_limited": 3}
    assert not rows["door-1"]["online"]
    assert [r["device_id"] for r in get(stored, "/api/devices", prefix="door-2").json()["devices"]] == [
        "door-2"]
    assert get(stored, "/api/devices", online="true").json()["devices"] == []
    overview = get(stored, "/api/overview").json()
    assert (overview["devices"], overview["records"], overview["online"]) == (2, 7 + len(AWKWARD), 0)


def test_volume_counts_records_per_step_and_level(stored: Api) -> None:
    answer = get(stored, "/api/stats/volume", step="hour", since="1d").json()
    totals: dict[str | None, int] = {}
    for bucket in answer["buckets"]:
        totals[bucket["level"]] = totals.get(bucket["level"], 0) + bucket["records"]
    assert totals == {"info": 7, "error": len(AWKWARD)} and answer["step_seconds"] == 3600
    one = get(stored, "/api/stats/volume", device="door-1").json()
    assert sum(b["records"] for b in one["buckets"]) == 7
    assert get(stored, "/api/stats/volume", step="1ms").status_code == 422


def test_export_streams_every_record_as_ndjson_and_csv(api: Api) -> None:
    write(api, [rec(f"1-{n}", "busy", T0 + n, level="info", msg=f"line {n} 中文")
                for n in range(2500)] + [rec("9-0", "other", T0, msg="not this one")])
    with httpx.stream("GET", f"{api.url}/api/export", params={"device": "busy"}, timeout=30,
                      headers={"Authorization": f"Bearer {api.reader}"}) as answer:
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        assert "attachment" in answer.headers["content-disposition"]
        lines = [orjson.loads(line) for line in answer.iter_lines() if line]
    assert [line["data"]["msg"] for line in lines] == [f"line {n} 中文" for n in reversed(range(2500))]
    text = get(api, "/api/export", device="busy", format="csv", q="line 7").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len([n for n in range(2500) if "line 7" in f"line {n} "])
    assert orjson.loads(rows[0]["data"])["msg"].startswith("line 7") and rows[0]["device_id"] == "busy"


async def events(answer: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(id, record) of each event of an SSE answer; comments skipped."""
    event_id, data = "", b""
    async for line in answer.aiter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:].encode()
        elif line == "" and data:
            yield event_id, orjson.loads(data)
            event_id, data = "", b""


async def next_event(stream: AsyncIterator[tuple[str, dict[str, Any]]], timeout: float
                     ) -> tuple[str, dict[str, Any]]:
    return await asyncio.wait_for(anext(stream), timeout)


async def test_live_tail_gets_each_record_once_and_resumes_after_last_event_id(
        api: Api, processes: Processes) -> None:
    _, port = processes.gateway(api.redis_url, api.data_dir)
    processes.worker(api.redis_url, api.data_dir)
    headers = {"Authorization": f"Bearer {api.reader}"}
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        assert (await send_legacy(ws, legacy_frame("tail-1", 0)))[1] == STORED  # before the tail: not sent
        # The worker commits record 0 before the tail starts.
        assert await asyncio.to_thread(wait_until, lambda: len(stored_rows(api.data_dir)) == 1, 10)
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("GET", f"{api.url}/api/stream", params={"device": "tail-1"},
                                   headers=headers) as answer:
                assert answer.headers["content-type"].startswith("text/event-stream")
                stream = events(answer)
                assert (await send_legacy(ws, legacy_frame("tail-1", 1)))[1] == STORED
                acked = time.monotonic()
                first_id, first = await next_event(stream, 10)
                waited = time.monotonic() - acked
                assert first["data"]["seq"] == 1 and first["device_id"] == "tail-1"
                assert waited < 2.0, f"the tail woke {waited:.2f}s after the ack"
            # Disconnected: three more are stored meanwhile, and one of another device.
            for seq in (2, 3, 4):
                assert (await send_legacy(ws, legacy_frame("tail-1", seq)))[1] == STORED
            assert (await send_legacy(ws, legacy_frame("tail-2", 9)))[1] == STORED
            async with http.stream("GET", f"{api.url}/api/stream", params={"device": "tail-1"},
                                   headers={**headers, "Last-Event-ID": first_id}) as answer:
                stream = events(answer)
                got = [(await next_event(stream, 10))[1]["data"]["seq"] for _ in range(3)]
                assert got == [2, 3, 4]
                assert (await send_legacy(ws, legacy_frame("tail-1", 5)))[1] == STORED
                assert (await next_event(stream, 10))[1]["data"]["seq"] == 5
            async with http.stream("GET", f"{api.url}/api/stream", params={"level": "error"},
                                   headers={**headers, "Last-Event-ID": "garbage!"}) as answer:
                assert answer.status_code == 422


async def test_a_tail_from_a_first_page_gets_a_record_a_slower_worker_commits_late_on_postgresql(
        api: Api, processes: Processes, pg_url: str) -> None:
    """A second worker's batch may commit after a later one: its records have lower seqs than
    records a page already showed.  The console started its tail from the page's newest cursor
    and never saw them; ``tail_from`` (the store's position before the page) brings them, and the
    page's own records that come again are skipped by cursor."""
    _, port = processes.gateway(api.redis_url, api.data_dir)
    processes.worker(api.redis_url, api.data_dir, "--store", pg_url)
    api_port = free_port()
    process = processes.start("api", "--redis-url", api.redis_url, "--data-dir", str(api.data_dir),
                              "--port", str(api_port), "--store", pg_url)
    wait_for_port(api_port, process=process)
    url, headers = f"http://127.0.0.1:{api_port}", {"Authorization": f"Bearer {api.reader}"}
    device = "late-1"

    def stored() -> list[str]:
        with psycopg.connect(pg_url) as db:
            return [m for (m,) in db.execute(
                "SELECT message FROM records WHERE device_id = %s ORDER BY seq", (device,))]

    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        assert (await send_legacy(ws, legacy_frame(device, 0, msg="first")))[1] == STORED
        assert await asyncio.to_thread(wait_until, lambda: stored() == ["first"], 15)
        # A slower worker: its batch's transaction is open, its record inserted (seq from its xid).
        slow = await asyncio.to_thread(psycopg.connect, pg_url)
        now = int(time.time() * 1000)
        slow.execute(
            "INSERT INTO records (seq, stream, qid, device_id, received_at, ts, level, message, data)"
            " VALUES ((pg_current_xact_id()::text::bigint) << 20, 'fleetlog:records', %s, %s, %s, NULL,"
            " 'info', 'late', %s)", (f"{now}-0.0", device, now, orjson.dumps({"msg": "late"}).decode()))
        assert (await send_legacy(ws, legacy_frame(device, 1, msg="on time")))[1] == STORED
        assert await asyncio.to_thread(wait_until, lambda: stored() == ["first", "on time"], 15)
        async with httpx.AsyncClient(timeout=30) as http:
            page = (await http.get(f"{url}/api/logs", params={"device": device}, headers=headers)).json()
            assert [r["message"] for r in page["records"]] == ["on time", "first"]
            assert page["tail_from"] is not None
            later = (await http.get(f"{url}/api/logs", params={"device": device, "limit": 1},
                                    headers=headers)).json()
            assert (await http.get(f"{url}/api/logs", params={"device": device, "cursor": later[
                "next_cursor"]}, headers=headers)).json()["tail_from"] is None, "first pages only"
            shown = {r["cursor"] for r in page["records"]}
            async with http.stream("GET", f"{url}/api/stream", params={"device": device},
                                   headers={**headers, "Last-Event-ID": page["tail_from"]}) as answer:
                stream = events(answer)
                slow.commit()
                slow.close()
                assert (await send_legacy(ws, legacy_frame(device, 2, msg="after")))[1] == STORED
                got: list[str] = []
                while len(got) < 2:
                    event_id, record = await next_event(stream, 15)
                    if event_id not in shown:
                        got.append(record["message"])
    assert got == ["late", "after"]
    assert stored() == ["first", "late", "on time", "after"]
