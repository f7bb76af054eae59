"""``fleetlog simulate``: a fleet of legacy devices, a load generator, a reference client.

Each simulated device holds one WebSocket connection and sends ``--messages``
records, each frame after the previous one was answered (as real firmware
does): one record per legacy frame, or ``--batch`` records per v2 ``log``
frame, each with its ``seq``.  It behaves as a well-made device should: ``log_upload_response`` is
the only proof a record is stored, so ``busy``/``unavailable``/``unconfirmed`` errors and lost
connections make it send the same record again, after a jittered exponential
backoff.  The summary says what was sent, acked and refused, the rate, and the
ack latency percentiles.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import orjson
from picows import WSError, WSFrame, WSHandshakeError, WSListener, WSMsgType, WSTransport, ws_connect

from fleetlog import protocol
from fleetlog.backoff import Backoff
from fleetlog.errors import CannotConnect

__all__ = ["CannotConnect", "SimulationSummary", "connect_with_backoff", "device_ids", "simulate"]

#: Refusals that may pass if the same frame is sent again.  ``unconfirmed`` too:
#: the records may be stored already, and a v2 resend (same frame id) is stored once.
_RETRYABLE = {"busy", "unavailable", "unconfirmed", "rate_limited"}

#: How long the first connection may be refused before the run gives up: a
#: gateway that is starting listens within seconds; a wrong port never does.
_FIRST_CONNECT_S = 10.0
#: A device's first retry comes within 50 ms (a gateway's accept queue empties
#: that fast); later ones wait up to 5 s, so a fleet does not hammer a gateway that is down.
_INITIAL_BACKOFF = 0.05
_MAX_BACKOFF = 5.0
#: How long a frame may go unanswered before its device gives up the connection and
#: sends the frame again on a new one.
_ANSWER_TIMEOUT = 30.0


def _masked(url: str) -> str:
    """``url`` fit to print: a ``token`` in its query shown as ``***``."""
    return re.sub(r"([?&]token=)[^&#]*", r"\1***", url)


def _permanent(exc: BaseException) -> str | None:
    """Why ``exc`` will happen again on every attempt, or ``None`` if it may pass.

    A bad URL, a host that does not resolve and a handshake refused with a 4xx
    (401 bad token, 404 wrong path) do not go away by retrying; a refused or
    reset connection, a timeout or a 503 (a gateway restarting, Redis down) may.
    """
    if isinstance(exc, WSHandshakeError) and exc.response is not None:
        status = int(exc.response.status)
        if 400 <= status < 500 and status not in (408, 429):
            body = (exc.raw_body or exc.response.body or b"").decode(errors="replace").strip()
            return f"handshake refused with HTTP {status}" + (f": {body[:200]}" if body else "")
        return None
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc}"
    if isinstance(exc, WSError | ValueError):  # WSInvalidURL and other malformed input
        return str(exc) or type(exc).__name__
    return None


class _ConnectionLost(Exception):
    pass


class _NoAnswer(Exception):
    """The frame in flight went unanswered for the answer timeout."""


@dataclass
class SimulationSummary:
    devices: int
    messages: int
    sent: int = 0
    acked: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    #: Per device, the number of leading records acked (records 0..n-1).
    acked_through: dict[str, int] = field(default_factory=dict)
    url: str = ""
    #: Why the run could not do its work (cannot connect), if so.
    failure: str | None = None

    @property
    def rate(self) -> float:
        return self.acked / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        """Ack latency percentile in milliseconds."""
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0] * 1000
        return statistics.quantiles(self.latencies, n=1000, method="inclusive")[
            min(998, max(0, round(q * 1000) - 1))
        ] * 1000

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "failure": self.failure,
            "devices": self.devices,
            "messages_per_device": self.messages,
            "sent": self.sent,
            "acked": self.acked,
            "errors": dict(self.errors),
            "reconnects": self.reconnects,
            "elapsed_s": round(self.elapsed, 3),
            "records_per_s": round(self.rate, 1),
            "ack_p50_ms": round(self.percentile(0.50), 3),
            "ack_p99_ms": round(self.percentile(0.99), 3),
        }


class _Device(WSListener):
    """Turns the gateway's replies into the outcome of the frame in flight."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[str | None] | None = None
        self.closed = False
        #: When (``time.monotonic()``) the frame in flight is overdue; see :class:`_Watchdog`.
        self.answer_by = math.inf

    def overdue(self, now: float, out_of_time: bool) -> None:
        """Fail the frame in flight if its answer is past due (the device sends it again on a
        new connection), or if the run is out of time (the device stops)."""
        if out_of_time:
            self._resolve(TimeoutError("simulation ran out of time"))
        elif now > self.answer_by:
            self._resolve(_NoAnswer())

    def _resolve(self, outcome: str | BaseException | None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        if payload == protocol.LOG_UPLOAD_RESPONSE:
            self._resolve(None)
        elif payload != protocol.SERVER_RECEIVED:
            try:
                reply = orjson.loads(payload)
                self._resolve(None if reply.get("type") == "ack" else str(reply.get("code", "?")))
            except (orjson.JSONDecodeError, AttributeError):
                self._resolve("unexpected_reply")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self._resolve(_ConnectionLost())


def _record(device_id: str, index: int, pad: int) -> dict[str, Any]:
    data: dict[str, Any] = {
        "seq": index,
        "ts": int(time.time() * 1000),
        "level": "info",
        "msg": f"simulated record {index} from {device_id}",
    }
    if pad:
        data["pad"] = "x" * pad
    return data


def _frame(device_id: str, index: int, count: int, pad: int, session: str = "") -> bytes:
    """A legacy frame (``count`` 0) or a v2 log frame of ``count`` records from ``index``.

    A v2 frame belongs to the run's ``session``: its id and its seqs are new in each
    run, as a rebooted device's are (ids and seqs are remembered per device for a day:
    a second run reusing the first's would be acked as duplicates and store nothing).
    """
    if count == 0:
        return orjson.dumps({"deviceId": device_id, "type": 4, "data": _record(device_id, index, pad)})
    records = [_record(device_id, index + n, pad) for n in range(count)]
    return orjson.dumps({"type": "log", "id": f"{session}-{index}", "session": session,
                         "deviceId": device_id, "records": records})


class _Watchdog:
    """Fails the frames that went unanswered too long, and every frame in flight once the
    run is out of time: one sweep a second over the connected devices, where
    ``asyncio.wait_for`` on each frame cost the load generator a task, a timer and a
    callback per frame."""

    def __init__(self, timeout: float, deadline: float) -> None:
        self.timeout = timeout
        self.deadline = deadline  # time.monotonic()
        self.devices: set[_Device] = set()

    async def run(self) -> None:
        interval = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            out_of_time = now > self.deadline
            for device in self.devices:
                device.overdue(now, out_of_time)


L = TypeVar("L", bound=WSListener)


async def connect_with_backoff(
    listener: type[L], url: str, deadline: float, on_retry: Callable[[], None] | None = None,
    cap: float = 5.0,
) -> tuple[WSTransport, L]:
    """Connect as a well-made device does: retry with jittered exponential backoff.

    A thousand devices connecting at once overflow a server's accept queue; the
    ones refused must come back later, not all at the same instant.  Raises
    :class:`CannotConnect` at once for a failure that will not pass (see
    :func:`_permanent`), or once ``deadline`` (monotonic) would pass.
    """
    backoff = Backoff(initial=_INITIAL_BACKOFF, cap=cap)
    while True:
        try:
            transport, connected = await ws_connect(listener, url, websocket_handshake_timeout=10)
            assert isinstance(connected, listener)
            return transport, connected
        except Exception as exc:  # refused, reset, handshake refused or timed out
            reason = _permanent(exc)
            if reason is not None:
                raise CannotConnect(reason) from exc
            delay = backoff.next_delay()
            if time.monotonic() + delay > deadline:
                raise CannotConnect(f"{exc or type(exc).__name__}") from exc
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(delay)


async def _run_device(
    url: str,
    device_id: str,
    summary: SimulationSummary,
    interval: float,
    pad: int,
    batch: int,
    deadline: float,
    progress: Any,
    session: str,
    watchdog: _Watchdog,
) -> None:
    index = 0
    next_send = time.monotonic()
    backoff = Backoff(initial=_INITIAL_BACKOFF, cap=_MAX_BACKOFF)
    while index < summary.messages:
        transport, device = await connect_with_backoff(
            _Device, url, deadline, lambda: summary.errors.update(["connect_failed"]))
        watchdog.devices.add(device)
        try:
            while index < summary.messages:
                if interval:
                    next_send += interval
                    pause = next_send - time.monotonic()
                    if pause > 0:
                        await asyncio.sleep(pause)
                if time.monotonic() > deadline:
                    raise TimeoutError("simulation ran out of time")
                if device.closed:  # closed between frames (a gateway going away)
                    raise _ConnectionLost()
                device.waiter = asyncio.get_running_loop().create_future()
                count = min(batch, summary.messages - index) if batch else 0
                started = time.perf_counter()
                device.answer_by = time.monotonic() + watchdog.timeout
                transport.send(WSMsgType.TEXT, _frame(device_id, index, count, pad, session))
                summary.sent += count or 1
                outcome = await device.waiter
                if outcome is None:
                    summary.latencies.append(time.perf_counter() - started)
                    summary.acked += count or 1
                    index += count or 1
                    summary.acked_through[device_id] = index
                    backoff.reset()
                    if progress is not None:
                        progress(count or 1)
                    continue
                summary.errors[outcome] += 1
                if outcome in _RETRYABLE:
                    await backoff.sleep()
                else:
                    index += count or 1  # refused for good: sending it again would not help
        except (_NoAnswer, _ConnectionLost):  # not TimeoutError: out of time, the device stops
            summary.reconnects += 1
            await backoff.sleep()
        finally:
            watchdog.devices.discard(device)
            transport.disconnect()


def device_ids(prefix: str, devices: int) -> list[str]:
    width = max(4, len(str(devices)))
    return [f"{prefix}{n:0{width}d}" for n in range(1, devices + 1)]


async def simulate(
    url: str,
    devices: int,
    messages: int,
    *,
    rate: float = 0.0,
    prefix: str = "sim-",
    pad: int = 0,
    batch: int = 0,
    tokens: dict[str, str] | None = None,
    timeout: float = 600.0,
    progress: Any = None,
    answer_timeout: float = _ANSWER_TIMEOUT,
) -> SimulationSummary:
    """Run the fleet; ``rate`` is total records/s (0: as fast as acks come back).

    ``batch`` 0 speaks the legacy protocol, N > 0 sends v2 frames of N records.
    ``tokens`` maps device ids to their tokens (sent as ``?token=``).
    """
    summary = SimulationSummary(devices, messages, url=_masked(url))
    interval = devices * max(batch, 1) / rate if rate > 0 else 0.0
    deadline = time.monotonic() + timeout
    started = time.perf_counter()
    ids = device_ids(prefix, devices)
    session = f"sim-{secrets.token_hex(6)}"  # this run's: see _frame

    def device_url(device_id: str) -> str:
        if not tokens:
            return url
        return f"{url}{'&' if '?' in url else '?'}token={quote(tokens[device_id])}"

    # One connection first: a wrong URL, port or token fails the run in seconds
    # instead of holding a stuck progress bar until the timeout.
    try:
        transport, _ = await connect_with_backoff(
            _Device, device_url(ids[0]), min(deadline, time.monotonic() + _FIRST_CONNECT_S))
        transport.disconnect()
    except CannotConnect as exc:
        summary.failure = f"cannot connect to {summary.url}: {exc}"
        summary.errors["cannot_connect"] += 1
        summary.elapsed = time.perf_counter() - started
        return summary

    watchdog = _Watchdog(answer_timeout, deadline)
    watching = asyncio.get_running_loop().create_task(watchdog.run(), name="simulate-watchdog")
    try:
        results = await asyncio.gather(
            *(
                _run_device(device_url(device_id), device_id, summary, interval, pad, batch, deadline,
                            progress, session, watchdog)
                for device_id in ids
            ),
            return_exceptions=True,
        )
    finally:
        watching.cancel()
    summary.elapsed = time.perf_counter() - started
    for result in results:
        if isinstance(result, CannotConnect):
            summary.errors["cannot_connect"] += 1
            summary.failure = summary.failure or f"cannot connect to {summary.url}: {result}"
        elif isinstance(result, BaseException):
            summary.errors[type(result).__name__] += 1
            summary.failure = summary.failure or f"{type(result).__name__}: {result}"
    return summary
