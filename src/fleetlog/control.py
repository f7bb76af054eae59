"""Every message of the control channels, built and read here, as :mod:`fleetlog.keys` names every key.

A gateway node listens on its control channel (:func:`fleetlog.keys.node_control`)
for two messages:

- ``{"op": "command", "id", "device", "conn", "body"}``: write ``body`` to device
  ``device``, on connection ``conn`` if it still holds the device.  The API publishes
  it (:func:`command_message`); the node reads it as a :class:`Command`.
- ``{"op": "takeover", "device", "conn"}``: another node linked ``device``; close its
  old connection ``conn`` here (4409).  The ``LINK`` script publishes it from inside
  Redis (:data:`fleetlog.queue.scripts.LINK`), so its one builder is Lua; the node
  reads it as a :class:`Takeover`.

On a command's reply channel (:func:`fleetlog.keys.command_reply`) the node answers
the API:

- ``{"id", "device", "status", "node"}``, ``status`` ``delivered`` or ``offline``:
  whether the command went out (:func:`delivery_reply`);
- ``{"id", "device", "status": "result", "result"}``: a v2 device's ``command_result``
  frame, verbatim (:func:`result_reply`).

The API's reader adds one of its own, ``{"status": "unreadable", "error"}``, for
a reply it could not read (:mod:`fleetlog.api.bus`).

The API reads both as a :class:`Reply` (:func:`parse_reply`).  Messages arrive as
JSON objects already decoded (:mod:`fleetlog.gateway.registry`, :mod:`fleetlog.api.bus`);
the parsers take what they find there and never trust its types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from fleetlog import exactjson

__all__ = [
    "Command",
    "DeliveryStatus",
    "Reply",
    "Takeover",
    "command_body",
    "command_message",
    "delivery_reply",
    "parse_control",
    "parse_reply",
    "result_reply",
]

#: What a node answers once it handled a command.
DeliveryStatus = Literal["delivered", "offline"]


@dataclass(frozen=True, slots=True)
class Command:
    """A command for a device on this node."""

    command_id: str
    device_id: str
    #: The connection the device's link named (as text; the device's current one if it is gone).
    conn: str
    #: Any JSON: what the device is sent (:func:`fleetlog.protocol.command_frame` frames it).
    body: Any


@dataclass(frozen=True, slots=True)
class Takeover:
    """Another node holds ``device_id`` now: close connection ``conn`` here."""

    device_id: str | None
    conn: str


@dataclass(frozen=True, slots=True)
class Reply:
    """A node's answer on a command's reply channel; a field of the wrong type reads ``None``."""

    command_id: str | None
    device_id: str | None
    #: ``delivered``, ``offline``, ``result`` or ``unreadable``.
    status: str | None
    #: The node that answered (``delivered`` and ``offline``).
    node: str | None = None
    #: The device's ``command_result`` frame (``result``).
    result: Any = None
    #: Why the reply could not be read (``unreadable``).
    error: str | None = None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def command_body(body: Any) -> bytes:
    """``body`` as a node will read it back exactly: a node reads control messages with orjson.

    Raises :class:`ValueError`, saying why, for a body orjson cannot carry: nested
    deeper than :data:`fleetlog.exactjson.MAX_DEPTH`, a string with a lone surrogate,
    an integer beyond 64 bits (the node would read it as a double).  The API
    answers it 422, and nothing is sent.
    """
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        pass
    # orjson says only "Recursion limit reached" and the like: exactjson tells the cases apart.
    try:
        exactjson.dumps(body)
    except UnicodeEncodeError:
        raise ValueError("a string or key holds a lone surrogate (\\ud800 to \\udfff): not Unicode") from None
    except ValueError as exc:  # nested too deep
        raise ValueError(str(exc)) from None
    raise ValueError("an integer is beyond 64 bits, which a gateway would read as another number "
                     "(send it as a string)")


def command_message(command_id: str, device_id: str, conn: str | None, body: Any) -> bytes:
    """The API's command for the node whose connection ``conn`` holds ``device_id``.

    Raises :class:`ValueError` for a body :func:`command_body` refuses.
    """
    return orjson.dumps({"op": "command", "id": command_id, "device": device_id,
                         "conn": conn, "body": orjson.Fragment(command_body(body))})


def parse_control(message: dict[str, Any]) -> Command | Takeover | None:
    """A control-channel message: a :class:`Command`, a :class:`Takeover`, or ``None`` (another op).

    Raises :class:`ValueError` for a command without a text ``id`` and ``device``
    or without a ``body``: the caller logs it and goes on.
    """
    op = message.get("op")
    if op == "takeover":
        return Takeover(_text(message.get("device")), str(message.get("conn")))
    if op != "command":
        return None
    command_id, device_id = message.get("id"), message.get("device")
    if not isinstance(command_id, str) or not isinstance(device_id, str) or "body" not in message:
        raise ValueError("a command needs a text id and device, and a body")
    return Command(command_id, device_id, str(message.get("conn")), message["body"])


def delivery_reply(command_id: str, device_id: str, status: DeliveryStatus, node_id: str) -> bytes:
    """The node's answer: the command went out to the device (``delivered``) or not (``offline``)."""
    return orjson.dumps({"id": command_id, "device": device_id, "status": status, "node": node_id})


def result_reply(command_id: str, device_id: str, payload: bytes) -> bytes:
    """The device's ``command_result`` frame (``payload``: JSON, passed on verbatim)."""
    return b'{"id":%s,"device":%s,"status":"result","result":%s}' % (
        orjson.dumps(command_id), orjson.dumps(device_id), payload)


def parse_reply(message: dict[str, Any]) -> Reply:
    """A reply as the API reads it (see the module docstring)."""
    return Reply(_text(message.get("id")), _text(message.get("device")),
                 _text(message.get("status")), _text(message.get("node")), message.get("result"),
                 _text(message.get("error")))
