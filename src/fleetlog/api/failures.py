"""fleetlog's errors as HTTP answers, in one place: :func:`install` puts them on the app.

A route lets an error of :mod:`fleetlog.errors` (or Redis being down) go
through; the handler here answers it, the same for every route:

- Redis down (``REDIS_DOWN``): 503, :data:`REDIS_NOT_ANSWERING`;
- :class:`~fleetlog.errors.ReadTimeout`: 503, what ran past its budget, "narrow the search";
- :class:`~fleetlog.errors.StoreUnavailable`: 503, "the store is not answering: ...";
- :class:`~fleetlog.errors.InvalidRequest`: 422 in FastAPI's own shape, ``loc`` naming its field;
- :class:`~fleetlog.errors.InvalidRule`: the same, with a CEL error's line and column;
- ``UnknownRule``, ``UnknownDevice``: 404; ``RuleExists``, ``DeviceExists``: 409 (the message).

FastAPI's own answers are here too, written the same way: a request that fails
validation (422, each error's ``input`` echoed) and an ``HTTPException``.  Every
answer here can echo what a client sent, and a JSON body may carry a lone
surrogate (``"\\ud800"``) that has no UTF-8 form: Starlette's ``JSONResponse``
raised on it, a 500 in place of the 422 naming the field.  :class:`Answer`
writes it as U+FFFD.

:class:`~fleetlog.errors.StoreMissing` is not here: what "nothing stored yet"
answers depends on the route (an empty page, the devices Redis knows), so
each says it where it reads (:func:`fleetlog.api.reads.read_store`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException

from fleetlog.api.deps import invalid
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
from fleetlog.queue.connection import REDIS_DOWN

__all__ = ["REDIS_NOT_ANSWERING", "Answer", "install"]

#: The ``detail`` of a 503 when Redis does not answer (the routes', and the body limits').
REDIS_NOT_ANSWERING: Final = "Redis is not answering; try again"

Handler = Callable[[Request, Any], Awaitable[Response]]


class Answer(JSONResponse):
    """A JSON answer that may echo anything a client sent: a lone surrogate is written as U+FFFD."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:  # a lone surrogate: UTF-16 carries it, and decodes it as U+FFFD
            text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def _detail(status: int) -> Handler:
    async def answer(_request: Request, exc: Exception) -> Response:
        return Answer({"detail": str(exc)}, status)

    return answer


async def _redis_down(_request: Request, _exc: Exception) -> Response:
    return Answer({"detail": REDIS_NOT_ANSWERING}, 503)


async def _read_timeout(_request: Request, exc: ReadTimeout) -> Response:
    return Answer({"detail": f"{exc}: narrow the search (one device, a shorter since/until, "
                             "a level, a longer or rarer q)"}, 503)


async def _store_unavailable(_request: Request, exc: StoreUnavailable) -> Response:
    return Answer({"detail": f"the store is not answering: {exc}"}, 503)


async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's own 422 (``fastapi.exception_handlers``), written by :class:`Answer`."""
    return Answer({"detail": jsonable_encoder(exc.errors())}, 422)


async def _http_error(_request: Request, exc: HTTPException) -> Response:
    """FastAPI's own answer to an ``HTTPException``, written by :class:`Answer`."""
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return Answer({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def _invalid_request(request: Request, exc: InvalidRequest) -> Response:
    # Every read's parameters are in the query string (a Last-Event-ID header is the route's).
    return await _invalid(request, invalid("query", exc.field or "query", str(exc)))


def _rule_problem(exc: InvalidRule) -> dict[str, Any]:
    """A 422's error for ``exc``: ``loc`` names its field, ``position`` a CEL error's line and column."""
    problem: dict[str, Any] = {"loc": ["body", exc.field or "body"], "msg": str(exc), "type": "value_error"}
    if exc.position is not None:
        problem["position"] = {"line": exc.position[0], "column": exc.position[1]}
    return problem


async def _invalid_rule(_request: Request, exc: InvalidRule) -> Response:
    return Answer({"detail": [_rule_problem(exc)]}, 422)


def install(app: FastAPI) -> None:
    """Answer fleetlog's errors on ``app`` as the module docstring's table says."""
    redis_down = cast("tuple[type[Exception], ...]", REDIS_DOWN)
    handlers: dict[type[Exception], Handler] = {
        RequestValidationError: _invalid,
        HTTPException: _http_error,
        **{error: _redis_down for error in redis_down},
        ReadTimeout: _read_timeout,
        StoreUnavailable: _store_unavailable,
        InvalidRequest: _invalid_request,
        InvalidRule: _invalid_rule,
        UnknownRule: _detail(404),
        UnknownDevice: _detail(404),
        RuleExists: _detail(409),
        DeviceExists: _detail(409),
    }
    for error, handler in handlers.items():
        app.add_exception_handler(error, handler)
