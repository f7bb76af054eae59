"""fleetlog.api.failures: each error of the tree answers the same status and detail on every route."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

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
