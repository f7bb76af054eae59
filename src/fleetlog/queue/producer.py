"""Queue records from many connections with one Redis call per event-loop turn.

A gateway calls :meth:`Producer.submit` from its frame handlers; nothing is
awaited there.  A flusher task wakes once per loop turn, sends every record
submitted since in one atomic Lua call, and then calls each submitter back
with the outcome.  Up to ``max_in_flight`` calls run at once, on separate
connections, so Redis can fsync them together (2 by default: see
``bench.compare`` for what other values do), the second only once enough records
wait for it (``_SECOND_CALL_RECORDS``); a device whose records are in a call waits for it
before its next records go, so one device's records reach the stream in the
order it sent them.  The batch grows by itself when Redis is
slower than the devices.

With ``linger`` (``--ingest-linger``, 2 ms by default), a shard with no call in
flight holds its next call up to that many seconds for the devices its last
call answered, when they are the kind that send again at once: it waits while
fewer records wait than those that waited when the call came back plus the
share of its records that the devices answered lately sent again within
``linger`` of their acks (:class:`_Returns`).  What a call costs Redis is
mostly the call, not its records, and a closed-loop legacy fleet otherwise
settles into two calls of half its devices each (``bench.redis_calls`` shows
the calls' size); a paced fleet, whose devices send on their own clock, shows a
share near 0 and is not held at all, so its acks wait no longer.  The hold is
once per call and ends when the records come; the event loop's timers bound it
from below (uvloop counts milliseconds).

A call of legacy frames only (no dedupe state) runs :data:`~.scripts.INGEST_PLAIN`,
or, while the producer knows the shard stays under its backlog limit, the same
write without Lua (:func:`~.scripts.plain_append`): the backlog it last read
back, plus the records of its calls in flight and of this one, below the limit
means the script's check could not refuse, whatever order Redis runs them in
(a call that could take the shard to its limit waits for the appends in flight).
Every call reads the backlog back.  With one gateway process the limit holds as
exactly as the script's; with several, each may queue what it has in flight
(``max_in_flight`` calls) before it sees what the others queued.

With ``shards`` > 1 the queue is that many streams (``fleetlog:{s3}:records``);
a device always goes to the same one (:func:`fleetlog.keys.shard_of`), and one
call carries one shard's submissions only, with every key it touches declared
(the stream and the devices' dedupe keys, all under the shard's hash tag), so
on a Redis Cluster each call is one slot.  Each shard has its own
``max_in_flight`` calls.

A callback is called with an :class:`IngestResult` once Redis acknowledged the
write (with ``appendfsync always``, once it is on disk), or with the exception
that says why it was not acknowledged: :class:`QueueFull` or
:class:`QueueUnavailable` when nothing was queued, :class:`WriteUnconfirmed`
when the call left and may have been queued (the connection failed after it
was sent, or ``--ack-replicas`` replicas did not confirm it in time) or when an
unexpected failure leaves that unknown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import redis.asyncio
import redis.exceptions

from fleetlog import keys
from fleetlog.errors import (
    FleetlogError,
    NotReplicated,
    QueueClosed,
    QueueFull,
    QueueUnavailable,
    WriteUnconfirmed,
)
from fleetlog.queue import scripts
from fleetlog.queue.connection import REDIS_DOWN, REDIS_NOT_REPLICATED, public_reason
from fleetlog.queue.script_runner import RedisAppend, RedisScript, ScriptArg, ScriptRunner

__all__ = ["Done", "IngestResult", "Producer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What Redis did with one submission (see :func:`fleetlog.protocol.ack_frame`)."""

    duplicate_frame: bool = False
    duplicates: list[int] = field(default_factory=list)
    stored_through: int | None = None
    missing: list[tuple[int, int]] = field(default_factory=list)


_QUEUED: Final = IngestResult()

#: Called once per submission with its result, or the reason nothing was queued.
Done = Callable[[IngestResult | FleetlogError], None]

#: Records per Lua call: big enough to amortise the round trip, small enough
#: that one call does not stall Redis for other clients.
_MAX_PER_CALL: Final = 2000
#: And bytes of records per call (one submission alone may be more): a call, and
#: its one stream entry, of 2,000 records of 1 MiB each would be 2 GiB, past what
#: Redis takes in one argument (512 MiB) and its socket timeout to read.
_MAX_CALL_BYTES: Final = 8 * 1024 * 1024

#: While a shard has a call in flight, a second one goes only once this many
#: records wait for it; fewer wait for the first call to finish and go with
#: what arrives meanwhile (Nagle's rule for calls).  One small call after
#: another cost Redis its per-call overhead each (socket, event loop, script
#: set-up) for a handful of records: one-record legacy frames filled calls of
#: ~25 records this way.  The wait is one call at most, and none when idle.
_SECOND_CALL_RECORDS: Final = 100


@dataclass(slots=True)
class _Submission:
    device_id: str
    shard: int
    #: Its dedupe keys ('' when none); ``args`` holds 0 in their places until the
    #: call numbers the call's keys (the script takes their index in KEYS).
    frames_key: str
    seqs_key: str
    args: list[ScriptArg]
    #: Its records, joined by newlines: they go in the call's one string of records.
    records: bytes
    size: int
    done: Done


#: How much the calls before weigh in :class:`_Returns`' share, per call: about the
#: last five count.
_RETURNS_DECAY: Final = 0.8


class _Returns:
    """The share of answered records whose devices sent again within ``window`` of their ack.

    A closed-loop device sends its next record as soon as it is acked; a paced one
    on its own clock.  Holding a call for the first is worth it (they come within
    the linger, and the call carries them as well: fewer, larger calls); for the
    second it only delays what already waits.  Each device's last answer time is
    kept while it may still count: for the devices answered within the last two
    windows, so the memory is theirs, not the fleet's.
    """

    __slots__ = ("_answered", "_older", "_recent", "_returned", "_since", "_window")

    def __init__(self, window: float) -> None:
        self._window = window
        self._recent: dict[str, float] = {}  # device -> when (time.monotonic()) it was answered
        self._older: dict[str, float] = {}
        self._since = 0.0  # when ``_recent`` was started
        self._answered = 0.0  # records answered, each call's weighing _RETURNS_DECAY less per call
        self._returned = 0.0  # records sent within the window of their device's answer, the same

    def share(self) -> float:
        """What the calls so far show; 1.0 before any (a device is taken to come back until it does not)."""
        return min(1.0, self._returned / self._answered) if self._answered else 1.0

    def answered(self, call: Sequence[_Submission], records: int, now: float) -> None:
        """The devices of ``call`` (``records`` in all) are answered at ``now``."""
        if now - self._since > self._window:
            self._older, self._recent, self._since = self._recent, {}, now
        recent = self._recent
        for submission in call:
            recent[submission.device_id] = now
        self._answered = self._answered * _RETURNS_DECAY + records
        self._returned *= _RETURNS_DECAY

    def sent(self, device_id: str, records: int, now: float) -> None:
        """``device_id`` submits ``records``: they count if it was answered within the window."""
        at = self._recent.pop(device_id, None)
        if at is None:
            at = self._older.pop(device_id, None)
        if at is not None and now - at <= self._window:
            self._returned += records


def _result(raw: Any) -> IngestResult:
    if raw == 0:
        return _QUEUED
    duplicate_frame, duplicates, through, missing = raw
    if not duplicate_frame and not duplicates and through == -1:
        return _QUEUED
    return IngestResult(
        bool(duplicate_frame),
        [int(seq) for seq in duplicates],
        None if through == -1 else int(through),
        [(int(missing[n]), int(missing[n + 1])) for n in range(0, len(missing), 2)],
    )


def _group(plain: list[_Submission]) -> list[ScriptArg]:
    """One group of the ingest script for consecutive submissions without dedupe.

    Their devices go as runs (a device and how many records in a row are its);
    their records are the next ones of the call's string of records.
    """
    if len(plain) == 1:
        return plain[0].args
    devices: list[str] = []
    counts: list[int] = []
    for submission in plain:
        if devices and devices[-1] == submission.device_id:
            counts[-1] += submission.size
        else:
            devices.append(submission.device_id)
            counts.append(submission.size)
    return [0, "", 0, "", sum(counts), "", "\n".join(devices), ",".join(map(str, counts))]


def _outcomes(call: list[_Submission], reply: list[Any]) -> list[IngestResult | FleetlogError]:
    """Each submission's result from the script's reply: one per group (see :func:`_group`)."""
    outcomes: list[IngestResult | FleetlogError] = []
    replies = iter(reply)
    plain = False  # inside a run of plain submissions, whose group answered once
    outcome: IngestResult | FleetlogError = _QUEUED
    for submission in call:
        if submission.frames_key or submission.seqs_key:
            plain = False
            outcomes.append(_result(next(replies)))
            continue
        if not plain:
            plain = True
            outcome = _result(next(replies))
        outcomes.append(outcome)
    return outcomes


#: What keeps :data:`~.scripts.RESET_BACKLOG` from running: Redis down or refusing.
_RESET_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, redis.exceptions.ResponseError)


class Producer:
    """Batches submissions into atomic Lua calls; see the module docstring."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        mode: Literal["stream", "list"],
        stream: str,
        max_backlog: int,
        dedupe_window: float = 86_400,
        max_in_flight: int = 2,
        linger: float = 0.0,
        runner: ScriptRunner | None = None,
        plain_runner: ScriptRunner | None = None,
        append_runner: ScriptRunner | None = None,
        shards: int = 1,
    ) -> None:
        if shards < 1 or (shards > 1 and mode == "list"):
            raise ValueError(f"shards must be 1 with the legacy list, and at least 1; got {shards}")
        #: The ingest script on Redis: all the producer needs of it (a cluster
        #: client passes its own ``runner``).
        self._ingest: ScriptRunner = runner or RedisScript(client, scripts.INGEST)
        #: Its fast path for calls without dedupe state, in stream mode (:data:`~.scripts.INGEST_PLAIN`).
        self._ingest_plain: ScriptRunner | None = None
        #: And its write without the check, for a shard known to be under its limit.
        self._append: ScriptRunner | None = None
        if mode == "stream":
            self._ingest_plain = plain_runner or (RedisScript(client, scripts.INGEST_PLAIN)
                                                  if runner is None else None)
            self._append = append_runner or (RedisAppend(client) if runner is None else None)
        self._client = client
        self._shards = shards
        #: KEYS that start each call: a shard's stream and its backlog counter, or the list.
        self._queue_keys: list[list[ScriptArg]] = [
            [name, keys.queue_backlog(name)]
            for name in (keys.shard_stream(stream, k, shards) for k in range(shards))
        ] if mode == "stream" else [[keys.LEGACY_LIST]]
        self._tags = [keys.shard_tag(k, shards) for k in range(shards)]
        # The backlog limit is the whole queue's: each shard gets its part.
        self._limit = -(-max_backlog // shards)
        self._head = [self._limit, int(dedupe_window * 1000), mode,
                      scripts.MAX_FRAMES, scripts.MAX_SESSIONS, scripts.MAX_RANGES]
        self._waiting: deque[_Submission] = deque()
        self._waiting_records = [0] * shards  # records in ``_waiting`` per shard
        self._busy: Counter[str] = Counter()  # devices with a call in flight
        self._calls: set[asyncio.Task[None]] = set()
        self._in_flight = [0] * shards  # calls in flight per shard
        #: Per shard, the backlog its last call read back (an upper bound: the workers
        #: only lower it), and the records of its calls in flight; ``None``: not known
        #: (no call yet, or the last failed), so the next plain call checks it in Redis.
        self._backlog: list[int | None] = [None] * shards
        self._sending = [0] * shards
        #: Per shard: plain appends in flight, set once none is, and calls waiting for that.
        self._appending = [0] * shards
        self._appends_done = [asyncio.Event() for _ in range(shards)]
        for event in self._appends_done:
            event.set()
        self._holding = [0] * shards
        self._max_in_flight = max_in_flight
        self._linger = linger
        self._returns = _Returns(linger) if linger else None
        #: Per shard: the records its next call waits for (``linger`` at most), and until
        #: when (``loop.time()``) it has waited for them, 0.0 when it is not waiting.
        self._target = [0] * shards
        self._linger_until = [0.0] * shards
        self._linger_timer: asyncio.TimerHandle | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.calls = 0
        #: Records answered :class:`WriteUnconfirmed`: sent, perhaps queued, not acknowledged.
        self.unconfirmed = 0
        #: Why the last call failed to reach Redis (``None`` once one succeeds).
        self.last_error: str | None = None
        #: The same, short and generic (:func:`~fleetlog.queue.connection.public_reason`).
        self.last_problem: str | None = None
        #: When (``time.monotonic()``) a call last failed.
        self.failed_at = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="producer")

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The flusher task, once started; done before :meth:`close` means it died."""
        return [] if self._task is None else [self._task]

    def submit(
        self,
        device_id: str,
        records: Sequence[bytes],
        done: Done,
        *,
        seqs: Sequence[int | None] | None = None,
        session: str = "",
        frame_id: str | None = None,
    ) -> None:
        """Queue one device's records together; ``done`` is called once for all.

        With ``frame_id``, a second submission of the same id within the dedupe
        window queues nothing and reports ``duplicate_frame``.  With ``seqs``,
        records whose seq this session already stored are skipped and reported.

        Raises :class:`QueueClosed` (and never calls ``done``) once :meth:`close`
        was called: nothing would send the records, so the caller must answer
        for them itself.
        """
        if self._closing:
            raise QueueClosed("this gateway is shutting down")
        count = len(records)
        blob = b"\n".join(records)
        if blob.count(b"\n") != count - 1:
            raise ValueError("a record holds a raw newline: records are queued as compact JSON")
        if "\n" in device_id:
            raise ValueError("a device id holds a newline")  # (device_id.py forbids it)
        tracked = seqs is not None and any(seq is not None for seq in seqs)
        shard = keys.shard_of(device_id, self._shards)
        tag = self._tags[shard]
        seqs_text = ""
        if tracked:
            assert seqs is not None
            if len(seqs) != count:
                raise ValueError(f"{len(seqs)} seqs for {count} records")
            first = seqs[0]
            if first is not None and seqs[-1] == first + count - 1 and list(seqs) == list(
                    range(first, first + count)):
                seqs_text = f"{first}-{first + count - 1}"  # the usual case: checked as one range
            else:
                seqs_text = ",".join("-" if seq is None else str(seq) for seq in seqs)
        args: list[ScriptArg] = [0, frame_id or "", 0, session, count, seqs_text, device_id, count]
        self._waiting.append(_Submission(
            device_id, shard, keys.recent_frames(device_id, tag) if frame_id is not None else "",
            keys.stored_seqs(device_id, tag) if tracked else "", args, blob, count, done))
        self._waiting_records[shard] += count
        if self._returns is not None:
            self._returns.sent(device_id, count, time.monotonic())
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._waiting and len(self._calls) < self._max_in_flight * self._shards:
                call = self._take(loop.time())
                if call:
                    self._calls.add(loop.create_task(self._call(call[0].shard, call)))
                    continue
                self._wake_at(loop, min(filter(None, self._linger_until), default=0.0))
            if self._closing and not self._waiting and not self._calls:
                return
            await self._wakeup.wait()
            self._wakeup.clear()

    def _wake_at(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Wake the flusher at ``when`` (when a lingering shard's call is due; 0.0: none)."""
        timer = self._linger_timer
        if timer is not None and (not when or timer.when() != when):
            timer.cancel()
            self._linger_timer = timer = None
        if when and timer is None:
            self._linger_timer = loop.call_at(when, self._linger_over)

    def _linger_over(self) -> None:
        # A loop's timers may fire a little early (uvloop's clock counts milliseconds): the
        # flusher then finds the shard still lingering and sets another.
        self._linger_timer = None
        self._wakeup.set()

    def _lingering(self, shard: int, now: float) -> bool:
        """Whether an idle shard's call waits for more records (see the module docstring)."""
        if self._waiting_records[shard] >= self._target[shard] or self._closing:
            return False
        until = self._linger_until[shard]
        if not until:
            until = self._linger_until[shard] = now + self._linger
        return now < until

    def _take(self, now: float) -> list[_Submission]:
        """Whole submissions of one shard for one call, up to ``_MAX_PER_CALL`` records and
        ``_MAX_CALL_BYTES`` (or one submission, whatever its size).

        The shard is that of the first submission that may go (its shard has
        room for a call, and for a second one only with
        ``_SECOND_CALL_RECORDS`` waiting; an idle one may linger).  A device with a call in flight waits
        for it: calls may complete in any order, and one device's records must
        reach the stream in order.
        """
        taken: list[_Submission] = []
        kept: deque[_Submission] = deque()
        held: set[str] = set()  # devices with a submission kept back in this pass
        busy = self._busy
        in_flight, most, waiting = self._in_flight, self._max_in_flight, self._waiting_records
        linger = self._linger
        shard = -1
        records = nbytes = 0
        for submission in self._waiting:
            device = submission.device_id
            if (device in busy or device in held or (submission.shard != shard and (
                    shard >= 0 or in_flight[submission.shard] >= most or (
                        waiting[submission.shard] < _SECOND_CALL_RECORDS if in_flight[submission.shard]
                        else linger and self._lingering(submission.shard, now))))
                    or (taken and (records + submission.size > _MAX_PER_CALL
                                   or nbytes + len(submission.records) > _MAX_CALL_BYTES))):
                held.add(device)
                kept.append(submission)
                continue
            shard = submission.shard
            taken.append(submission)
            records += submission.size
            nbytes += len(submission.records)
        for submission in taken:
            busy[submission.device_id] += 1
        if taken:
            in_flight[shard] += 1
            waiting[shard] -= records
            self._linger_until[shard] = 0.0
        self._waiting = kept
        return taken

    def _room(self, shard: int, size: int) -> bool:
        """Whether the shard's backlog stays under its limit with ``size`` more records, whatever
        order Redis runs the calls in flight in (``False`` when the backlog is not known)."""
        known = self._backlog[shard]
        return known is not None and known + self._sending[shard] + size < self._limit

    async def _call(self, shard: int, call: list[_Submission]) -> None:
        size = sum(submission.size for submission in call)
        # Sent after an append, a call may still run before it on Redis (another
        # connection): only one that keeps the backlog under the limit may go before
        # the appends in flight on its shard are done, or the appends could queue
        # past the limit.  One waiting keeps further appends from starting meanwhile.
        while self._appending[shard] and not self._room(shard, size):
            self._holding[shard] += 1
            try:
                await self._appends_done[shard].wait()
            finally:
                self._holding[shard] -= 1
        declared: list[ScriptArg] = [*self._queue_keys[shard]]
        at: dict[str, int] = {}  # key -> its index in KEYS (1-based, as Lua counts)

        def index_of(key: str) -> int:
            index = at.get(key)
            if index is None:
                declared.append(key)
                index = at[key] = len(declared)
            return index

        runner = self._ingest
        # Every submission's records, in the call's order, as one string (ARGV[7]): the
        # script writes it as it is unless it leaves a duplicate out.
        records = call[0].records if len(call) == 1 else b"\n".join(
            [submission.records for submission in call])
        args: list[ScriptArg] = [*self._head, records]
        plain: list[_Submission] = []  # consecutive submissions without dedupe: one group
        for submission in call:
            if not submission.frames_key and not submission.seqs_key:
                plain.append(submission)
                continue
            if plain:
                args += _group(plain)
                plain = []
            submission_args = submission.args
            if submission.frames_key:
                submission_args[0] = index_of(submission.frames_key)
            if submission.seqs_key:
                submission_args[2] = index_of(submission.seqs_key)
            args += submission_args
        if plain:
            if len(plain) == len(call) and self._ingest_plain is not None:  # no dedupe at all
                group = _group(plain)
                if self._append is not None and not self._holding[shard] and self._room(shard, size):
                    runner, args = self._append, [group[4], group[6], group[7], records]
                else:
                    runner, args = self._ingest_plain, [self._limit, group[4], group[6], group[7],
                                                        records]
            else:
                args += _group(plain)
        self._sending[shard] += size
        appending = runner is self._append
        if appending:
            self._appending[shard] += 1
            self._appends_done[shard].clear()
        outcomes: list[IngestResult | FleetlogError]
        previous = self.last_error
        try:
            self.calls += 1
            reply = await runner.run(declared, args)
            self.last_error = self.last_problem = None
            if isinstance(reply, int):
                full = QueueFull(f"queue backlog is {reply} records, over its limit")
                outcomes = [full] * len(call)
                self._backlog[shard] = reply
            elif appending:
                outcomes = [_QUEUED] * len(call)
                self._backlog[shard] = await self._appended(declared, size, reply)
            elif runner is self._ingest_plain:
                outcomes = [_QUEUED] * len(call)
                self._backlog[shard] = int(reply[1])
            else:
                outcomes = _outcomes(call, reply)
                known = self._backlog[shard]
                if known is not None:  # what it queued, at most: the next plain call's bound
                    self._backlog[shard] = known + size
        except REDIS_DOWN as exc:
            self.last_error = f"Redis unavailable: {exc}"
            self.last_problem = public_reason(exc)
            outcomes = [QueueUnavailable(self.last_error)] * len(call)
        except NotReplicated as exc:  # --ack-replicas: on the master, not confirmed on enough replicas
            self.last_error = f"Redis replicas did not confirm the write: {exc}"
            self.last_problem = REDIS_NOT_REPLICATED
            self.unconfirmed += size
            outcomes = [exc] * len(call)
        except WriteUnconfirmed as exc:  # sent, then the connection failed: it may have run
            self.last_error = f"Redis did not confirm the write: {exc}"
            self.last_problem = public_reason(exc.__cause__ or exc)
            self.unconfirmed += size
            outcomes = [exc] * len(call)
        except redis.exceptions.ResponseError as exc:  # OOM, MISCONF (disk), READONLY ...
            self.last_error = f"Redis refused the write: {exc}"
            self.last_problem = public_reason(exc)
            outcomes = [QueueUnavailable(self.last_error)] * len(call)
        except Exception as exc:  # any other failure (a bug): still answer every submission
            log.exception("queueing %d submissions failed", len(call))
            self.last_error = f"queueing failed: {type(exc).__name__}: {exc}"
            self.last_problem = public_reason(exc)
            # Whether the call had left is unknown here: "not stored" could be a lie.
            self.unconfirmed += size
            outcomes = [WriteUnconfirmed(self.last_error)] * len(call)
        finally:
            self._sending[shard] -= size
            if appending:
                self._appending[shard] -= 1
                if not self._appending[shard]:
                    self._appends_done[shard].set()
            if self.last_error is not None:
                self._backlog[shard] = None  # whatever happened, the next plain call checks
                self.failed_at = time.monotonic()
                if self.last_error != previous:  # the detail, once per change: not per call
                    log.warning("queueing failed: %s", self.last_error)
            self._in_flight[shard] -= 1
            returns = self._returns
            if returns is not None:
                # What its next call waits for: those waiting now, and the records of the
                # devices answered now that are likely to come back within the linger.
                self._target[shard] = self._waiting_records[shard] + round(returns.share() * size)
                returns.answered(call, size, time.monotonic())
            for submission in call:
                left = self._busy[submission.device_id] - 1
                if left:
                    self._busy[submission.device_id] = left
                else:
                    del self._busy[submission.device_id]
            task = asyncio.current_task()
            assert task is not None
            self._calls.discard(task)  # before the wake-up, so the flusher sees room
            self._wakeup.set()
        for submission, outcome in zip(call, outcomes, strict=True):
            try:
                submission.done(outcome)
            except Exception:  # one connection's bug must not stall the others
                log.exception("producer callback failed")

    async def _appended(self, declared: list[ScriptArg], size: int, reply: list[Any]) -> int | None:
        """The backlog after a :func:`~.scripts.plain_append`, from ``EXEC``'s reply.

        Raises Redis's error if the ``XADD`` failed (nothing was written).  An
        empty stream's counter must have been its records: one left behind by a
        stream deleted under it is set right (:data:`~.scripts.RESET_BACKLOG`).
        """
        length, entry, counter = reply
        if isinstance(entry, Exception):
            raise entry
        if isinstance(length, Exception) or isinstance(counter, Exception):  # a key of another type
            log.warning("the backlog counter of %s could not be read or updated: %s", declared[0],
                        length if isinstance(length, Exception) else counter)
            return None  # the records are queued; the next call checks in Redis
        if length:
            return max(int(counter), int(length) + 1)
        if int(counter) == size:
            return size
        try:
            if await self._client.eval(scripts.RESET_BACKLOG, 2, *declared[:2], counter, size):
                return size
        except _RESET_FAILED as exc:
            log.warning("could not set the backlog counter of %s right (%s): it counts %d records "
                        "more than the stream holds until the stream is empty", declared[0], exc,
                        int(counter) - size)
        return int(counter)

    async def close(self) -> None:
        """Flush what is pending (callbacks included), then stop the flusher.

        From the first call on, :meth:`submit` raises :class:`QueueClosed`.
        """
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._linger_timer is not None:
            self._linger_timer.cancel()
