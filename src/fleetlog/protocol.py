"""The device wire protocol, with no I/O.

A gateway hands each complete text message to :func:`parse_legacy` and gets
back a :class:`LegacyFrame` (what to record, what to queue) or a
:class:`~fleetlog.errors.FrameError` whose code and message go back to the
device in :func:`error_frame`.  Nothing here touches a socket or Redis, so
every rule of docs/CONTRACT.md's legacy protocol is tested without either.

The legacy protocol is the original PHP server's, kept exactly:

* every frame is answered first with ``server receive a message!``;
* a frame with ``deviceId`` (string or number) names the connection's device;
  the id must pass :mod:`fleetlog.device_id`'s policy, else ``bad_frame``;
* ``type`` 4 (or ``"4"``) with non-empty ``data`` carries one record, answered
  with ``log_upload_response`` once it is durably queued.

The v2 protocol (``{"type": "log", "id": ..., "records": [...]}``) carries
many records per frame, each optionally with a per-device ``seq``, and is
answered with one JSON ack that says exactly what was kept
(:func:`ack_frame`).  Both share one endpoint: :func:`parse_frame` tells them
apart by ``type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from fleetlog.device_id import device_id_problem
from fleetlog.errors import ErrorCode, FrameError
from fleetlog.exactjson import dumps, loads

__all__ = [
    "LOG_UPLOAD_RESPONSE",
    "SERVER_RECEIVED",
    "CommandResult",
    "LegacyFrame",
    "LogBatch",
    "ack_frame",
    "command_frame",
    "error_frame",
    "owned_record",
    "parse_frame",
    "parse_legacy",
    "server_text_frame",
]

SERVER_RECEIVED: Final = b"server receive a message!"
LOG_UPLOAD_RESPONSE: Final = b"log_upload_response"

#: ``type`` values that carry a record ("the device pushes information").
_LOG_TYPES: Final = (4, "4")

@dataclass(frozen=True, slots=True)
class LegacyFrame:
    """What a legacy frame asks of the gateway.

    ``device_id`` is ``None`` when the frame does not name a device.
    ``record`` is the JSON (UTF-8, unescaped) of ``data`` to queue, or ``None``
    when the frame carries no record.
    """

    device_id: str | None
    record: bytes | None


@dataclass(frozen=True, slots=True)
class LogBatch:
    """A v2 ``log`` frame: records to queue together, acked together.

    ``seqs[i]`` is record ``i``'s ``seq`` or ``None``; ``session`` scopes the
    seq counter (firmware that restarts counting must start a new session).
    """

    id: str
    device_id: str | None
    session: str
    records: list[bytes]
    seqs: list[int | None]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A v2 device's answer to a command: ``{"type": "command_result", "id": ..., ...}``.

    ``payload`` is the frame as the device sent it (JSON); the gateway hands
    it to whoever sent the command and answers the device nothing.
    """

    id: str
    payload: bytes


def _encode_record(value: Any) -> bytes:
    try:
        return dumps(value)
    except ValueError as exc:  # a lone surrogate, or nested too deep
        raise FrameError(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}") from None


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
    problem = device_id_problem(device_id)
    if problem is not None:
        raise FrameError(ErrorCode.BAD_FRAME, f"deviceId: {problem}")
    return device_id


def _decode_object(payload: bytes) -> dict[str, Any]:
    try:
        message = loads(payload)
    except ValueError as exc:
        raise FrameError(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "frame must be a JSON object")
    return message


def parse_frame(payload: bytes, max_records: int) -> LegacyFrame | LogBatch | CommandResult:
    """Parse one text message of either protocol.

    Raises :class:`FrameError` with ``bad_json`` when the payload is not JSON
    (or not UTF-8), ``bad_frame`` when it is JSON of the wrong shape, and
    ``too_large`` for a v2 frame with more than ``max_records`` records; for a
    v2 frame the error carries the frame's ``id`` when it had one.  For a
    legacy frame the caller must still send :data:`SERVER_RECEIVED` first, as
    the original did for every frame.
    """
    message = _decode_object(payload)
    kind = message.get("type")
    if kind == "command_result":
        try:
            return CommandResult(_frame_id(message.get("id"), "command_result"), payload)
        except FrameError as exc:
            exc.v2 = True
            raise
    if kind == "log":
        try:
            return _log_batch(message, max_records)
        except FrameError as exc:
            exc.v2 = True
            raise
    return _legacy(message)


def parse_legacy(payload: bytes) -> LegacyFrame:
    """Parse one legacy text message (see :func:`parse_frame`)."""
    return _legacy(_decode_object(payload))


def _frame_id(value: Any, kind: str = "log") -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise FrameError(ErrorCode.BAD_FRAME, f"a {kind} frame needs an id (string or integer)")
    frame_id = str(value)
    if len(frame_id) > 128:
        raise FrameError(ErrorCode.BAD_FRAME, "id is longer than 128 characters")
    return frame_id


def _log_batch(message: dict[str, Any], max_records: int) -> LogBatch:
    frame_id = _frame_id(message.get("id"))
    try:
        records = message.get("records")
        if not isinstance(records, list) or not records:
            raise FrameError(ErrorCode.BAD_FRAME, "records must be a non-empty array")
        if len(records) > max_records:
            raise FrameError(
                ErrorCode.TOO_LARGE, f"{len(records)} records in one frame; the limit is {max_records}"
            )
        session = message.get("session", "")
        if not isinstance(session, str) or len(session) > 64:
            raise FrameError(ErrorCode.BAD_FRAME, "session must be a string of up to 64 characters")
        seqs: list[int | None] = []
        for index, record in enumerate(records):
            if _is_empty(record):
                raise FrameError(ErrorCode.BAD_FRAME, f"record {index} is empty")
            seq = record.get("seq") if isinstance(record, dict) else None
            if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0
                                    or seq >= 1 << 53):
                raise FrameError(ErrorCode.BAD_FRAME, f"record {index}: seq must be an integer in [0, 2**53)")
            seqs.append(seq)
        return LogBatch(
            frame_id, _device_id(message.get("deviceId")), session,
            [_encode_record(record) for record in records], seqs,
        )
    except FrameError as exc:
        exc.frame_id = frame_id
        raise


def _legacy(message: dict[str, Any]) -> LegacyFrame:
    device_id = _device_id(message.get("deviceId"))
    if message.get("type") not in _LOG_TYPES:
        return LegacyFrame(device_id, None)
    data = message.get("data")
    if _is_empty(data):
        raise FrameError(ErrorCode.BAD_FRAME, "type 4 frame without data: nothing stored")
    return LegacyFrame(device_id, _encode_record(data))


def owned_record(record: bytes, device_id: str) -> bytes:
    """A record of an authenticated device as ``--queue list`` pushes it: naming its device.

    In list mode the record alone is pushed, as the original did, and a worker
    takes its device from a ``deviceId`` inside it (else ``unknown``).  When the
    gateway knows the device from its credential, that must not let a device
    file records under another one, nor leave its own as ``unknown``: a record
    naming another device is refused (``forbidden``, as a frame naming one is),
    and an object without ``deviceId`` gets the device's, as its first key.
    A record that is not an object (a string, an array) names no device and
    goes as it is.
    """
    if not record.startswith(b"{"):
        return record
    value = loads(record)
    if "deviceId" not in value:
        rest = record[1:]
        return b'{"deviceId":' + dumps(device_id) + (rest if rest == b"}" else b"," + rest)
    named = value["deviceId"]
    if isinstance(named, bool) or not isinstance(named, str | int) or str(named) != device_id:
        raise FrameError(ErrorCode.FORBIDDEN,
                         "a record's deviceId must be this connection's device")
    return record


def error_frame(code: ErrorCode, message: str, **extra: Any) -> bytes:
    """The JSON error frame sent to a device (docs/CONTRACT.md); ``extra`` may hold ``id``."""
    return orjson.dumps({"type": "error", "code": str(code), "message": message, **extra})


def ack_frame(
    frame_id: str,
    *,
    stored: int,
    duplicates: list[int],
    stored_through: int | None,
    missing: list[tuple[int, int]],
    duplicate_frame: bool,
) -> bytes:
    """The v2 ack: what of the frame's records is now durably queued.

    ``stored`` counts the records queued by this frame; ``duplicates`` lists
    seqs that were already stored (not stored again); ``stored_through`` is the
    highest seq below which every seq of the device's session was received, and
    ``missing`` the gaps above it the device should resend.  ``duplicate`` is
    true when this frame id had been queued before (nothing was stored again).
    """
    ack: dict[str, Any] = {"type": "ack", "id": frame_id, "stored": stored}
    if duplicate_frame:
        ack["duplicate"] = True
    if duplicates:
        ack["duplicates"] = duplicates
    if stored_through is not None:
        ack["stored_through"] = stored_through
        ack["missing"] = [list(gap) for gap in missing]
    return orjson.dumps(ack)


def command_frame(command_id: str, body: Any, *, v2: bool) -> bytes:
    """The frame that carries a command down to a device (docs/CONTRACT.md).

    A legacy device gets ``body`` as it is.  A v2 device gets
    ``{"type": "command", "id": command_id, ...body}`` when ``body`` is an
    object (its own ``type`` and ``id`` are replaced), else
    ``{"type": "command", "id": command_id, "body": body}``; it may answer
    with a ``command_result`` frame carrying the same ``id``.
    """
    if not v2:
        return dumps(body)
    if isinstance(body, dict):
        fields = {key: value for key, value in body.items() if key not in ("type", "id")}
        return dumps({"type": "command", "id": command_id, **fields})
    return dumps({"type": "command", "id": command_id, "body": body})


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
