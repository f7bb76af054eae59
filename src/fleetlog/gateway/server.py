"""The device-facing WebSocket server: picows glue around the pure protocol.

A handshake is authenticated in :meth:`Gateway._accept` (no I/O: the token
table is in memory, kept current by :mod:`.tokens`), so a bad credential gets
HTTP 401 before the upgrade.
Everything a connection does then happens in :class:`DeviceConnection`'s
callbacks, synchronously: a frame is reassembled (:mod:`.messages`), rate
limited (:mod:`.limits`), parsed (:mod:`fleetlog.protocol`), its records
handed to the :class:`~fleetlog.queue.producer.Producer`, and its replies put
in the connection's reply queue.  Replies leave in the order the frames came,
each frame's replies in one write, and an ack only once Redis acknowledged
the records.

The WebSocket library is picows (chosen by measurement, see ``bench/``); it
is used only in this module, so it can be swapped.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import signal
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import aiofastnet
import orjson
import uvloop
from picows import (
    WSAutoPingStrategy,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stubs

from fleetlog import protocol
from fleetlog.config import Settings
from fleetlog.credentials import TokenTable
from fleetlog.errors import ErrorCode, FleetlogError, FrameError, QueueClosed, QueueFull
from fleetlog.gateway.auth import Authenticator, Identity, Refused
from fleetlog.gateway.limits import DeviceLimiter
from fleetlog.gateway.messages import CloseCode, MessageError, Reassembler
from fleetlog.gateway.registry import LinkRegistry, log_failure
from fleetlog.gateway.tokens import TokenWatcher
from fleetlog.queue.connection import connect_async
from fleetlog.queue.producer import Done, IngestResult, Producer

__all__ = ["DeviceConnection", "Gateway", "run_gateway"]

log = logging.getLogger("fleetlog.gateway")

_RECEIVED: Final = protocol.server_text_frame(protocol.SERVER_RECEIVED)
_RECEIVED_AND_STORED: Final = _RECEIVED + protocol.server_text_frame(protocol.LOG_UPLOAD_RESPONSE)
#: Frames a device may have in flight before the gateway stops reading from it.
_MAX_IN_FLIGHT: Final = 256

#: Seconds a device has to answer our close frame before we hang up anyway.
_CLOSE_TIMEOUT: Final = 2.0
#: Seconds, on top of the Redis timeout, that shutdown waits for the replies in flight.
_DRAIN_TIMEOUT: Final = 5.0

CLOSE_REVOKED: Final = 4401
CLOSE_TAKEN_OVER: Final = 4409
CLOSE_POLICY: Final = 1008


def _error(code: ErrorCode, message: str, frame_id: str | None = None, **extra: Any) -> bytes:
    if frame_id is not None:
        extra["id"] = frame_id
    return protocol.server_text_frame(protocol.error_frame(code, message, **extra))


def _queue_error(exc: FleetlogError, frame_id: str | None = None) -> bytes:
    code = ErrorCode.BUSY if isinstance(exc, QueueFull) else ErrorCode.UNAVAILABLE
    return _error(code, f"{exc}; not stored, send it again later", frame_id)


class _Reply:
    """One frame's replies, filled in when they are known."""

    __slots__ = ("wire",)

    def __init__(self, wire: bytes | None = None) -> None:
        self.wire = wire


#: picows' limit on a request's line and headers (``WSProtocol._http_max_size``,
#: fixed in its C code); past it picows drops the connection without a word.
MAX_REQUEST_HEAD: Final = 16 * 1024
_HEADERS_TOO_LARGE: Final = protocol.error_frame(
    ErrorCode.TOO_LARGE, f"request line and headers over {MAX_REQUEST_HEAD} bytes")
_431: Final = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
               b"Content-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(_HEADERS_TOO_LARGE), _HEADERS_TOO_LARGE))


class _Protocol(WSProtocol):  # type: ignore[misc]  # picows' protocol is untyped
    """picows' server protocol, answering ``431`` where picows would just hang up.

    picows enforces :data:`MAX_REQUEST_HEAD` inside its compiled parser, which
    offers no hook: it closes the socket and logs, so the client sees a reset.
    This subclass sees every byte before picows does (``get_buffer`` /
    ``buffer_updated`` are how the transport hands them over), keeps a copy
    until the headers end, and when they reach the limit writes the 431 and
    closes instead of passing the bytes on.  After the handshake it costs one
    attribute test per read.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._head: bytearray | None = bytearray()  # None once the headers ended
        self._view: memoryview | None = None

    def get_buffer(self, size_hint: int) -> memoryview:
        view: memoryview = super().get_buffer(size_hint)
        if self._head is not None:
            self._view = view
        return view

    def buffer_updated(self, nbytes: int) -> None:
        head = self._head
        if head is not None:
            assert self._view is not None
            head += self._view[:nbytes]
            self._view = None
            end = head.find(b"\r\n\r\n")
            if (end if end >= 0 else len(head)) >= MAX_REQUEST_HEAD:
                self._head = None
                transport = self.transport.underlying_transport
                transport.write(_431)
                transport.close()
                log.info("refused a request with headers over %d bytes (431)", MAX_REQUEST_HEAD)
                return
            if end >= 0:
                self._head = None
        super().buffer_updated(nbytes)


class DeviceConnection(WSListener):
    """One device's WebSocket connection; see the module docstring."""

    def __init__(self, gateway: Gateway, conn_id: str, identity: Identity | None) -> None:
        self.gateway = gateway
        self.conn_id = conn_id
        self.identity = identity
        self.device_id: str | None = identity.device_id if identity else None
        self.last_activity = time.monotonic()
        self._reassembler = Reassembler(gateway.settings.max_frame_bytes)
        self._replies: deque[_Reply] = deque()
        self._inbox: deque[Callable[[], None]] = deque()  # work waiting out a rate-limit delay
        self._delayed = False
        self._transport: WSTransport | None = None
        self._paused = False  # reading from the socket is paused
        self._stopped = False  # reading paused for good: the gateway is shutting down
        self._write_blocked = False  # the device is not reading our replies
        self._peer: str | None = None
        self._hang_up: asyncio.TimerHandle | None = None  # see close()

    # -- picows callbacks -------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        gateway = self.gateway
        peer = transport.underlying_transport.get_extra_info("peername")
        self._peer = peer[0] if peer else None
        if not gateway.connect(self):
            gateway.registry.count_refusal(self.device_id, "too_many_connections")
            self.close(CLOSE_POLICY, "too many connections from this address")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gateway.release(self)
        self._transport = None
        if self._hang_up is not None:
            self._hang_up.cancel()

    def pause_writing(self) -> None:
        self._write_blocked = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._maybe_resume_reading()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:  # else it answers ours
                transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if msg_type not in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            return  # PONG: picows' keepalive already noted it
        if transport.is_close_frame_sent:
            # Closing: nothing more is read.  picows sends 1009 on the header of a
            # frame over max_frame_size but keeps parsing until it disconnects,
            # and would hand us the whole oversized frame once it has arrived.
            return
        self.last_activity = time.monotonic()
        reserved = frame.rsv1 << 2 | frame.rsv2 << 1 | frame.rsv3
        try:
            message = self._reassembler.feed(msg_type.value, frame.fin, frame.get_payload_as_bytes(),
                                             reserved)
        except MessageError as exc:
            if exc.code == CloseCode.MESSAGE_TOO_BIG:
                self.gateway.registry.count_refusal(self.device_id, ErrorCode.TOO_LARGE)
                self._send(_error(ErrorCode.TOO_LARGE, exc.reason))
            self.close(exc.code, exc.reason)
            return
        if message is None:
            return
        if message.binary:
            self._refuse(ErrorCode.BAD_FRAME, "binary frames are not accepted", legacy=True)
            return
        if self._delayed:
            self._inbox.append(functools.partial(self.receive, message.payload))
        else:
            self.receive(message.payload)

    # -- protocol ---------------------------------------------------------------

    def receive(self, payload: bytes) -> None:
        """Handle one complete text message of either protocol."""
        gateway = self.gateway
        try:
            frame = protocol.parse_frame(payload, gateway.settings.max_records_per_frame)
        except FrameError as exc:
            self._refuse(exc.code, exc.message, exc.frame_id, legacy=not exc.v2)
            return
        if isinstance(frame, protocol.LegacyFrame):
            legacy, frame_id = True, None
            records = [frame.record] if frame.record is not None else []
        else:
            legacy, frame_id, records = False, frame.id, frame.records
        device_id = self._device_for(frame.device_id, frame_id, legacy)
        if device_id is None:
            return
        if not records:
            self._reply(_RECEIVED)
            return
        decision = gateway.limiter(device_id).admit(len(records), len(payload), time.monotonic())
        if decision.refused:
            self._refuse(ErrorCode.RATE_LIMITED, "over this device's rate limit", frame_id,
                         legacy=legacy, retry_after_ms=int(decision.retry_after * 1000) + 1)
            return
        if decision.delay:
            self._delay(decision.delay, functools.partial(self._queue, frame, device_id, records))
        else:
            self._queue(frame, device_id, records)

    def _queue(self, frame: protocol.LegacyFrame | protocol.LogBatch, device_id: str,
               records: list[bytes]) -> None:
        """Hand an admitted frame's records to the producer; its reply waits in order."""
        reply = _Reply()
        self._replies.append(reply)
        if len(self._replies) >= _MAX_IN_FLIGHT:
            self._pause_reading()

        if isinstance(frame, protocol.LegacyFrame):
            def done_legacy(outcome: IngestResult | FleetlogError) -> None:
                if isinstance(outcome, FleetlogError):
                    reply.wire = _RECEIVED + _queue_error(outcome)
                else:
                    reply.wire = _RECEIVED_AND_STORED
                self._flush_replies()

            self._submit(done_legacy, device_id, records)
            return

        batch = frame

        def done_v2(outcome: IngestResult | FleetlogError) -> None:
            if isinstance(outcome, FleetlogError):
                reply.wire = _queue_error(outcome, batch.id)
            else:
                stored = 0 if outcome.duplicate_frame else len(records) - len(outcome.duplicates)
                reply.wire = protocol.server_text_frame(protocol.ack_frame(
                    batch.id, stored=stored, duplicates=outcome.duplicates,
                    stored_through=outcome.stored_through, missing=outcome.missing,
                    duplicate_frame=outcome.duplicate_frame,
                ))
            self._flush_replies()

        self._submit(done_v2, device_id, records, seqs=batch.seqs, session=batch.session,
                     frame_id=batch.id)

    def _submit(self, done: Done, device_id: str, records: list[bytes], **options: Any) -> None:
        """Hand records to the producer; once it is closed (shutdown), answer ``unavailable`` now."""
        try:
            self.gateway.producer.submit(device_id, records, done, **options)
        except QueueClosed as exc:
            done(exc)

    def _device_for(self, claimed: str | None, frame_id: str | None, legacy: bool) -> str | None:
        """The device a frame is for, linking it on first sight; ``None`` if refused."""
        if self.identity is not None:
            if claimed is not None and claimed != self.identity.device_id:
                self._refuse(ErrorCode.FORBIDDEN, "this connection is authenticated as another device",
                             frame_id, legacy=legacy)
                return None
            return self.identity.device_id
        if claimed is not None and claimed != self.device_id:
            if self.device_id is not None:
                self.gateway.registry.unlink(self.device_id, self.conn_id)
            self.device_id = claimed
            self.gateway.registry.link(claimed, self.conn_id)
        if self.device_id is None and not legacy:
            self._refuse(ErrorCode.BAD_FRAME, "a log frame needs deviceId when auth is none", frame_id)
            return None
        return self.device_id if self.device_id is not None else "unknown"

    def _refuse(self, code: ErrorCode, message: str, frame_id: str | None = None, *,
                legacy: bool = False, **extra: Any) -> None:
        self.gateway.registry.count_refusal(self.device_id, code)
        wire = _error(code, message, frame_id, **extra)
        self._reply(_RECEIVED + wire if legacy else wire)

    def _delay(self, seconds: float, action: Callable[[], None]) -> None:
        """Run ``action`` (and every message after it) in ``seconds``: slowed, not refused."""
        self._delayed = True
        self._inbox.appendleft(action)
        self._pause_reading()
        asyncio.get_running_loop().call_later(seconds, self._end_delay)

    def _end_delay(self) -> None:
        self._delayed = False
        while self._inbox and not self._delayed:
            self._inbox.popleft()()
        self._maybe_resume_reading()

    def _reply(self, wire: bytes) -> None:
        if self._replies:
            self._replies.append(_Reply(wire))
        else:
            self._send(wire)

    def _flush_replies(self) -> None:
        replies = self._replies
        chunks = []
        while replies and replies[0].wire is not None:
            chunks.append(replies.popleft().wire)
        if chunks:
            self._send(b"".join(chunks))  # type: ignore[arg-type]
        if self._paused:
            self._maybe_resume_reading()

    def _send(self, wire: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_close_frame_sent:
            transport.underlying_transport.write(wire)

    def _pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.underlying_transport.pause_reading()

    def stop_reading(self) -> None:
        """Read nothing more from the device (shutdown); the replies still go out."""
        self._stopped = True
        self._pause_reading()

    def _maybe_resume_reading(self) -> None:
        """Read again once nothing holds us: replies drained, no delay, device reading."""
        if (self._paused and self._transport is not None and not self._write_blocked
                and not self._delayed and not self._stopped
                and len(self._replies) < _MAX_IN_FLIGHT // 2):
            self._paused = False
            self._transport.underlying_transport.resume_reading()

    @property
    def peer(self) -> str | None:
        return self._peer

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; hang up once the device answers it, or after :data:`_CLOSE_TIMEOUT`.

        Hanging up at once would close the socket with the device's data
        unread, and the kernel would answer with a reset, which can destroy the
        close frame before the device reads it.  So reading goes on (every data
        frame from now on is dropped) until the device's close frame arrives.
        """
        transport = self._transport
        if transport is None or transport.is_close_frame_sent:
            return
        transport.send_close(code, reason.encode())  # type: ignore[arg-type]  # any int goes
        if self._paused:
            self._paused = False
            transport.underlying_transport.resume_reading()
        self._hang_up = asyncio.get_running_loop().call_later(_CLOSE_TIMEOUT, self.disconnect)

    def disconnect(self) -> None:
        """Close the socket now (what :meth:`close` does once the device answered)."""
        if self._transport is not None:
            self._transport.disconnect()


class Gateway:
    """A gateway node: WebSocket server, producer, link registry, credentials."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.connections: set[DeviceConnection] = set()
        self._by_device: dict[str, DeviceConnection] = {}
        self._by_conn: dict[str, DeviceConnection] = {}
        self._per_peer: dict[str, int] = {}
        self._limiters: dict[str, DeviceLimiter] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        client = connect_async(redis_url, timeout=settings.redis_timeout)
        self._client = client
        self.tokens = TokenTable()
        self._token_watcher = TokenWatcher(client, self.tokens, node_id=settings.node_id,
                                           on_change=self._close_revoked)
        self.auth = Authenticator(
            settings.auth, self.tokens, jwt_secret=settings.jwt_secret,
            jwt_public_key=settings.jwt_public_key,
        )
        self.producer = Producer(
            client, mode=settings.queue, stream=settings.stream, max_backlog=settings.max_backlog,
            dedupe_window=int(settings.dedupe_window),
        )
        self.registry = LinkRegistry(
            client,
            node_id=settings.node_id,
            heartbeat_ttl=settings.heartbeat_ttl,
            info={"host": settings.host, "port": settings.ws_port},
            take_over=settings.auth != "none",
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    # -- connections ----------------------------------------------------------------

    def _accept(self, request: WSUpgradeRequest) -> Any:
        if request.path.split(b"?")[0] == b"/healthz":
            return self._health()
        try:
            identity = self.auth.identify(request.headers.get("Authorization"), request.path)
        except Refused as exc:
            self.registry.count_refusal(None, ErrorCode.UNAUTHORIZED)
            body = protocol.error_frame(ErrorCode.UNAUTHORIZED, str(exc))
            response = WSUpgradeResponse.create_error_response(
                401, body, extra_headers={"WWW-Authenticate": "Bearer",
                                          "Content-Type": "application/json"})
            return WSUpgradeResponseWithListener(response, None)
        return DeviceConnection(self, f"{self.settings.node_id}/{next(self._ids)}", identity)

    def _health(self) -> Any:
        """``GET /healthz``: 200 while Redis takes writes, 503 (with why) while it does not
        or a background task died, so a load balancer sends devices to a node that can ack them."""
        redis_error = self._redis_error()
        task_error = self._dead_task()
        error = redis_error or task_error
        body = orjson.dumps({"status": "degraded" if error else "ok", "node": self.settings.node_id,
                             "connections": len(self.connections), "redis": redis_error or "ok",
                             "tasks": task_error or "ok"})
        headers = {"Content-Type": "application/json"}
        response = (WSUpgradeResponse.create_error_response(503, body, extra_headers=headers)
                    if error else WSUpgradeResponse.create_ok_response(body, extra_headers=headers))
        return WSUpgradeResponseWithListener(response, None)

    def _redis_error(self) -> str | None:
        """Why Redis does not take writes, if it does not.

        The heartbeat tries every third of its TTL; the producer's last failure
        counts until a heartbeat succeeds after it (the producer only finds out
        it can write again when a device sends).
        """
        registry, producer = self.registry, self.producer
        if registry.last_error is not None:
            return registry.last_error
        if producer.last_error is not None and producer.failed_at > registry.beat_at:
            return producer.last_error
        return None

    def _dead_task(self) -> str | None:
        """The first long-lived task that ended, and how; each of them only ends at :meth:`stop`."""
        for task in [*self._tasks, *self.registry.tasks, *self.producer.tasks]:
            if task.done():
                exc = None if task.cancelled() else task.exception()
                return f"task {task.get_name()} stopped: {exc!r}"
        return None

    def connect(self, connection: DeviceConnection) -> bool:
        """Register a new connection; ``False`` if its address has too many already.

        An authenticated device is linked at once and takes over its older
        connection, on this node or (through the registry) on another.
        """
        peer = connection.peer
        if peer is not None:
            count = self._per_peer.get(peer, 0)
            if count >= self.settings.max_connections_per_ip:
                return False
            self._per_peer[peer] = count + 1
        self.connections.add(connection)
        self._by_conn[connection.conn_id] = connection
        device_id = connection.device_id
        if connection.identity is not None and device_id is not None:
            previous = self._by_device.get(device_id)
            self._by_device[device_id] = connection
            if previous is not None:
                previous.close(CLOSE_TAKEN_OVER, "replaced by a newer connection of this device")
            self.registry.link(device_id, connection.conn_id)
        return True

    def release(self, connection: DeviceConnection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        self._by_conn.pop(connection.conn_id, None)
        peer = connection.peer
        if peer is not None:
            left = self._per_peer.get(peer, 1) - 1
            if left:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)
        device_id = connection.device_id
        if device_id is not None:
            if self._by_device.get(device_id) is connection:
                del self._by_device[device_id]
            self.registry.unlink(device_id, connection.conn_id)

    def limiter(self, device_id: str) -> DeviceLimiter:
        limiter = self._limiters.get(device_id)
        if limiter is None:
            settings = self.settings
            limiter = self._limiters[device_id] = DeviceLimiter(
                records_per_s=settings.rate_records, bytes_per_s=settings.rate_bytes,
                burst=settings.rate_burst, max_delay=settings.rate_max_delay,
                now=time.monotonic(),
            )
        return limiter

    def on_control(self, message: dict[str, Any]) -> None:
        """A message on this node's control channel (another node's take-over)."""
        if message.get("op") == "takeover":
            connection = self._by_conn.get(str(message.get("conn")))
            if connection is not None:
                connection.close(CLOSE_TAKEN_OVER, "replaced by a newer connection of this device")

    # -- lifecycle ----------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        settings = self.settings
        if settings.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        return context

    def _protocol(self) -> _Protocol:
        """One connection's protocol: what ``picows.ws_create_server`` builds, plus the 431."""
        settings = self.settings
        return _Protocol(
            None, None, False,  # host and port, path: client side only; is_client_side
            self._accept,
            logging.getLogger("picows.server"),
            True,  # disconnect_on_exception
            settings.handshake_timeout,
            True, settings.ping_interval, settings.ping_interval,  # auto ping: idle, reply timeouts
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # enable_auto_pong
            settings.max_frame_bytes,
            None,  # extra_headers: client side only
            # Most connections sit idle between small frames; picows grows the
            # buffer for big ones.  16 KiB per connection was most of its memory.
            2048,
        )

    async def _listen(self) -> asyncio.Server:
        settings = self.settings
        # picows' own transport layer, as ws_create_server uses it.
        server: asyncio.Server = await aiofastnet.create_server(
            asyncio.get_running_loop(),
            self._protocol,
            settings.host,
            settings.ws_port,
            ssl=self._ssl_context(),
            reuse_address=True,
            # Thousands of devices reconnect at once after an outage: let the kernel
            # queue them instead of refusing (asyncio's default backlog is 100).
            backlog=4096,
        )
        return server

    async def start(self) -> None:
        """Listen first (a taken port fails here, before anything else started), then run."""
        settings = self.settings
        if settings.auth == "none":
            log.warning("AUTH IS OFF (--auth none): any client can write records as any device. "
                        "Use --auth token unless this is a legacy fleet on a closed network.")
        elif settings.auth == "token":
            await self._token_watcher.start()
        try:
            self._server = await self._listen()
        except BaseException:
            await self._token_watcher.stop()
            await self._client.aclose()
            raise
        self.producer.start()
        self.registry.start(self.on_control)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._housekeeping(), name="housekeeping")]
        if settings.auth == "token":
            self._tasks.append(loop.create_task(self._token_watcher.run(), name="tokens"))
        for task in [*self._tasks, *self.registry.tasks, *self.producer.tasks]:
            task.add_done_callback(self._task_ended)
        scheme = "wss" if settings.tls_cert else "ws"
        log.info("gateway %s listening on %s://%s:%d (queue: %s, auth: %s)",
                 settings.node_id, scheme, settings.host, self.port, settings.queue, settings.auth)

    def _close_revoked(self) -> None:
        """Close the connections whose token the table no longer holds (4401)."""
        for connection in list(self.connections):
            identity = connection.identity
            if identity and identity.token_hash and not self.tokens.valid(identity.token_hash):
                connection.close(CLOSE_REVOKED, "credentials revoked or rotated")

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """Say so when a long-lived task ends before shutdown: ``/healthz`` is 503 from now on."""
        if self._stopping:
            return
        exc = None if task.cancelled() else task.exception()
        log.error("background task %s stopped: %r; this node is unhealthy", task.get_name(), exc,
                  exc_info=exc)

    async def _housekeeping(self) -> None:
        """Close idle connections; forget rate limiters with nothing to remember."""
        timeout = self.settings.idle_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            try:
                now = time.monotonic()
                deadline = now - timeout
                for connection in [c for c in self.connections if c.last_activity < deadline]:
                    connection.close(CloseCode.NORMAL, "idle timeout")
                for device_id in [d for d, limiter in self._limiters.items() if limiter.idle(now)]:
                    del self._limiters[device_id]
            except Exception as exc:  # a bug: say so, and try again next round
                log_failure("housekeeping", exc)

    async def stop(self) -> None:
        """Shut down without leaving an acked record unstored or a read frame unanswered.

        1. Stop accepting connections and stop reading from every device: no
           new frame comes in from now on.
        2. Drain the producer: every frame read so far gets its reply, an ack
           once Redis has it or an error; a frame still waiting out a rate-limit
           delay is answered ``unavailable`` (:class:`QueueClosed`).
        3. Close every connection with 1001 and wait for them to go.
        Each wait is bounded: a frame that got no reply when its connection
        closed was not acked, and the device sends it again elsewhere.
        """
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.stop_reading()
        for task in self._tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self.producer.close(), _DRAIN_TIMEOUT + self.settings.redis_timeout)
        except TimeoutError:
            log.warning("records in flight not answered within the shutdown limit; "
                        "their devices will send them again")
        for connection in list(self.connections):
            connection.close(CloseCode.GOING_AWAY, "gateway shutting down")
        for _ in range(int(_CLOSE_TIMEOUT / 0.02)):  # the devices answer our close frames
            if not self.connections:
                break
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.disconnect()
        await self.registry.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()


async def serve(settings: Settings, redis_url: str, stop: asyncio.Event) -> None:
    gateway = Gateway(settings, redis_url)
    await gateway.start()
    await stop.wait()
    log.info("gateway stopping")
    await gateway.stop()


def run_gateway(settings: Settings, redis_url: str) -> int:
    """Entry point of ``fleetlog gateway``: serve until SIGINT/SIGTERM, return 0.

    A second SIGINT/SIGTERM during the (bounded) shutdown forces the exit at
    once, returning 1: the replies still in flight are not sent, so their
    devices send those records again.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        assert main_task is not None

        def on_signal() -> None:
            if stop.is_set():
                log.warning("second signal: exiting now, without waiting for the replies in flight")
                main_task.cancel()
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        await serve(settings, redis_url, stop)

    try:
        uvloop.run(main())
    except OSError as exc:  # the port is taken, the certificate unreadable ...
        log.error("gateway cannot start: %s", exc)
        return 1
    except asyncio.CancelledError:  # a second signal
        return 1
    return 0
