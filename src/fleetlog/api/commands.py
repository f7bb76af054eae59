"""Commands down to devices: ``POST /api/devices/{id}/commands``.

The device's link (``device:links``) names the gateway node and connection
that hold it.  With no link, or a node whose heartbeat is gone, the answer is
``offline`` at once.  Otherwise the API subscribes to the command's reply
channel (:func:`fleetlog.keys.command_reply`), *then* publishes
``{"op": "command", "id", "device", "conn", "body"}`` on the node's control
channel; the node writes the frame to the device and answers ``delivered``
(or ``offline`` if the connection is gone), and later relays the device's
``command_result`` on the same channel.  Every wait is bounded:
:data:`DELIVERY_TIMEOUT` for the node, ``wait`` seconds for the result.

A device that moved to another node between the lookup and the publish is
answered ``offline`` by its old node; the link is then read again and the
command sent once more to where it is now (at most :data:`MAX_ATTEMPTS`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated, Any, Final, Literal

import orjson
import redis.asyncio
from fastapi import APIRouter, Body, HTTPException, Path, Query
from pydantic import BaseModel, Field

from fleetlog import keys
from fleetlog.api.deps import ERRORS, Admin, Found, invalid
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


async def _next_message(pubsub: Any, deadline: float) -> dict[str, Any] | None:
    """The next reply on the subscription, or ``None`` at ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0))
        if message is not None:
            try:
                value = orjson.loads(message["data"])
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


async def send_command(client: redis.asyncio.Redis, device_id: str, body: Any, *,
                       wait: float = 0.0) -> CommandOutcome:
    """Send ``body`` to the device; see the module docstring.  Raises redis-py's errors."""
    command_id = secrets.token_hex(12)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(keys.command_reply(command_id))
        delivered = False
        for _ in range(MAX_ATTEMPTS):
            link = await _link(client, device_id)
            if link is None:
                break
            message = orjson.dumps({"op": "command", "id": command_id, "device": device_id,
                                    "conn": link.get("conn"), "body": body})
            if not await client.publish(keys.node_control(link["node"]), message):
                break  # the node is not listening: it is gone
            reply = await _next_message(pubsub, time.monotonic() + DELIVERY_TIMEOUT)
            if reply is None:
                return CommandOutcome(id=command_id, device_id=device_id, status="timeout",
                                      delivered=False)
            if reply.get("status") == "delivered" and reply.get("device") == device_id:
                delivered = True
                break
            # offline: the device may have moved to another node meanwhile; look again.
        if not delivered:
            return CommandOutcome(id=command_id, device_id=device_id, status="offline", delivered=False)
        if wait <= 0:
            return CommandOutcome(id=command_id, device_id=device_id, status="delivered", delivered=True)
        deadline = time.monotonic() + wait
        while (reply := await _next_message(pubsub, deadline)) is not None:
            # Only the device the command went to may answer it.
            if reply.get("status") == "result" and reply.get("device") == device_id:
                return CommandOutcome(id=command_id, device_id=device_id, status="delivered",
                                      delivered=True, result=reply.get("result"))
        return CommandOutcome(id=command_id, device_id=device_id, status="timeout", delivered=True)
    finally:
        await asyncio.shield(pubsub.aclose())


router = APIRouter(tags=["commands"], responses=ERRORS)


@router.post("/api/devices/{device_id:device}/commands", response_model=CommandOutcome,
             summary="Send a command to a device")
async def post_command(
    device_id: Annotated[str, Path(description="The device's id.")],
    body: Annotated[Any, Body(description="Any JSON: a legacy device receives it as it is, a v2 "
                              'device as {"type": "command", "id": ..., ...body}.')],
    _token: Admin,
    found: Found,
    wait: Annotated[float, Query(ge=0.0, le=MAX_WAIT, description=(
        "Seconds to wait for a v2 device's command_result (0: do not)."))] = 0.0,
) -> CommandOutcome:
    problem = device_id_problem(device_id)
    if problem:
        raise invalid("path", "device_id", problem)
    try:
        outcome = await send_command(found.aredis, device_id, body, wait=wait)
    except REDIS_DOWN as exc:
        raise HTTPException(503, "Redis is not answering; the command was not sent") from exc
    found.commands.labels(outcome.status).inc()
    return outcome
