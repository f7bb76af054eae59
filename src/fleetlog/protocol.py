"""The device wire protocol, with no I/O.

A gateway hands each complete text message to :func:`parse_legacy` and gets
back a :class:`LegacyFrame` (what to record, what to queue) or a
:class:`~fleetlog.errors.FrameError` whose code and message go back to the
device in :func:`error_frame`.  Nothing here touches a socket or Redis, so
every rule of CONTRACT.md's legacy protocol is tested without either.

The legacy protocol is the original PHP server's, kept exactly:

* every frame is answered first with ``server receive a message!``;
* a frame with ``deviceId`` (string or number) names the connection's device;
* ``type`` 4 (or ``"4"``) with non-empty ``data`` carries one record, answered
  with ``log_upload_response`` once it is durably queued.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from fleetlog.errors import ErrorCode, FrameError

__all__ = [
    "LOG_UPLOAD_RESPONSE",
    "SERVER_RECEIVED",
    "LegacyFrame",
    "decode_json",
    "encode_json",
    "error_frame",
    "parse_legacy",
    "server_text_frame",
]

SERVER_RECEIVED: Final = b"server receive a message!"
LOG_UPLOAD_RESPONSE: Final = b"log_upload_response"

#: ``type`` values that carry a record ("the device pushes information").
_LOG_TYPES: Final = (4, "4")

#: Integers this long may not fit in 64 bits; orjson would turn them into
#: floats and silently change the record, the stdlib keeps them exact.
_LONG_INTEGER = re.compile(rb"\d{19}")


@dataclass(frozen=True, slots=True)
class LegacyFrame:
    """What a legacy frame asks of the gateway.

    ``device_id`` is ``None`` when the frame does not name a device.
    ``record`` is the JSON (UTF-8, unescaped) of ``data`` to queue, or ``None``
    when the frame carries no record.
    """

    device_id: str | None
    record: bytes | None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(payload: bytes) -> Any:
    """Decode JSON exactly: fast with orjson, exact for integers beyond 64 bits.

    Raises :class:`ValueError` (and :class:`RecursionError` for absurd
    nesting) on anything that is not strict JSON.
    """
    if _LONG_INTEGER.search(payload) is None:
        return orjson.loads(payload)
    return json.loads(payload, parse_constant=_reject_constant)


def encode_json(value: Any) -> bytes:
    """Encode JSON compactly with Unicode unescaped, as the original did."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, decoded by the stdlib
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _is_empty(data: Any) -> bool:
    """The original's ``if ($logData)``, minus PHP's dropping of ``0``/``"0"``.

    Dropping a device's zero silently would lose a record, so only values with
    nothing in them count as empty.
    """
    return data is None or data is False or (isinstance(data, str | list | dict) and not data)


def _device_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise FrameError(ErrorCode.BAD_FRAME, "deviceId must be a string or an integer")
    device_id = str(value)
    if len(device_id) > 128:
        raise FrameError(ErrorCode.BAD_FRAME, "deviceId is longer than 128 characters")
    return device_id


def parse_legacy(payload: bytes) -> LegacyFrame:
    """Parse one legacy text message.

    Raises :class:`FrameError` with ``bad_json`` when the payload is not JSON
    (or not UTF-8) and ``bad_frame`` when it is JSON of the wrong shape.  The
    caller must still send :data:`SERVER_RECEIVED` first, as the original did
    for every frame.
    """
    try:
        message = decode_json(payload)
    except (ValueError, RecursionError) as exc:
        raise FrameError(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "frame must be a JSON object")
    device_id = _device_id(message.get("deviceId"))
    if message.get("type") not in _LOG_TYPES:
        return LegacyFrame(device_id, None)
    data = message.get("data")
    if _is_empty(data):
        raise FrameError(ErrorCode.BAD_FRAME, "type 4 frame without data: nothing stored")
    return LegacyFrame(device_id, encode_json(data))


def error_frame(code: ErrorCode, message: str, **extra: Any) -> bytes:
    """The JSON error frame sent to a device (CONTRACT.md)."""
    return orjson.dumps({"type": "error", "code": str(code), "message": message, **extra})


def server_text_frame(payload: bytes) -> bytes:
    """Encode ``payload`` as one unmasked, final text frame (RFC 6455 §5.2).

    Server frames are never masked, so a constant reply can be encoded once and
    written to the socket as is; the gateway writes both legacy replies with one
    call this way.
    """
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload
