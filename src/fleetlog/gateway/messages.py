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
from typing import Final

from fleetlog.errors import CloseCode, MessageError

__all__ = ["FIRST_READ_BUFFER", "FIRST_READ_SIZE", "MAX_FRAGMENTS", "BufferBudget", "CloseCode", "Message",
           "MessageError", "Opcode", "Reassembler", "frame_cap", "grows", "read_buffer_for"]


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2


@dataclass(frozen=True, slots=True)
class Message:
    binary: bool
    payload: bytes


class BufferBudget:
    """The bytes all connections of a process may hold for what devices send, together.

    Each connection's limit (``max_message_bytes``) bounds one message, not how
    many connections hold one: 3,000 connections that each sent 900 KiB of a
    message and never finished it held 4.2 GB.  Every :class:`Reassembler`
    of a process takes from one budget the bytes of its unfinished message
    (given back when the message ends), and every connection's protocol what
    its read buffer grows to, as it grows, before a frame is complete
    (:class:`~fleetlog.gateway.handshake.HandshakeProtocol`; given back when the
    connection goes): what would go past the budget closes its connection
    (1008) instead.
    """

    __slots__ = ("given", "held", "limit", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes held now, in every unfinished message of the process.
        self.held = 0
        #: Connections closed because the budget was spent.
        self.refused = 0
        #: Bytes given back so far (for deciding when to return memory to the system).
        self.given = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; ``False`` (nothing reserved) past the limit."""
        if self.held + size > self.limit:
            self.refused += 1
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size
        self.given += size


#: The read buffer the gateway asks picows for (``read_buffer_init_size``), and what picows
#: reads into of it at first: it keeps 256 bytes spare for its SIMD parsers.
FIRST_READ_BUFFER: Final = 2048
FIRST_READ_SIZE: Final = FIRST_READ_BUFFER - 256


def grows(size: int, used: int) -> bool:
    """Whether picows doubles its read buffer of ``size`` bytes once a read leaves ``used`` of
    it taken (``WSProtocol._maybe_grow_read_buffer``: over 90% full, or 256 bytes left)."""
    return used * 100 >= size * 91 or size - used <= 256


def read_buffer_for(frame: int) -> int:
    """The read buffer picows keeps for a connection once a frame of ``frame`` bytes came:
    the smallest doubling of its first one that holds the frame (14: the longest header)
    without growing again."""
    size = FIRST_READ_SIZE
    while grows(size, frame + 14):
        size *= 2
    return size


def frame_cap(max_message_bytes: int) -> int:
    """The largest frame picows is let read (its ``max_frame_size``), given the message limit.

    picows closes a connection with 1009 at the header of a frame over its limit, in its
    compiled code, before the gateway hears of it: no ``too_large``, and the replies owed to
    the frames before it (records already queued) never go out.  So the gateway lets it read
    every frame that fits the read buffer a frame at the limit grows, and refuses those over
    the limit itself, after the replies owed: a frame past the limit costs no more memory than
    one at it.  Only a frame past that (1,669,843 bytes for a 1 MiB limit) meets picows' bare 1009.
    """
    size = read_buffer_for(max_message_bytes)
    return max(max_message_bytes, min((91 * size - 1) // 100, size - 257) - 14)


#: The most frames one message may be split into.  Each frame costs a call and
#: a little memory whatever its size: a 200 KiB message in 2-byte frames was
#: 100,000 of them.  4,096 lets a 1 MiB message arrive in 256-byte frames.
MAX_FRAGMENTS = 4096


class Reassembler:
    """Feed data frames with :meth:`feed`; it returns a message once one is complete.

    Fragments are joined as they arrive (one growing buffer, not a list of
    frames), at most ``max_fragments`` per message, and their bytes are taken
    from ``budget`` (shared by the connections of a process) until the
    message ends or :meth:`discard` is called.
    """

    __slots__ = ("_binary", "_budget", "_count", "_fragments", "_max_fragments", "_max_size", "_size")

    def __init__(self, max_size: int, budget: BufferBudget | None = None,
                 max_fragments: int = MAX_FRAGMENTS) -> None:
        self._max_size = max_size
        self._budget = budget
        self._max_fragments = max_fragments
        self._fragments: bytearray | None = None
        self._binary = False
        self._size = 0  # bytes of the message so far (taken from the budget while fragmented)
        self._count = 0

    def feed(self, opcode: int, fin: bool, payload: bytes, reserved: int = 0) -> Message | None:
        """Take one data frame; return the message it completes, if any.

        ``reserved`` is the frame's RSV1-3 bits.  Raises :class:`MessageError`
        for reserved bits set, a continuation out of place, a new message
        inside a fragmented one, a message over the size limit or split into
        too many frames, or the process' budget for unfinished messages spent;
        the caller must then close the connection with its code and feed nothing more.
        """
        if reserved:
            self.discard()
            raise MessageError(CloseCode.PROTOCOL_ERROR, "reserved bits set; no extension was negotiated")
        if opcode == Opcode.CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                raise MessageError(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
            self._count += 1
            if self._count > self._max_fragments:
                self.discard()
                raise MessageError(CloseCode.MESSAGE_TOO_BIG,
                                   f"message split into more than {self._max_fragments} frames")
            if fin:
                self._check_size(len(payload))
                fragments += payload
                message = Message(self._binary, bytes(fragments))
                self.discard()
                return message
            self._hold(len(payload))
            fragments += payload
            return None
        if self._fragments is not None:
            self.discard()
            raise MessageError(CloseCode.PROTOCOL_ERROR, "new message before the last one ended")
        self._size = 0
        self._check_size(len(payload))
        if fin:
            return Message(opcode == Opcode.BINARY, payload)
        self._hold(len(payload))
        self._fragments = bytearray(payload)
        self._binary = opcode == Opcode.BINARY
        self._count = 1
        return None

    def discard(self) -> None:
        """Drop the unfinished message, if any, and give its bytes back to the budget."""
        if self._budget is not None and self._fragments is not None:
            self._budget.give(self._size)
        self._fragments = None
        self._size = 0

    def _check_size(self, size: int) -> None:
        if self._size + size > self._max_size:
            self.discard()
            raise MessageError(
                CloseCode.MESSAGE_TOO_BIG, f"message over the {self._max_size}-byte limit"
            )

    def _hold(self, size: int) -> None:
        """Count ``size`` more bytes of an unfinished message, against both limits."""
        self._check_size(size)
        budget = self._budget
        if budget is not None and not budget.take(size):
            self.discard()
            raise MessageError(CloseCode.POLICY_VIOLATION,
                               "the gateway holds too many unfinished messages; send it again later")
        self._size += size
