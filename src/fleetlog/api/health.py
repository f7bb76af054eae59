"""``/healthz`` (the process answers), ``/readyz`` (it can do its work) and ``/metrics``.

Ready means: Redis answers, the store is writable, and the workers' consumer
lag is under ``max_consumer_lag``.  For SQLite "writable" is tested for real:
a write transaction begun and rolled back (taking the write lock for an
instant), without ever creating the file; PostgreSQL must take a new
connection and be a primary.

Under ``fleetlog up`` the checks also name the parts ``up`` runs (gateway,
worker) and, when Redis or one of them is down, what ``up`` is doing about it
("down since ...; fleetlog up restarts it", "restarting since ... (loading its
data)"): read from the file ``up`` keeps in the data dir, since the API sees
neither the other processes nor, while it is down, Redis.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fleetlog.api.deps import ERRORS, Found, ReadToken, ReadTokenUnlessRedisDown, Services
from fleetlog.config import mask_url
from fleetlog.embedded import up_parts
from fleetlog.metrics import CONTENT_TYPE, render
from fleetlog.queue.stats import queue_stats_for

__all__ = ["router"]

router = APIRouter(tags=["health"])

#: Seconds /readyz waits for PostgreSQL to connect, and then to answer (whole seconds:
#: libpq's connect_timeout).
_STORE_TIMEOUT_S = 2


class Healthy(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, str]


@router.get("/healthz", response_model=Healthy, summary="The API process answers (no token needed)")
def healthz() -> Healthy:
    return Healthy(status="ok")


def _store_problem(url: str) -> str | None:
    if not url.startswith("sqlite:///"):
        return _postgres_problem(url)
    path = url.removeprefix("sqlite:///")
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=1.0, isolation_level=None)
    except sqlite3.Error as exc:
        return f"cannot open the store: {exc}"
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        return f"the store is not writable: {exc}"
    finally:
        db.close()
    return None


def _postgres_problem(url: str) -> str | None:
    """PostgreSQL answers on a connection of its own (the readers' pool may hold ones made
    before it went down) and is a primary: a standby in recovery takes no writes."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=_STORE_TIMEOUT_S, autocommit=True,
                             application_name="fleetlog-readyz",
                             options=f"-c statement_timeout={_STORE_TIMEOUT_S * 1000}") as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error as exc:
        return f"cannot reach the store at {mask_url(url)}: {str(exc).strip().splitlines()[0]}"
    if row is not None and row[0]:
        return f"the store at {mask_url(url)} is a standby in recovery: it takes no writes"
    return None


#: The parts of ``fleetlog up`` shown besides Redis (the API answering is itself).
_UP_PARTS = ("gateway", "worker")
#: A check that was not made.
UNKNOWN = "unknown"


def readiness(found: Services, *, verified: bool = True) -> Readiness:
    """The checks; ``verified`` False when the caller's token could not be checked.

    That happens only while Redis (which holds the tokens) is down: then the
    answer says which part is down and nothing more, neither the queue nor the
    store, as the gateway's ``/healthz`` would tell anyone.
    """
    settings = found.settings
    parts = up_parts(settings.data_dir, found.redis_url)
    checks: dict[str, str] = {}
    problem = "not answering"  # unverified: the token lookup found Redis down
    if verified:
        try:
            found.redis.ping()
            stats = queue_stats_for(found.redis, settings)
            checks["redis"] = "ok"
            checks["consumer_lag"] = (
                "ok" if stats.lag <= settings.max_consumer_lag
                else f"{stats.lag} records not yet read by a worker (limit {settings.max_consumer_lag})")
        except redis.RedisError as exc:
            problem = f"not answering: {type(exc).__name__}"
    if "redis" not in checks:
        # What `up` knows (down, restarting) says more than the client's exception.
        said = parts.get("redis", "ok")
        checks["redis"] = said if said != "ok" else problem
        checks["consumer_lag"] = UNKNOWN
    checks["store"] = (_store_problem(settings.store_url) or "ok") if verified else UNKNOWN
    checks.update((name, parts[name]) for name in _UP_PARTS if name in parts)
    return Readiness(ready=all(value == "ok" for value in checks.values()), checks=checks)


@router.get("/readyz", response_model=Readiness,
            responses={**ERRORS, 503: {"model": Readiness, "description": "Not ready: see checks."}},
            summary="Redis answers, the store is writable, the consumer lag is under its limit; "
                    "under fleetlog up, which part is down")
def readyz(token: ReadTokenUnlessRedisDown, found: Found) -> Any:
    answer = readiness(found, verified=token is not None)
    return JSONResponse(answer.model_dump(), status_code=200 if answer.ready else 503)


@router.get("/metrics", response_class=Response, responses={
    **ERRORS, 200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                    "description": "Prometheus text format."}},
    summary="Prometheus metrics of this API process and of the queue")
def metrics(_token: ReadToken, found: Found) -> Response:
    return Response(render(found.registry), media_type=CONTENT_TYPE)
