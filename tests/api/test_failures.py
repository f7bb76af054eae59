"""fleetlog.api.failures: each error of the tree answers the same status and detail on every route."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

from fleetlog.alerts.book import RULES, AlertBook
from fleetlog.alerts.rules import parse_spec
from fleetlog.api import failures
from fleetlog.errors import (
    DeviceExists,
    InvalidRequest,
    InvalidRule,
    ReadTimeout,
    RuleExists,
    StoreUnavailable,
    UnknownDevice,
    UnknownRule,
)
from tests.api.conftest import Api


async def _answer(error: BaseException) -> tuple[int, Any]:
    app = FastAPI()
    failures.install(app)

    @app.get("/raise")
    def raising() -> None:
        raise error

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api") as client:
        response = await client.get("/raise")
    return response.status_code, response.json()["detail"]


@pytest.mark.parametrize(("error", "status", "detail"), [
    (redis.ConnectionError("refused"), 503, failures.REDIS_NOT_ANSWERING),
    (redis.TimeoutError("slow"), 503, failures.REDIS_NOT_ANSWERING),
    (StoreUnavailable("locked"), 503, "the store is not answering: locked"),
    (UnknownRule("no alert rule named 'x'"), 404, "no alert rule named 'x'"),
    (UnknownDevice("device 'd' has no token"), 404, "device 'd' has no token"),
    (RuleExists("exists"), 409, "exists"),
    (DeviceExists("has one"), 409, "has one"),
])
async def test_errors_answer_their_status(error: BaseException, status: int, detail: str) -> None:
    assert await _answer(error) == (status, detail)


async def test_a_read_past_its_budget_says_narrow_the_search() -> None:
    status, detail = await _answer(ReadTimeout("the read ran past 5 s"))
    assert status == 503
    assert detail.startswith("the read ran past 5 s: narrow the search")


async def test_an_invalid_request_names_its_field_from_the_attribute() -> None:
    # The message does not start with the field: the 422 takes it from ``field``.
    assert await _answer(InvalidRequest("not a level", "level")) == (
        422, [{"loc": ["query", "level"], "msg": "not a level", "type": "value_error"}])


async def test_an_invalid_rule_names_its_field_and_position() -> None:
    assert await _answer(InvalidRule("bad CEL", "when", (1, 7))) == (
        422, [{"loc": ["body", "when"], "msg": "bad CEL", "type": "value_error",
               "position": {"line": 1, "column": 7}}])


#: A JSON body may escape a lone surrogate, which has no UTF-8 form (orjson refuses it; the stdlib not).
_LONE = b"\\ud800"


def _rules(api: Api) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(api.redis_url)
    try:
        return client.hgetall(RULES)
    finally:
        client.close()


@pytest.mark.slow
async def test_a_422_that_echoes_a_lone_surrogate_writes_it_as_u_fffd(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        answer = await http.post("/api/alerts/preview", content=b'{"when": "true", "devices": "%s"}' % _LONE,
                                 headers={"Authorization": f"Bearer {api.reader}",
                                          "Content-Type": "application/json"})
        assert answer.status_code == 422, answer.text
        [problem] = answer.json()["detail"]
        assert problem["loc"] == ["body", "devices"]
        assert problem["input"] == "\ufffd"
        muted = await http.post("/api/alerts/any/mute", content=b'{"for": "%s"}' % _LONE,
                                headers={"Authorization": f"Bearer {api.admin}",
                                         "Content-Type": "application/json"})
        assert muted.status_code == 422, muted.text
        assert [problem["loc"] for problem in muted.json()["detail"]] == [["body", "for"]]
    assert _rules(api) == {}


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "field"), [
    (b'{"name": "forced", "when": "true", "to": ["https://e.example/%s"]}' % _LONE, "to"),
    (b'{"name": "forced", "when": "message == \\"%s\\"", "to": ["https://e.example/"]}' % _LONE, "when"),
    (b'{"name": "forced", "when": "true", "devices": "door-%s", "to": ["https://e.example/"]}' % _LONE,
     "devices"),
])
async def test_a_rule_with_a_lone_surrogate_is_a_422_naming_its_field_and_nothing_is_saved(
        api: Api, rule: bytes, field: str) -> None:
    client = redis.Redis.from_url(api.redis_url)
    try:  # one rule of that name already: a replace that fails leaves it as it was
        kept = AlertBook(client).add(parse_spec({"name": "forced", "when": "true",
                                                 "to": ["https://e.example/kept"]}))
    finally:
        client.close()
    before = _rules(api)
    async with httpx.AsyncClient(base_url=api.url, timeout=60,
                                 headers={"Authorization": f"Bearer {api.admin}",
                                          "Content-Type": "application/json"}) as http:
        answer = await http.post("/api/alerts", params={"replace": "true"}, content=rule)
        assert answer.status_code == 422, answer.text
        assert [problem["loc"] for problem in answer.json()["detail"]] == [["body", field]]
        listed = await http.get("/api/alerts")
    assert _rules(api) == before
    assert [(rule["name"], rule["id"]) for rule in listed.json()] == [("forced", kept.id)]
