"""Request bodies under control: authenticated first, bounded in size and in time.

FastAPI reads a route's JSON body before it checks the route's token, and
reads it whole: a 100 MB body with no token was read in full before the 401,
and a 40 MB command reached Redis (see :mod:`.commands`).  :class:`BodyLimits`
wraps the application (pure ASGI, so nothing is buffered) and, for every
request that announces a body (``Content-Length`` above 0, or chunked):

* asks for a known operator token *before* a byte of the body is read: none,
  or an unknown one, is 401 (Redis down: 503), as the route would answer
  (not for ``GET``/``HEAD``/``OPTIONS``, whose body no route reads: ``/healthz``
  needs no token);
* answers 413 at once when ``Content-Length`` is over ``max_command_bytes``,
  and counts what a chunked body sends, 413 as soon as it passes the limit;
* gives the client ``body_timeout`` seconds to send the whole body (a
  ``Content-Length`` that promises more than comes is held no longer): 408.

Each of these answers closes the connection (``Connection: close``): the rest
of a body nobody wants is never read.  The route still checks the token's role.
"""

from __future__ import annotations

import asyncio
from typing import Final

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetlog.api.auth import identify
from fleetlog.api.failures import REDIS_NOT_ANSWERING
from fleetlog.errors import BodyRefused, BodyTimeout, BodyTooLarge
from fleetlog.queue.connection import REDIS_DOWN

__all__ = ["BodyLimits", "BodyTimeout", "BodyTooLarge"]

#: Sent with every early answer: the unread rest of the body must not be read as a request.
_CLOSE: Final = {"Connection": "close"}
#: Methods whose body no route reads: bounded all the same, but no token asked first.
_READ_ONLY: Final = frozenset(("GET", "HEAD", "OPTIONS"))


def _as_http(refusal: BodyRefused) -> HTTPException:
    """``refusal`` as FastAPI lets it through a route's body parsing (other errors become a 400)."""
    return HTTPException(refusal.status_code, refusal.detail, headers=_CLOSE)


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status, headers={**(headers or {}), **_CLOSE})


class BodyLimits:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        announced = headers.get("content-length")
        if announced is None and not chunked:
            await self.app(scope, receive, send)  # no body
            return
        try:
            length = int(announced) if announced is not None else None
        except ValueError:
            await _answer(400, "Content-Length is not a number")(scope, receive, send)
            return
        if length == 0 and not chunked:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in _READ_ONLY:  # no route reads the body of these (nor needs a token)
            refusal = await self._authenticate(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        if length is not None and length > self.max_bytes:
            await _answer(413, BodyTooLarge(self.max_bytes).detail)(scope, receive, send)
            return
        await self._limited(scope, receive, send)

    async def _authenticate(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        """None for a known operator token, else the answer the routes would give."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _answer(401, "an operator token is needed: Authorization: Bearer TOKEN",
                           {"WWW-Authenticate": "Bearer"})
        try:
            known = await identify(scope["app"].state.services.aredis, token.strip())
        except REDIS_DOWN:
            return _answer(503, REDIS_NOT_ANSWERING)
        if known is None:
            return _answer(401, "unknown or revoked token", {"WWW-Authenticate": "Bearer"})
        return None

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with a ``receive`` that counts the body and stops waiting at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received = 0
        body_done = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()  # the body is in: only a disconnect comes now
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _as_http(BodyTimeout(self.timeout)) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _as_http(BodyTooLarge(self.max_bytes))
                body_done = not message.get("more_body", False)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except HTTPException as exc:  # ours, raised where nothing answers it
            if started or exc.status_code not in (BodyTooLarge.status_code, BodyTimeout.status_code):
                raise
            await _answer(exc.status_code, exc.detail)(scope, receive, send)
