"""Commands down to devices: ``POST /api/devices/{id}/commands``.

The device's link (``device:links``) names the gateway node and connection
that hold it.  With no link, or a node whose heartbeat is gone, the answer is
``offline`` at once.  Otherwise the API subscribes to the command's reply
channel (:func:`fleetlog.keys.command_reply`), *then* publishes
``{"op": "command", "id", "device", "conn", "body"}`` on the node's control
channel (the messages: :mod:`fleetlog.control`); the node writes the frame to
the device and answers ``delivered`` (or ``offline`` if the connection is
gone), and later relays the device's ``command_result`` on the same channel.
Every wait is bounded: :data:`DELIVERY_TIMEOUT` for the node, ``wait`` seconds
for the result.

The subscription is made on the process's one pub/sub connection
(:meth:`fleetlog.api.bus.Bus.replies`), not on a connection of its own: a
command waiting 60 s for its result holds none of the pool's connections, so
a thousand of them delay no other request.

The body is any JSON of at most ``max_command_bytes`` (64 KiB): the token is
checked, and the size, before a byte of it is read (:mod:`.limits`), so no
command can grow past what Redis pub/sub and a gateway's subscription take.
It is read strictly (:func:`fleetlog.exactjson.loads`: Starlette's reader
takes ``NaN``, which a device got as ``null``), and a body a gateway could not
read back exactly (:func:`fleetlog.control.command_body`: nested deeper than
254 levels, a lone surrogate, an integer beyond 64 bits) is refused: 422,
nothing sent.

The device's result comes back whole (:mod:`.bus` reads it exactly); one that
could not be read, or could not be written back (nested deeper than 254
levels), comes as ``result: null`` with ``error`` saying why, never as a
timeout.

A device that moved to another node between the lookup and the publish is
answered ``offline`` by its old node; the link is then read again and the
command sent once more to where it is now (at most :data:`MAX_ATTEMPTS`).
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Final, Literal

import redis.asyncio
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from fleetlog import control, exactjson, keys
from fleetlog.api.bus import Bus
from fleetlog.api.deps import ERRORS, AdminToken, Found, invalid
from fleetlog.device_id import device_id_problem
from fleetlog.links import parse_link
from fleetlog.queue.connection import REDIS_DOWN

__all__ = ["DELIVERY_TIMEOUT", "CommandOutcome", "router", "send_command"]

#: Seconds the node has to say it wrote the command (or that the device is gone).
DELIVERY_TIMEOUT: Final = 5.0
#: The longest ``wait`` for a device's result.
MAX_WAIT: Final = 60.0
#: Sends of one command while the device keeps moving between nodes.
MAX_ATTEMPTS: Final = 3

Status = Literal["delivered", "offline", "timeout"]


class CommandOutcome(BaseModel):
    """What became of a command."""

    id: str = Field(description="The command's id (a v2 device's command_result carries it).")
    device_id: str
    status: Status = Field(description="delivered: written to the device (and, with wait, answered); "
                           "offline: no live connection; timeout: no answer in time.")
    delivered: bool = Field(description="Whether the device's node wrote the command to it.")
    result: Any = Field(default=None, description="The device's command_result frame, with wait.")
    error: str | None = Field(default=None, description="Why the device's command_result could not be "
                              "passed on (result is then null).")


async def _link(client: redis.asyncio.Redis, device_id: str) -> dict[str, Any] | None:
    """The device's live link, or ``None`` if it has none on a live node."""
    raw = await client.hget(keys.DEVICE_LINKS, device_id)
    if raw is None:
        return None
    link = parse_link(raw)
    node = link.get("node")
    if not isinstance(node, str) or not await client.exists(keys.node_heartbeat(node)):
        return None
    return link


def _answered(command_id: str, device_id: str, reply: control.Reply) -> CommandOutcome:
    """The outcome for the device's answer: its result, or why it cannot be passed on."""
    error = reply.error if reply.status == "unreadable" else None
    if error is None:
        try:
            exactjson.dumps(reply.result)  # what the response will have to write
        except ValueError as exc:
            error = str(exc)
    if error is not None:
        return CommandOutcome(id=command_id, device_id=device_id, status="delivered", delivered=True,
                              error=f"the device's command_result could not be read: {error}")
    return CommandOutcome(id=command_id, device_id=device_id, status="delivered", delivered=True,
                          result=reply.result)


async def send_command(client: redis.asyncio.Redis, bus: Bus, device_id: str, body: Any, *,
                       wait: float = 0.0) -> CommandOutcome:
    """Send ``body`` to the device; see the module docstring.  Raises redis-py's errors
    (but for the subscription lost while waiting for the result: a timeout), and
    :class:`ValueError` for a body :func:`fleetlog.control.command_body` refuses (before
    anything is published)."""
    command_id = secrets.token_hex(12)
    async with bus.replies(keys.command_reply(command_id), DELIVERY_TIMEOUT) as replies:
        delivered = False
        for _ in range(MAX_ATTEMPTS):
            link = await _link(client, device_id)
            if link is None:
                break
            message = control.command_message(command_id, device_id, link.get("conn"), body)
            if not await client.publish(keys.node_control(link["node"]), message):
                break  # the node is not listening: it is gone
            heard = time.monotonic() + DELIVERY_TIMEOUT
            while (answer := await replies.next(heard)) is not None:
                reply = control.parse_reply(answer)
                if reply.status == "delivered" and reply.device_id == device_id:
                    delivered = True
                    break
                if (reply.status == "result" and reply.device_id == device_id) or (
                        reply.status == "unreadable"):
                    # The device answered: it has the command, whatever became of "delivered"
                    # (published first, but one lost or late must not send the command twice).
                    return (_answered(command_id, device_id, reply) if wait > 0 else
                            CommandOutcome(id=command_id, device_id=device_id, status="delivered",
                                           delivered=True))
                if reply.status == "offline":
                    break  # the device may have moved to another node meanwhile: look again
            else:
                return CommandOutcome(id=command_id, device_id=device_id, status="timeout",
                                      delivered=False)
            if delivered:
                break
        if not delivered:
            return CommandOutcome(id=command_id, device_id=device_id, status="offline", delivered=False)
        if wait <= 0:
            return CommandOutcome(id=command_id, device_id=device_id, status="delivered", delivered=True)
        deadline = time.monotonic() + wait
        try:
            while (answer := await replies.next(deadline)) is not None:
                reply = control.parse_reply(answer)
                # Only the device the command went to may answer it.  An unreadable reply names
                # no device; only a gateway relays on this channel, whose id is known to this
                # command's device alone.
                if ((reply.status == "result" and reply.device_id == device_id)
                        or reply.status == "unreadable"):
                    return _answered(command_id, device_id, reply)
        except REDIS_DOWN:
            pass  # sent, but its answer can no longer come: no answer in time
        return CommandOutcome(id=command_id, device_id=device_id, status="timeout", delivered=True)


def _refused(message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body",), "msg": message, "type": "value_error"}])


async def _command_body(request: Request) -> Any:
    """The request's body, read strictly, and a 422 for one a gateway could not carry."""
    try:
        body = exactjson.loads(await request.body())
    except ValueError as exc:
        raise _refused(f"the body is not JSON: {exc}") from None
    try:
        control.command_body(body)
    except ValueError as exc:
        raise _refused(f"the body cannot be sent: {exc}") from None
    return body


router = APIRouter(tags=["commands"], responses=ERRORS)


@router.post("/api/devices/{device_id:device}/commands", response_model=CommandOutcome,
             summary="Send a command to a device", responses={
                 408: {"description": "The body did not arrive within body_timeout (10 s)."},
                 413: {"description": "The body is over max_command_bytes (64 KiB)."},
                 422: {"description": "The body is not JSON, or one a gateway cannot read back exactly "
                                      "(nested deeper than 254 levels, a lone surrogate, an integer "
                                      "beyond 64 bits): nothing is sent."}},
             # Read by _command_body, not by FastAPI, whose reader takes NaN.
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"description": "Any JSON: a legacy device receives it as it is, a v2 device "
                            'as {"type": "command", "id": ..., ...body}.'}}}}})
async def post_command(
    device_id: Annotated[str, Path(description="The device's id.")],
    request: Request,
    _token: AdminToken,
    found: Found,
    wait: Annotated[float, Query(ge=0.0, le=MAX_WAIT, description=(
        "Seconds to wait for a v2 device's command_result (0: do not)."))] = 0.0,
) -> CommandOutcome:
    problem = device_id_problem(device_id)
    if problem:
        raise invalid("path", "device_id", problem)
    body = await _command_body(request)
    try:
        outcome = await send_command(found.aredis, found.bus, device_id, body, wait=wait)
    except REDIS_DOWN as exc:
        raise HTTPException(503, "Redis is not answering; the command was not sent") from exc
    found.commands.labels(outcome.status).inc()
    return outcome
