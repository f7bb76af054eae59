"""One device connection's rules, with no I/O: events in, actions out.

:class:`Connection` is the gateway's protocol core, in the manner of
websockets' ``ServerProtocol``: it never touches a socket, a timer, Redis or
the clock.  The picows glue in :mod:`.server` feeds it events

* :meth:`~Connection.receive_frame`: a WebSocket data frame arrived;
* :meth:`~Connection.receive_outcome`: the producer answered a submission;
* :meth:`~Connection.delay_elapsed`: a rate-limit delay it asked for is over;
* :meth:`~Connection.writing_blocked` / :meth:`~Connection.writing_unblocked`:
  the device stopped / started reading our replies again;
* :meth:`~Connection.stop_reading`, :meth:`~Connection.close`,
  :meth:`~Connection.connection_lost`: the gateway's decisions and the end;

and after each one **must** call :meth:`~Connection.actions_to_take` and
perform what it returns, in order:

* ``bytes``: write them to the socket as they are (ready-made server frames);
* :class:`Submission`: ``Producer.submit`` its records, and hand the outcome
  back with :meth:`~Connection.receive_outcome` (the submission is the token);
* :class:`Link` / :class:`Unlink`: tell the link registry;
* :class:`Refusal`: count the refusal in the link registry;
* :class:`CommandAnswer`: hand a v2 device's ``command_result`` to whoever
  sent the command (the device gets no reply to it);
* :class:`SetTimer`: call :meth:`~Connection.delay_elapsed` in ``delay`` seconds;
* ``Reading.PAUSE`` / ``Reading.RESUME``: pause / resume reading from the socket;
* :class:`Close`: send a close frame with that code and reason, and keep
  reading until the device answers it.

The rules it keeps (docs/CONTRACT.md): replies leave in the order the frames came,
whatever order Redis answers in, and each frame's replies in one write; the
legacy pair ``server receive a message!`` + ``log_upload_response`` and the v2
ack only once Redis acknowledged the records; an authenticated connection
writes only as its own device (``forbidden``); with ``--auth none`` a frame's
``deviceId`` claims the connection for that device.  Rate limits slow a
device before they refuse it: while a delay runs, later messages wait in the
inbox, in order, and reading pauses.  Reading also pauses while too many
frames await Redis or the device does not read its replies, so one device
cannot make the gateway hold unbounded replies for it.

Per admitted frame it allocates one object of its own (a :class:`Submission`
is at once the reply slot, the producer's arguments and the token its outcome
comes back with), creates no closure, and every class has ``__slots__``: the
gateway handles tens of thousands of frames a second on one core.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from fleetlog import protocol
from fleetlog.errors import ErrorCode, FleetlogError, FrameError, QueueFull, WriteUnconfirmed
from fleetlog.gateway.auth import Identity
from fleetlog.gateway.limits import DeviceLimiter
from fleetlog.gateway.messages import BufferBudget, CloseCode, Message, MessageError, Reassembler
from fleetlog.queue.producer import IngestResult

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_IN_FLIGHT_BYTES",
    "RECEIVED",
    "RECEIVED_AND_STORED",
    "Action",
    "Close",
    "CommandAnswer",
    "Connection",
    "Link",
    "Reading",
    "Refusal",
    "SetTimer",
    "Submission",
    "Unlink",
]

#: The legacy protocol's first reply to every frame, as a server text frame.
RECEIVED: Final = protocol.server_text_frame(protocol.SERVER_RECEIVED)
#: Both legacy replies to a stored record, written together once Redis acked it.
RECEIVED_AND_STORED: Final = RECEIVED + protocol.server_text_frame(protocol.LOG_UPLOAD_RESPONSE)

#: Frames a device may have awaiting Redis before the gateway stops reading from it;
#: reading resumes once fewer than half are left.
MAX_IN_FLIGHT: Final = 256
#: The same for the bytes of those frames: 256 frames of 1 MiB would hold 256 MiB
#: of one device's records in the gateway while Redis is slow.
MAX_IN_FLIGHT_BYTES: Final = 8 * 1024 * 1024

#: The device a legacy frame's record belongs to when no frame has named one yet
#: (``--auth none``, as the original stored it).
UNKNOWN_DEVICE: Final = "unknown"
#: With ``--auth none``, a connection that keeps sending writes its link again this
#: often (seconds), so presence follows the device's latest frame across nodes too.
RELINK_EVERY: Final = 5.0


class Submission:
    """One admitted frame's records for ``Producer.submit``, and the slot for its reply.

    The caller passes ``device_id``, ``records`` and, for a v2 frame,
    ``seqs``, ``session`` and ``frame_id`` to the producer, and hands the
    outcome back with :meth:`Connection.receive_outcome` together with this
    object.  ``wire`` is the frame's reply once the outcome is known.
    """

    __slots__ = ("device_id", "frame_id", "nbytes", "queued_at", "records", "seqs", "session", "wire")

    def __init__(self, device_id: str, records: list[bytes], frame_id: str | None = None,
                 seqs: list[int | None] | None = None, session: str = "", nbytes: int = 0) -> None:
        self.device_id = device_id
        #: The size of its frame (bytes), held by the gateway until the reply goes.
        self.nbytes = nbytes
        self.records = records
        self.frame_id = frame_id  # None: a legacy frame
        self.seqs = seqs
        self.session = session
        self.wire: bytes | None = None
        #: When the caller handed it to the producer (its clock; for the ack latency metric).
        self.queued_at = 0.0

    def __repr__(self) -> str:
        return f"Submission({self.device_id!r}, {len(self.records)} records, id={self.frame_id!r})"


@dataclass(frozen=True, slots=True)
class Link:
    """This connection now speaks for ``device_id``: record it in the link registry."""

    device_id: str


@dataclass(frozen=True, slots=True)
class Unlink:
    """This connection no longer speaks for ``device_id``."""

    device_id: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A frame was refused with ``reason``: count it for ``device_id`` (``None``: unknown)."""

    device_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """``device_id`` answered command ``command_id`` with ``payload`` (its whole JSON frame)."""

    device_id: str
    command_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call :meth:`Connection.delay_elapsed` in ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Close:
    """Send a close frame; nothing more is written, data frames read from now on are dropped."""

    code: int
    reason: str


class Reading(Enum):
    """Stop or start reading from the socket (the kernel's buffers then push back on the device)."""

    PAUSE = "pause"
    RESUME = "resume"


#: What :meth:`Connection.actions_to_take` returns; ``bytes`` are data to write.
Action = bytes | Submission | Link | Unlink | Refusal | SetTimer | Close | Reading | CommandAnswer

#: Returns the rate limiter of a device, given the time; limits are per device,
#: shared by all its connections, so the gateway keeps them.
LimiterFor = Callable[[str, float], DeviceLimiter]

#: Open; closing once the replies already owed are out (data frames are dropped);
#: close frame sent (nothing more is written); socket gone.
_OPEN, _DRAINING, _CLOSING, _CLOSED = range(4)


def error_reply(code: ErrorCode, message: str, frame_id: str | None = None, **extra: Any) -> bytes:
    """An error frame as a server text frame; ``frame_id`` goes in ``id`` (v2)."""
    if frame_id is not None:
        extra["id"] = frame_id
    return protocol.server_text_frame(protocol.error_frame(code, message, **extra))


def queue_error_code(exc: FleetlogError) -> ErrorCode:
    """The wire code of a producer's refusal.

    ``busy`` and ``unavailable`` promise that nothing was stored; ``unconfirmed``
    says the records may be (the call left, its outcome is unknown).
    """
    if isinstance(exc, WriteUnconfirmed):
        return ErrorCode.UNCONFIRMED
    return ErrorCode.BUSY if isinstance(exc, QueueFull) else ErrorCode.UNAVAILABLE


def _queue_error(exc: FleetlogError, frame_id: str | None) -> bytes:
    code = queue_error_code(exc)
    if code is ErrorCode.UNCONFIRMED:
        return error_reply(code, f"{exc}; may be stored, send it again "
                           "(a v2 frame resent with the same id is stored once)", frame_id)
    return error_reply(code, f"{exc}; not stored, send it again later", frame_id)


class Connection:
    """One device connection's state and rules; see the module docstring.

    ``identity`` is who the handshake authenticated (``None`` with
    ``--auth none``).  ``limiter_for`` gives a device's rate limiter.
    """

    __slots__ = (
        "_actions", "_close", "_delayed", "_in_flight_bytes", "_inbox", "_limiter_for", "_linked_at",
        "_max_records", "_paused", "_reassembler", "_records_name_device", "_replies", "_state",
        "_stopped", "_write_blocked", "device_id", "identity", "last_activity", "linked", "v2",
    )

    def __init__(self, identity: Identity | None, *, max_message_bytes: int,
                 max_records_per_frame: int, limiter_for: LimiterFor, now: float,
                 budget: BufferBudget | None = None, records_name_device: bool = False) -> None:
        self.identity = identity
        #: The device this connection speaks for so far (``None``: none named yet).
        self.device_id: str | None = identity.device_id if identity else None
        #: When the device last sent a data frame (the caller's clock).
        self.last_activity = now
        #: Whether the device speaks v2: authenticated at the handshake, or sent a v2
        #: frame.  Decides how a command reaches it (:func:`~fleetlog.protocol.command_frame`).
        self.v2 = identity is not None
        #: Whether this connection holds its device's link, as far as it knows (``--auth
        #: none``: the gateway turns it off when another connection of the device took it).
        self.linked = False
        self._linked_at = now
        self._limiter_for = limiter_for
        self._max_records = max_records_per_frame
        #: ``--queue list`` with authenticated devices: each record must name the
        #: connection's device (:func:`~fleetlog.protocol.owned_record`).
        self._records_name_device = records_name_device and identity is not None
        self._reassembler = Reassembler(max_message_bytes, budget)
        self._actions: list[Action] = []
        # Replies in frame order: bytes are known, a Submission's wait for Redis.
        # A list, not a deque: an empty list holds no block (an empty deque holds
        # 760 bytes), and a flush drops its ready head in one slice.
        self._replies: list[bytes | Submission] = []
        self._in_flight_bytes = 0  # of the Submissions in _replies
        # While a rate-limit delay runs: the delayed frame's Submission first,
        # then every message that came after it, handled once the delay ends.
        # Only while a delay runs (``None`` otherwise): most devices are never slowed.
        self._inbox: deque[Submission | Message] | None = None
        self._delayed = False  # a rate-limit delay is running
        self._paused = False  # we asked the caller to stop reading
        self._stopped = False  # reading stopped for good: the gateway is shutting down
        self._write_blocked = False  # the device is not reading our replies
        self._state = _OPEN
        self._close: Close | None = None  # the close waiting for the replies owed (draining)

    # -- output ----------------------------------------------------------------

    def actions_to_take(self) -> list[Action]:
        """What to do now, in order; the caller must perform all of it before the next event.

        The list is the caller's: an event fed while performing it (a write
        that blocks, a submission refused at once) starts a new list.
        """
        actions = self._actions
        if actions:
            self._actions = []
        return actions

    @property
    def in_flight(self) -> int:
        """Frames read whose replies have not been handed out yet (awaiting Redis or order)."""
        return len(self._replies)

    # -- events ----------------------------------------------------------------

    def receive_frame(self, opcode: int, fin: bool, payload: bytes, reserved: int, now: float) -> None:
        """A data frame (text, binary or continuation) arrived; ``reserved`` is its RSV bits.

        Frames that break the protocol or make a message too big close the
        connection (a too-big message is answered ``too_large`` first).
        After a close, data frames are dropped unread.
        """
        if self._state != _OPEN:
            return
        self.last_activity = now
        try:
            message = self._reassembler.feed(opcode, fin, payload, reserved)
        except MessageError as exc:
            if exc.code == CloseCode.MESSAGE_TOO_BIG:  # after the replies owed to earlier frames
                self._actions.append(Refusal(self.device_id, ErrorCode.TOO_LARGE))
                self._reply(error_reply(ErrorCode.TOO_LARGE, exc.reason))
            self.close(exc.code, exc.reason)
            return
        if message is None:
            return
        if self._delayed:
            assert self._inbox is not None  # made when the delay started
            self._inbox.append(message)  # its turn comes after the delayed frame's
        else:
            self._receive_message(message, now)

    def send_command(self, wire: bytes) -> bool:
        """Write a command frame (a ready server frame) now; ``False`` if the connection is closing.

        Commands are not replies: they go out at once, whatever replies are awaited.
        """
        if self._state != _OPEN:
            return False
        self._actions.append(wire)
        return True

    def receive_outcome(self, submission: Submission, outcome: IngestResult | FleetlogError) -> None:
        """The producer's outcome for ``submission`` (also :class:`~fleetlog.errors.QueueClosed`
        when ``submit`` raised it): its reply, and every ready reply after it, go out."""
        if isinstance(outcome, FleetlogError):
            wire = _queue_error(outcome, submission.frame_id)
            submission.wire = wire if submission.frame_id is not None else RECEIVED + wire
        elif submission.frame_id is None:
            submission.wire = RECEIVED_AND_STORED
        else:
            stored = 0 if outcome.duplicate_frame else len(submission.records) - len(outcome.duplicates)
            submission.wire = protocol.server_text_frame(protocol.ack_frame(
                submission.frame_id, stored=stored, duplicates=outcome.duplicates,
                stored_through=outcome.stored_through, missing=outcome.missing,
                duplicate_frame=outcome.duplicate_frame,
            ))
        self._flush_replies()

    def delay_elapsed(self, now: float) -> None:
        """The :class:`SetTimer` delay is over: handle the inbox until it is empty or delayed again."""
        self._delayed = False
        inbox = self._inbox
        while inbox and not self._delayed:
            item = inbox.popleft()
            if isinstance(item, Submission):
                self._submit(item)
            else:
                self._receive_message(item, now)
        if not inbox:
            self._inbox = None
        self._maybe_resume_reading()

    def writing_blocked(self) -> None:
        """The socket's write buffer is full: read nothing more until it drains."""
        self._write_blocked = True
        self._pause_reading()

    def writing_unblocked(self) -> None:
        """The socket's write buffer drained."""
        self._write_blocked = False
        self._maybe_resume_reading()

    def stop_reading(self) -> None:
        """Read nothing more from the device (shutdown); replies still go out."""
        self._stopped = True
        self._pause_reading()

    def close(self, code: int, reason: str) -> None:
        """Close with ``code``: a :class:`Close` action once every reply owed is out.

        Frames read before the close were answered in order, so their replies
        (acks of records Redis is still confirming) go first, then the close
        frame: a device closed for a bad frame still learns that the frames
        before it were stored.  Frames waiting out a rate-limit delay were not
        handed to the producer: they are dropped unanswered (not stored).  The
        caller must keep reading until the device answers the close frame
        (hanging up with its data unread makes the kernel send a reset, which
        can destroy the close frame), so a paused reader is resumed; data
        frames read from now on are dropped, and once the close is sent nothing
        more is written.
        """
        if self._state != _OPEN:
            return
        self._reassembler.discard()  # frames read from now on are dropped: so is what is held
        self._inbox = None
        self._delayed = False
        if self._replies:
            self._state = _DRAINING
            self._close = Close(code, reason)
        else:
            self._state = _CLOSING
            self._actions.append(Close(code, reason))
        if self._paused:
            self._paused = False
            self._actions.append(Reading.RESUME)

    def connection_lost(self) -> None:
        """The socket is gone: nothing is written from now on.

        Frames already admitted (a delayed frame and its inbox too) still go to
        the producer: they were read, and the device will send again what it
        saw no ack for.
        """
        self._state = _CLOSED
        self._reassembler.discard()  # what it held goes back to the budget (the read buffer: the protocol's)

    # -- rules -----------------------------------------------------------------

    def _receive_message(self, message: Message, now: float) -> None:
        if message.binary:
            self._refuse(ErrorCode.BAD_FRAME, "binary frames are not accepted", legacy=True)
            return
        payload = message.payload
        try:
            frame = protocol.parse_frame(payload, self._max_records)
        except FrameError as exc:
            self._refuse(exc.code, exc.message, exc.frame_id, legacy=not exc.v2)
            return
        if isinstance(frame, protocol.CommandResult):
            self.v2 = True
            device_id = self.device_id
            if device_id is not None:
                self._actions.append(CommandAnswer(device_id, frame.id, frame.payload))
            return
        if isinstance(frame, protocol.LegacyFrame):
            frame_id = None
            records = [frame.record] if frame.record is not None else []
        else:
            self.v2 = True
            frame_id, records = frame.id, frame.records
        device_id = self._device_for(frame.device_id, frame_id)
        if device_id is None:
            return
        if not records:  # a legacy frame that only names its device
            self._reply(RECEIVED)
            return
        if self._records_name_device:
            try:
                records = [protocol.owned_record(record, device_id) for record in records]
            except FrameError as exc:
                self._refuse(exc.code, exc.message, frame_id, legacy=frame_id is None)
                return
        decision = self._limiter_for(device_id, now).admit(len(records), len(payload), now)
        if decision.refused:
            self._refuse(ErrorCode.RATE_LIMITED, "over this device's rate limit", frame_id,
                         legacy=frame_id is None, retry_after_ms=int(decision.retry_after * 1000) + 1)
            return
        if frame_id is None:
            submission = Submission(device_id, records, nbytes=len(payload))
        else:
            assert isinstance(frame, protocol.LogBatch)
            submission = Submission(device_id, records, frame_id, frame.seqs, frame.session,
                                    len(payload))
        if decision.delay:
            # Slowed, not refused: this frame and every later message wait.
            self._delayed = True
            inbox = self._inbox
            if inbox is None:
                inbox = self._inbox = deque()
            inbox.appendleft(submission)
            self._pause_reading()
            self._actions.append(SetTimer(decision.delay))
        else:
            self._submit(submission)

    def _submit(self, submission: Submission) -> None:
        """Hand an admitted frame to the producer (the caller); its reply waits its turn."""
        replies = self._replies
        replies.append(submission)
        self._actions.append(submission)
        held = self._in_flight_bytes = self._in_flight_bytes + submission.nbytes
        if held >= MAX_IN_FLIGHT_BYTES or len(replies) >= MAX_IN_FLIGHT:
            self._pause_reading()

    def _device_for(self, claimed: str | None, frame_id: str | None) -> str | None:
        """The device a frame is for, claiming the connection on first sight; ``None`` if refused.

        ``frame_id`` is ``None`` for a legacy frame.
        """
        identity = self.identity
        if identity is not None:
            if claimed is not None and claimed != identity.device_id:
                self._refuse(ErrorCode.FORBIDDEN, "this connection is authenticated as another device",
                             frame_id, legacy=frame_id is None)
                return None
            return identity.device_id
        # --auth none: the link follows the device's latest frame.  A connection that
        # claims another id moves its link; one whose link another connection took
        # (``linked`` turned off by the gateway) takes it back with its next frame, and
        # every RELINK_EVERY seconds anyway (the take-over may have been on another node).
        if claimed is not None and claimed != self.device_id:
            if self.device_id is not None:
                self._actions.append(Unlink(self.device_id))
            self.device_id = claimed
            self._link()
        elif self.device_id is not None and (
                not self.linked or self.last_activity - self._linked_at >= RELINK_EVERY):
            self._link()
        if self.device_id is None:
            if frame_id is not None:
                self._refuse(ErrorCode.BAD_FRAME, "a log frame needs deviceId when auth is none",
                             frame_id)
                return None
            return UNKNOWN_DEVICE
        return self.device_id

    def _link(self) -> None:
        assert self.device_id is not None
        self.linked = True
        self._linked_at = self.last_activity
        self._actions.append(Link(self.device_id))

    def _refuse(self, code: ErrorCode, message: str, frame_id: str | None = None, *,
                legacy: bool = False, **extra: Any) -> None:
        """Answer a frame with an error (after the legacy ``server receive`` when ``legacy``)."""
        self._actions.append(Refusal(self.device_id, code))
        wire = error_reply(code, message, frame_id, **extra)
        self._reply(RECEIVED + wire if legacy else wire)

    def _reply(self, wire: bytes) -> None:
        """A reply known now: out at once, unless replies to earlier frames are still awaited."""
        if self._replies:
            self._replies.append(wire)
        else:
            self._send(wire)

    def _flush_replies(self) -> None:
        """Write every reply that is ready in order, as one write."""
        replies = self._replies
        first: bytes | None = None
        more: list[bytes] | None = None
        ready = freed = 0
        for head in replies:
            if isinstance(head, bytes):
                wire = head
            elif head.wire is not None:
                wire = head.wire
                freed += head.nbytes
            else:
                break
            ready += 1
            if first is None:
                first = wire
            elif more is None:
                more = [first, wire]
            else:
                more.append(wire)
        if ready:
            del replies[:ready]  # all of them: the list frees its storage
            self._in_flight_bytes -= freed
        if first is not None:
            self._send(first if more is None else b"".join(more))
        if self._state == _DRAINING and not replies:
            assert self._close is not None  # set when draining started
            self._state = _CLOSING
            self._actions.append(self._close)
        if self._paused:
            self._maybe_resume_reading()

    def _send(self, wire: bytes) -> None:
        if self._state <= _DRAINING:
            self._actions.append(wire)

    def _pause_reading(self) -> None:
        if not self._paused and self._state == _OPEN:
            self._paused = True
            self._actions.append(Reading.PAUSE)

    def _maybe_resume_reading(self) -> None:
        """Read again once nothing holds us: replies drained, no delay, device reading."""
        if (self._paused and not self._write_blocked and not self._delayed and not self._stopped
                and len(self._replies) < MAX_IN_FLIGHT // 2
                and self._in_flight_bytes < MAX_IN_FLIGHT_BYTES // 2 and self._state == _OPEN):
            self._paused = False
            self._actions.append(Reading.RESUME)
