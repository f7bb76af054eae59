"""What every route shares: the process's clients and the bearer-token check.

:class:`Services` lives on ``app.state.services`` from startup to shutdown.
:func:`require` builds the dependency a route declares to need a role:
no or an unknown token is 401 (with ``WWW-Authenticate: Bearer``), a role
too weak is 403; Redis not answering goes through to the app's handler (503,
:mod:`.failures`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import redis
import redis.asyncio
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter
from starlette.convertors import PathConvertor, register_url_convertor

from fleetlog.api.auth import OperatorToken, Role, allows, identify
from fleetlog.api.bus import Bus
from fleetlog.api.commits import CommitFeed
from fleetlog.api.guard import MemoryTrim, TailSlots
from fleetlog.config import Settings
from fleetlog.queue.connection import REDIS_DOWN
from fleetlog.reading import ReaderPool

__all__ = ["ERRORS", "AdminToken", "Found", "ReadToken", "ReadTokenUnlessRedisDown", "Services", "invalid",
           "require", "require_unless_redis_down", "services"]

_DETAIL: Final = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {}}, "required": ["detail"]}}}}

#: The error answers every authenticated route may give, for the OpenAPI schema.
ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"description": "No token, or an unknown or revoked one.", **_DETAIL},
    403: {"description": "The token's role may not do this.", **_DETAIL},
    503: {"description": "Redis (or, for a read, the store) is not answering.", **_DETAIL},
}


class DevicePathConvertor(PathConvertor):
    """``{device_id:device}``: any characters, ``/`` and line breaks included.

    Starlette's ``path`` is ``.*``, which stops at a newline: a device id with
    one (percent-encoded) matched no route at all, a 404 the schema does not
    describe; this way it reaches the route, which answers its 422.
    """

    regex = r"[\s\S]*"


register_url_convertor("device", DevicePathConvertor())


@dataclass
class Services:
    """The clients one API process uses (created at startup, closed at shutdown)."""

    settings: Settings
    redis_url: str
    aredis: redis.asyncio.Redis  # auth lookups, commands
    redis: redis.Redis  # blocking routes run in a thread: credentials, readiness
    registry: CollectorRegistry
    commands: Counter
    readers: ReaderPool  # the store, read-only, one reader per thread at a time
    feed: CommitFeed  # the workers' commit announcements, for live tails
    bus: Bus  # token revocations, command replies: one subscription for the process
    tails: TailSlots  # live tails admitted, at most settings.max_live_tails
    memory: MemoryTrim = field(default_factory=MemoryTrim)  # gives memory back after large answers


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def invalid(where: str, name: str, message: str) -> RequestValidationError:
    """A 422 for a value the schema cannot describe, in FastAPI's own shape (``detail`` a list)."""
    return RequestValidationError([{"loc": (where, name), "msg": message, "type": "value_error"}])


#: A route's parameter: the process's :class:`Services`.
Found = Annotated[Services, Depends(services)]

_bearer = HTTPBearer(auto_error=False, description="An operator token from `fleetlog api-token add`.")


def require(role: Role) -> Callable[..., Awaitable[OperatorToken]]:
    """A dependency that admits a request only with a token of ``role`` (or admin)."""

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        found: Found,
    ) -> OperatorToken:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "an operator token is needed: Authorization: Bearer TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})
        token = await identify(found.aredis, credentials.credentials)  # Redis down: a 503
        if token is None:
            raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
        if not allows(token.role, role):
            raise HTTPException(403, f"this needs an {role} token; this token's role is {token.role}")
        return token

    return check


def require_unless_redis_down(role: Role) -> Callable[..., Awaitable[OperatorToken | None]]:
    """:func:`require`, but None instead of 503 when Redis (which holds the tokens) is down.

    For ``/readyz``, whose whole point while Redis is down is to say so (and which
    part of ``fleetlog up`` is restarting); the route then says no more than the
    gateway's ``/healthz`` tells anyone.  No token, or a wrong one, is still 401.
    """
    checked = require(role)

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        found: Found,
    ) -> OperatorToken | None:
        try:
            return await checked(credentials, found)
        except REDIS_DOWN:
            return None

    return check


#: A route's parameter that needs a ``read`` (or ``admin``) token.
ReadToken = Annotated[OperatorToken, Depends(require("read"))]
#: :data:`ReadToken`, or None when the token cannot be checked because Redis is down.
ReadTokenUnlessRedisDown = Annotated[OperatorToken | None, Depends(require_unless_redis_down("read"))]
#: A route's parameter that needs an ``admin`` token.
AdminToken = Annotated[OperatorToken, Depends(require("admin"))]
