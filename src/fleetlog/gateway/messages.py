"""Reassemble WebSocket messages from frames, with no I/O.

The WebSocket library below the gateway delivers raw frames (that is what
makes it fast); RFC 6455 §5.4 lets a peer split one message into a first frame
and continuations.  :class:`Reassembler` turns frames back into messages and
enforces the message size limit on every message however it is framed (one
frame or many), raising :class:`MessageError` with the close code the gateway
must send.  The gateway negotiates no extension, so a frame with a reserved
bit set (a compressed frame, for one) breaks the protocol rather than slipping
past the size limit in a form the gateway would not decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from fleetlog.errors import CloseCode, MessageError

__all__ = ["CloseCode", "Message", "MessageError", "Opcode", "Reassembler"]


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2


@dataclass(frozen=True, slots=True)
class Message:
    binary: bool
    payload: bytes


class Reassembler:
    """Feed data frames with :meth:`feed`; it returns a message once one is complete."""

    __slots__ = ("_binary", "_fragments", "_max_size", "_size")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._fragments: list[bytes] | None = None
        self._binary = False
        self._size = 0

    def feed(self, opcode: int, fin: bool, payload: bytes, reserved: int = 0) -> Message | None:
        """Take one data frame; return the message it completes, if any.

        ``reserved`` is the frame's RSV1-3 bits.  Raises :class:`MessageError`
        for reserved bits set, a continuation out of place, a new message
        inside a fragmented one, or a message over the size limit; the caller
        must then close the connection with its code and feed nothing more.
        """
        if reserved:
            self._fragments = None
            raise MessageError(CloseCode.PROTOCOL_ERROR, "reserved bits set; no extension was negotiated")
        if opcode == Opcode.CONTINUATION:
            if self._fragments is None:
                raise MessageError(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
            self._grow(len(payload))
            self._fragments.append(payload)
            if not fin:
                return None
            message = Message(self._binary, b"".join(self._fragments))
            self._fragments = None
            return message
        if self._fragments is not None:
            raise MessageError(CloseCode.PROTOCOL_ERROR, "new message before the last one ended")
        self._size = 0
        self._grow(len(payload))
        if fin:
            return Message(opcode == Opcode.BINARY, payload)
        self._fragments = [payload]
        self._binary = opcode == Opcode.BINARY
        return None

    def _grow(self, size: int) -> None:
        self._size += size
        if self._size > self._max_size:
            self._fragments = None
            raise MessageError(
                CloseCode.MESSAGE_TOO_BIG, f"message over the {self._max_size}-byte limit"
            )
