"""The HTTP API: :func:`create_app` builds it, :func:`run_api` serves it with uvicorn.

Routes live in their own modules (``commands``, ``device_tokens``,
``health``); this one wires them, owns the clients' lifetime (opened at
startup, closed at shutdown), counts requests for ``/metrics``, and answers
fleetlog's errors the same way on every route (:mod:`.failures`).  Every
route but ``/healthz`` needs an operator token (:mod:`.auth`), ``/openapi.json``
included.  Request bodies are authenticated before they are read, and bounded
(:mod:`.limits`); a path with a trailing slash too many (or too few) is
redirected with a relative ``Location``, never one built from the ``Host``
header.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.responses import RedirectResponse
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetlog.alerts.book import AlertBook
from fleetlog.alerts.metrics import AlertsCollector
from fleetlog.api import alerts, commands, console, device_tokens, failures, health, reads, stream
from fleetlog.api.bus import Bus
from fleetlog.api.commits import CommitFeed
from fleetlog.api.deps import ReadToken, Services
from fleetlog.api.guard import StreamGuard, TailSlots
from fleetlog.api.limits import BodyLimits
from fleetlog.config import Settings, mask_url
from fleetlog.lifecycle import Shutdown
from fleetlog.process import freeze_start_up_objects
from fleetlog.queue.connection import connect, connect_async
from fleetlog.queue.stats import QueueCollector, queue_stats_for
from fleetlog.reading import ReaderPool

if TYPE_CHECKING:
    import uvicorn

__all__ = ["create_app", "run_api"]

log = logging.getLogger("fleetlog.api")

#: Redis connections the API's asyncio client keeps at most; requests past that many
#: (every one is authenticated in Redis) wait for a free one rather than fail.
REDIS_POOL: Final = 100


def _registry(settings: Settings, services: Callable[[], Services]) -> tuple[CollectorRegistry, Counter,
                                                                            Counter, Histogram]:
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter("fleetlog_api_requests_total", "HTTP requests answered, by route and status.",
                       ["route", "status"], registry=registry)
    latency = Histogram("fleetlog_api_request_seconds", "Time to answer an HTTP request.",
                        registry=registry)
    sent = Counter("fleetlog_api_commands_total", "Commands sent to devices, by outcome.", ["status"],
                   registry=registry)

    registry.register(QueueCollector(lambda: queue_stats_for(services().redis, settings)))
    registry.register(AlertsCollector(lambda: AlertBook(services().redis).stats()))
    return registry, requests, sent, latency


def _relative_slash_redirect(router: Router) -> ASGIApp:
    """The router's fallback: redirect ``/metrics/`` to ``/metrics`` (and back) by a relative URL.

    Starlette's own redirect builds an absolute URL from the ``Host`` header,
    so ``Host: evil.example`` got ``Location: http://evil.example/metrics``.
    """
    not_found = router.not_found

    async def fallback(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and path != "/":
            other = dict(scope, path=path.rstrip("/") if path.endswith("/") else path + "/")
            if other["path"] and any(route.matches(other)[0] is not Match.NONE for route in router.routes):
                raw = (scope.get("raw_path") or path.encode()).decode("latin-1")
                raw = raw.rstrip("/") if raw.endswith("/") else raw + "/"
                query = scope.get("query_string", b"").decode("latin-1")
                # "//host" would be a network-path reference: keep one leading slash.
                location = "/" + raw.lstrip("/") + (f"?{query}" if query else "")
                await RedirectResponse(location, 307)(scope, receive, send)
                return
        await not_found(scope, receive, send)

    return fallback


class _Api(FastAPI):
    """The application, its middleware inside :class:`~fleetlog.api.guard.StreamGuard`.

    The guard goes outside everything, Starlette's own error middleware
    included, to see the server's ``send`` (see :mod:`.guard`).
    """

    def build_middleware_stack(self) -> ASGIApp:
        return StreamGuard(super().build_middleware_stack(), lambda: getattr(self.state, "services", None))


def create_app(settings: Settings, redis_url: str) -> FastAPI:
    """The API application for ``settings``, on the Redis at ``redis_url``."""
    holder: list[Services] = []
    registry, requests, sent, latency = _registry(settings, lambda: holder[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        aredis = connect_async(redis_url, timeout=settings.redis_timeout, pool_size=REDIS_POOL)
        readers = ReaderPool(settings.store_url, read_timeout=settings.read_timeout)
        services = Services(settings, redis_url, aredis, connect(redis_url, timeout=settings.redis_timeout),
                            registry, sent, readers, CommitFeed(aredis), Bus(aredis),
                            TailSlots(settings.max_live_tails))
        holder[:] = [services]
        app.state.services = services
        services.feed.start()
        services.bus.start()
        try:
            yield
        finally:
            await services.bus.close()
            await services.feed.close()
            await services.aredis.aclose()
            services.redis.close()
            services.readers.close()

    app = _Api(title="fleetlog", version="1", lifespan=lifespan, openapi_url=None, docs_url=None,
               redoc_url=None, redirect_slashes=False, description="Read a fleet's logs, send its devices "
               "commands, manage its credentials.  Every route but /healthz needs "
               "`Authorization: Bearer TOKEN` (`fleetlog api-token add NAME`).")
    for module in (health, reads, stream, commands, device_tokens, alerts, console):
        app.include_router(module.router)
    app.router.default = _relative_slash_redirect(app.router)
    failures.install(app)  # fleetlog's errors as HTTP answers, one table for every route
    # Inside the request counter below (added later, so outside): its answers are counted too.
    app.add_middleware(BodyLimits, max_bytes=settings.max_command_bytes, timeout=settings.body_timeout)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_token: ReadToken) -> dict[str, Any]:
        return app.openapi()

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.monotonic()
        response = await call_next(request)
        route = request.scope.get("route")
        requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        latency.observe(time.monotonic() - started)
        return response

    return app


def _server(config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn's server, its signals taken by :class:`~fleetlog.lifecycle.Shutdown` (uvicorn's rules).

    The first SIGINT or SIGTERM stops it in order (stop accepting, let the
    requests in hand finish); a second SIGINT stops waiting for them.  As
    uvicorn does, once stopped the process gets the signals again, its previous
    handlers back: a SIGTERM ends it as SIGTERM would have.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield  # signals reach the main thread only
                return
            shutdown = Shutdown(force_on={signal.SIGINT},
                                on_stop=lambda: setattr(self, "should_exit", True),
                                on_force=lambda: setattr(self, "force_exit", True)).install()
            try:
                yield
            finally:
                shutdown.restore()
            for signum in reversed(shutdown.received):
                signal.raise_signal(signum)

    return Server(config)


def run_api(settings: Settings, redis_url: str, port: int) -> int:
    """Entry point of ``fleetlog api``: serve until SIGINT/SIGTERM, return the exit code."""
    import uvicorn

    app = create_app(settings, redis_url)
    log.info("API on http://%s:%d (Redis %s, store %s)", settings.host, port, mask_url(redis_url),
             mask_url(settings.store_url))
    config = uvicorn.Config(app, host=settings.host, port=port, loop="uvloop", log_level="warning",
                            access_log=False, lifespan="on")
    server = _server(config)
    freeze_start_up_objects()
    try:
        server.run()
    except OSError as exc:
        log.error("API cannot start: %s", exc)
        return 1
    return 0 if server.started else 1
