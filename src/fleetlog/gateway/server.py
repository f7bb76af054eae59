"""The device-facing WebSocket server: picows glue around the sans-I/O connection.

A handshake is authenticated in :meth:`Gateway._accept`, which picows calls
synchronously, so a bad credential gets HTTP 401 before the upgrade.  The
token cache (:class:`~fleetlog.credentials.TokenCache`, kept current by
:mod:`.tokens`) answers there with no I/O; for a token it does not hold,
:class:`~.handshake.HandshakeProtocol` holds the request back from picows until one ``HGET``
answered (:meth:`Gateway._lookup_first`); ``GET /healthz`` is answered there too
(:mod:`.health`).  Each connection's rules (reply order, the legacy reply
pair, identity, rate-limit delays, when to stop reading) live in
:class:`~fleetlog.gateway.connection.Connection`, which does no I/O:
:class:`DeviceConnection` feeds it picows' callbacks and performs the
actions it returns (writes, producer submissions, timers, close), using
nothing of the node but :class:`~.wiring.Shared`.  What connections share is
built from the settings apart (:func:`~.wiring.wire`: the per-address limit,
the per-device rate limiters, the producer, the link registry and the table of
connections (:mod:`.devices`), the token table, the relay of commands to
devices); the :class:`Gateway` takes those parts, listens and serves.

The WebSocket library is picows (chosen by measurement, see ``bench/``); it
is used only in this module and :mod:`.handshake`, so it can be swapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import signal
import time
from collections.abc import Awaitable
from typing import Any, Final

import uvloop
from multidict import CIMultiDict, CIMultiDictProxy
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

from fleetlog import control, protocol
from fleetlog.config import Settings
from fleetlog.credentials import hash_token
from fleetlog.errors import ErrorCode, FleetlogError, QueueClosed, TooManyAuthFailures
from fleetlog.gateway import health
from fleetlog.gateway.auth import Identity, Refused
from fleetlog.gateway.connection import (
    Action,
    Close,
    CommandAnswer,
    Connection,
    Link,
    Reading,
    Refusal,
    SetTimer,
    Submission,
    Unlink,
    queue_error_code,
)
from fleetlog.gateway.handshake import HandshakeProtocol, token_in_head
from fleetlog.gateway.listener import Listener, listen
from fleetlog.gateway.messages import FIRST_READ_BUFFER, CloseCode, frame_cap
from fleetlog.gateway.registry import LinkRegistry, log_failure
from fleetlog.gateway.tls import server_context
from fleetlog.gateway.wiring import GatewayParts, Shared, wire
from fleetlog.metrics import CONTENT_TYPE, render
from fleetlog.process import big_buffers_outside_the_heap, freeze_start_up_objects, raise_descriptor_limit
from fleetlog.queue.connection import REDIS_DOWN, fewest_replicas, initialize
from fleetlog.queue.producer import IngestResult

__all__ = ["DeviceConnection", "Gateway", "run_gateway"]

log = logging.getLogger("fleetlog.gateway")

#: Seconds a device has to answer our close frame before we hang up anyway.
_CLOSE_TIMEOUT: Final = 2.0
_POLICY_CLOSE_TIMEOUT: Final = 0.1
#: Seconds, on top of the Redis timeout, that shutdown waits for the replies in flight.
_DRAIN_TIMEOUT: Final = 5.0


#: picows message types that carry data (a PONG is picows' keepalive's business).
_DATA: Final = frozenset((WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION))

#: The headers of a connection's upgrade request and response once it is upgraded:
#: none, and read-only (one object shared by every connection).
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())

#: What every connection's picows protocol logs to.  Not a ``logging.Logger``: given
#: one, picows makes each connection a child logger of its own (``picows.server.<fd>``,
#: ~500 bytes per connection for as long as it lasts); an adapter is used as it is.
_PICOWS_LOG: Final = logging.LoggerAdapter(logging.getLogger("picows.server"))


class DeviceConnection(WSListener):
    """One device's WebSocket connection: picows callbacks fed to a :class:`Connection`.

    Each callback feeds one event to the sans-I/O :class:`Connection` and then
    performs the actions it returns (:meth:`_perform`): writes, submissions
    to the producer, links, refusal counts, timers, reading paused or
    resumed, close.  The rules themselves live in :mod:`.connection`.
    """

    __slots__ = ("_hang_up", "_peer", "_transport", "conn", "conn_id",
                 "heard", "on_outcome", "pinged", "shared")

    def __init__(self, shared: Shared, conn_id: str, identity: Identity | None) -> None:
        #: All it uses of the gateway (see :class:`~.wiring.Shared`).
        self.shared = shared
        self.conn_id = conn_id
        self.conn = Connection(identity, max_message_bytes=shared.max_message_bytes,
                               max_records_per_frame=shared.max_records_per_frame,
                               limiter_for=shared.limiter_for, now=time.monotonic(),
                               budget=shared.budget, records_name_device=shared.records_name_device)
        #: What the producer calls with a submission's outcome (bound once, not per frame).
        self.on_outcome = self._on_outcome
        self._transport: WSTransport | None = None
        self._peer: str | None = None
        self._hang_up: asyncio.TimerHandle | None = None  # see _close()
        #: When the device last sent a frame of any kind (data, pong; our clock).
        self.heard = self.conn.last_activity
        #: When our ping went out that the device has not answered with a frame yet (0.0: none).
        self.pinged = 0.0

    @property
    def identity(self) -> Identity | None:
        return self.conn.identity

    @property
    def device_id(self) -> str | None:
        return self.conn.device_id

    @property
    def last_activity(self) -> float:
        return self.conn.last_activity

    @property
    def peer(self) -> str | None:
        return self._peer

    @property
    def linked(self) -> bool:
        """Whether it holds its device's link (``--auth none``: see :meth:`.Devices.claim`)."""
        return self.conn.linked

    @linked.setter
    def linked(self, value: bool) -> None:
        self.conn.linked = value

    @property
    def v2(self) -> bool:
        """Whether the device speaks v2 (how a command is framed for it)."""
        return self.conn.v2

    # -- picows callbacks -------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        # The upgrade is done (picows validated the request and sent our 101 before
        # this call), but picows keeps both messages for the connection's life
        # (transport.request/.response): their headers were ~2 KiB of every idle
        # connection.  Nothing reads them from now on.
        # (A read-only proxy where picows' stubs say CIMultiDict: no one may add to it.)
        transport.request.headers = _NO_HEADERS  # type: ignore[assignment]
        transport.response.headers = _NO_HEADERS  # type: ignore[assignment]
        peer = transport.underlying_transport.get_extra_info("peername")
        self._peer = peer[0] if peer else None
        self.shared.devices.connect(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.shared.devices.release(self)
        self.conn.connection_lost()
        self._transport = None
        if self._hang_up is not None:
            self._hang_up.cancel()

    def pause_writing(self) -> None:
        self.conn.writing_blocked()
        self._perform()

    def resume_writing(self) -> None:
        self.conn.writing_unblocked()
        self._perform()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.monotonic()
        self.heard = now
        self.pinged = 0.0
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:  # else it answers ours
                transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if msg_type not in _DATA:
            return  # PONG: noted above (see keep_alive)
        self.shared.counts.frames_in += 1
        if transport.is_close_frame_sent:
            # Closing: nothing more is read.  picows sends 1009 on the header of a
            # frame over max_frame_size but keeps parsing until it disconnects,
            # and would hand us the whole oversized frame once it has arrived.
            return
        self.conn.receive_frame(msg_type.value, frame.fin, frame.get_payload_as_bytes(),
                                frame.rsv1 << 2 | frame.rsv2 << 1 | frame.rsv3, now)
        self._perform()

    # -- the connection's events that are not picows' ------------------------------

    def _on_outcome(self, submission: Submission, outcome: IngestResult | FleetlogError) -> None:
        counts = self.shared.counts
        if isinstance(outcome, FleetlogError):
            counts.error(queue_error_code(outcome))
        else:
            counts.acks += 1
            counts.ack_latency.observe(time.monotonic() - submission.queued_at)
        self.conn.receive_outcome(submission, outcome)
        self._perform()

    def _delay_elapsed(self) -> None:
        self.conn.delay_elapsed(time.monotonic())
        self._perform()

    def stop_reading(self) -> None:
        """Read nothing more from the device (shutdown); the replies still go out."""
        self.conn.stop_reading()
        self._perform()

    def close(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` (see :meth:`Connection.close`)."""
        self.conn.close(code, reason)
        self._perform()

    def buffer_refused(self) -> None:
        """The protocol drops this connection's reads: its read buffer would pass the
        process' budget (:class:`~fleetlog.gateway.handshake.HandshakeProtocol`)."""
        self.close(CloseCode.POLICY_VIOLATION,
                   "the gateway holds too much for its connections; send it again later")

    def send_command(self, wire: bytes) -> bool:
        """Write a command frame now; ``False`` if the connection is closing or gone."""
        if self._transport is None:
            return False
        sent = self.conn.send_command(wire)
        self._perform()
        return sent

    def keep_alive(self, now: float, interval: float) -> None:
        """The device sent nothing for ``interval`` seconds: ping it, or give up on it.

        Called by the gateway's one sweep over every connection (:meth:`Gateway._keep_alive`),
        as picows' own keepalive would, without its task and timer per connection: a
        ping; if no frame answered it ``interval`` seconds later, a close frame (1001)
        and the socket aborted (a peer that is gone may never acknowledge what was sent).
        """
        transport = self._transport
        if transport is None or transport.is_close_frame_sent:
            return
        if not self.pinged:
            self.pinged = now
            transport.send_ping()
        elif now - self.pinged >= interval:
            transport.send_close(CloseCode.GOING_AWAY,  # type: ignore[arg-type]  # any int goes
                                 b"no pong within %g s" % interval)
            self._hang_up = asyncio.get_running_loop().call_later(
                _POLICY_CLOSE_TIMEOUT, transport.underlying_transport.abort)

    def disconnect(self) -> None:
        """Close the socket now (what a close does once the device answered)."""
        if self._transport is not None:
            self._transport.disconnect()

    # -- actions ----------------------------------------------------------------

    def _perform(self) -> None:
        """Do what the connection asks, in order.

        An event fed meanwhile (a write that fills the buffer calls
        :meth:`pause_writing`, a closed producer answers at once) is performed
        by its own callback: the connection hands each action out once.
        """
        for action in self.conn.actions_to_take():
            if isinstance(action, bytes):
                transport = self._transport
                if transport is not None and not transport.is_close_frame_sent:
                    transport.underlying_transport.write(action)
            elif isinstance(action, Submission):
                self._submit(action)
            else:
                self._act(action)

    def _submit(self, submission: Submission) -> None:
        """Hand records to the producer; once it is closed (shutdown), answer ``unavailable`` now."""
        submission.queued_at = time.monotonic()
        try:
            self.shared.submit(
                submission.device_id, submission.records, functools.partial(self.on_outcome, submission),
                seqs=submission.seqs, session=submission.session, frame_id=submission.frame_id,
            )
        except QueueClosed as exc:
            self._on_outcome(submission, exc)

    def _act(self, action: Action) -> None:
        """The actions that are not per frame."""
        transport = self._transport
        shared = self.shared
        if isinstance(action, Reading):
            if transport is not None:
                if action is Reading.PAUSE:
                    transport.underlying_transport.pause_reading()
                else:
                    transport.underlying_transport.resume_reading()
        elif isinstance(action, Link):
            shared.devices.claim(self, action.device_id)
        elif isinstance(action, Unlink):
            shared.devices.unclaim(self, action.device_id)
        elif isinstance(action, Refusal):
            shared.count_refusal(action.device_id, action.reason)
            shared.counts.error(action.reason)
        elif isinstance(action, CommandAnswer):
            shared.answer(action)
        elif isinstance(action, SetTimer):
            asyncio.get_running_loop().call_later(action.delay, self._delay_elapsed)
        elif isinstance(action, Close):
            self._close(action.code, action.reason)

    def _close(self, code: int, reason: str) -> None:
        """Send a close frame; hang up once the device answers it, or after :data:`_CLOSE_TIMEOUT`.

        Hanging up at once would close the socket with the device's data
        unread, and the kernel would answer with a reset, which can destroy the
        close frame before the device reads it.  So reading goes on (the
        connection resumes it, and drops every data frame from now on) until
        the device's close frame arrives.
        """
        transport = self._transport
        if transport is None or transport.is_close_frame_sent:
            return
        transport.send_close(code, reason.encode())  # type: ignore[arg-type]  # any int goes
        # A connection closed for what it holds (1008) is not waited for: what it
        # would send meanwhile is what the close is about.
        wait = _CLOSE_TIMEOUT if code != CloseCode.POLICY_VIOLATION else _POLICY_CLOSE_TIMEOUT
        self._hang_up = asyncio.get_running_loop().call_later(wait, self.disconnect)


class Gateway:
    """A gateway node's server: accepts device connections and serves them, on built parts.

    The parts (:func:`~.wiring.wire`, from the settings) are the Redis
    clients, the producer, the registry, the connections' table, the relay,
    the tokens; the server adds the listeners and its background tasks, and
    runs ``start -> serve -> stop`` (:meth:`start`, :meth:`stop`).
    """

    def __init__(self, parts: GatewayParts) -> None:
        self.parts = parts
        self.settings = settings = parts.settings
        # File descriptors: the process' limit, raised to its hard limit, less a reserve.
        self._descriptor_limit = raise_descriptor_limit()
        self._descriptor_ceiling = max(1, self._descriptor_limit - settings.fd_reserve)
        self._accept_paused = False
        self._ids = itertools.count(1)
        self._server: Listener | None = None
        self._metrics_server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: What :meth:`start` opened, closed in reverse by :meth:`stop` (or by a failed start).
        self._resources: contextlib.AsyncExitStack | None = None
        self._stopping = False
        #: Whether ``--ack-replicas`` is still to be chosen from the topology (see start).
        self._replicas_unknown = settings.ack_replicas is None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> set[DeviceConnection]:
        return self.parts.devices.connections

    @property
    def registry(self) -> LinkRegistry:
        return self.parts.registry

    # -- handshakes ----------------------------------------------------------------------

    def _accept(self, request: WSUpgradeRequest) -> Any:
        path = request.path.split(b"?")[0]
        if path == b"/healthz":
            return self._health()
        if path == b"/metrics":
            if self.settings.metrics_on_device_port:
                response = WSUpgradeResponse.create_ok_response(
                    render(self.parts.metrics), extra_headers={"Content-Type": CONTENT_TYPE})
            else:  # on the metrics listener (--gateway-metrics-port), not here
                response = WSUpgradeResponse.create_error_response(
                    404, b"not served on the device port\n", extra_headers={"Content-Type": "text/plain"})
            return WSUpgradeResponseWithListener(response, None)
        try:
            identity = self.parts.auth.identify(request.headers.get("Authorization"), request.path)
        except Refused as exc:
            self.parts.registry.count_refusal(None, ErrorCode.UNAUTHORIZED)
            body = protocol.error_frame(ErrorCode.UNAUTHORIZED, str(exc))
            response = WSUpgradeResponse.create_error_response(
                401, body, extra_headers={"WWW-Authenticate": "Bearer",
                                          "Content-Type": "application/json"})
            return WSUpgradeResponseWithListener(response, None)
        return DeviceConnection(self.parts.shared, f"{self.settings.node_id}/{next(self._ids)}", identity)

    def _lookup_first(self, head: bytes, peer: str | None) -> Awaitable[object] | None:
        """For a request head whose token the cache does not hold: its lookup, to await first.

        An address that failed too many lookups lately is refused (429) before
        any lookup (:class:`AuthFailures`); a cached token costs nothing and passes.
        """
        if self.settings.auth != "token":
            return None
        token = token_in_head(head)
        if token is None:
            return None
        digest = hash_token(token)
        if self.parts.tokens.cached(digest):
            return None
        wait = self.parts.auth_failures.retry_after(peer, time.monotonic())
        if wait:
            self.parts.counts.error("auth_throttled")
            return _raise(TooManyAuthFailures(wait))
        return self._look_up(digest, peer)

    async def _look_up(self, digest: str, peer: str | None) -> None:
        """One token lookup, on the lookups' own connections, at most ``token_lookups`` at once.

        The lookups never take a connection ingest, links or heartbeats need: a
        flood of unknown tokens queues here instead (each lookup is one HGET).
        A Redis outage is logged once per interval with a count, not per lookup.
        """
        parts = self.parts
        async with parts.lookup_slots:
            try:
                device_id = await parts.tokens.fetch(parts.lookup_client, digest)
            except REDIS_DOWN as exc:
                parts.lookup_failures.note(f"cannot look device tokens up (503): {exc}")
                raise
        if device_id is None:
            parts.auth_failures.failed(peer, time.monotonic())

    def _health(self) -> Any:
        """``GET /healthz`` on the device port (see :mod:`.health`): no node id, no counts."""
        answer = self._health_answer(detail=False)
        headers = {"Content-Type": "application/json"}
        response = (WSUpgradeResponse.create_ok_response(answer.body, extra_headers=headers)
                    if answer.status == 200 else
                    WSUpgradeResponse.create_error_response(answer.status, answer.body,
                                                            extra_headers=headers))
        return WSUpgradeResponseWithListener(response, None)

    def _health_answer(self, *, detail: bool) -> health.Health:
        registry, producer = self.parts.registry, self.parts.producer
        return health.health(
            node_id=self.settings.node_id, connections=len(self.connections),
            redis=health.redis_problem(registry, producer),
            tasks=health.dead_task([*self._tasks, *registry.tasks, *producer.tasks]),
            detail=detail,
        )

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request on the metrics listener: ``GET /metrics`` or the detailed ``GET /healthz``.

        A listener of its own (``gateway_metrics_port``, on ``metrics_host``,
        127.0.0.1 by default), apart from the device port, so the node id and
        the counts are not told to whoever can reach the devices' port.  The
        families are built here, in the event loop that counts.
        """
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            path = target.split(b"?")[0]
            if path == b"/metrics":
                status, kind, body = 200, CONTENT_TYPE, render(self.parts.metrics)
            elif path == b"/healthz":
                answer = self._health_answer(detail=True)
                status, kind, body = answer.status, "application/json", answer.body
            else:
                status, kind, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (status, reason.encode(), kind.encode(),
                                                            len(body), body))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def on_control(self, message: dict[str, Any]) -> None:
        """A message on this node's control channel: another node's take-over, or a command."""
        try:
            parsed = control.parse_control(message)
        except ValueError:
            shown = repr(message)
            log.warning("ignoring a malformed command: %s", shown if len(shown) <= 200
                        else f"{shown[:200]}... ({len(shown)} characters)")
            return
        if isinstance(parsed, control.Takeover):
            self.parts.devices.take_over(parsed.conn)
        elif isinstance(parsed, control.Command):
            self.parts.relay.deliver(parsed)

    # -- lifecycle ----------------------------------------------------------------------

    def _protocol(self) -> HandshakeProtocol:
        """One connection's protocol: what ``picows.ws_create_server`` builds, plus the 431."""
        settings = self.settings
        protocol = HandshakeProtocol(
            None, None, False,  # host and port, path: client side only; is_client_side
            self._accept,
            _PICOWS_LOG,
            True,  # disconnect_on_exception
            settings.handshake_timeout,
            # No auto ping: picows would run a task and a timer per connection for it
            # (~1.2 KiB each); the gateway pings in one sweep instead (_keep_alive).
            False, settings.ping_interval, settings.ping_interval,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # enable_auto_pong
            frame_cap(settings.max_frame_bytes),  # larger frames: the Reassembler refuses them
            None,  # extra_headers: client side only
            # Most connections sit idle between small frames; picows grows the
            # buffer for big ones.  16 KiB per connection was most of its memory.
            FIRST_READ_BUFFER,
        )
        protocol.read_budget = self.parts.shared.budget
        protocol.lookup = self._lookup_first
        protocol.addresses = self.parts.addresses
        protocol.counted = self._watch_descriptors
        protocol.head_timeout = settings.handshake_timeout
        return protocol

    async def _listen(self) -> Listener:
        settings = self.settings
        # The gateway's own accept loop, on uvloop's transports (see .listener: picows'
        # default transport layer, aiofastnet, took 4.3 KiB more per connection).
        return await listen(
            self._protocol,
            # "127.0.0.1,::1": one listener per address, on the same port.
            [host.strip() for host in settings.host.split(",")] if "," in settings.host
            else settings.host,
            settings.ws_port,
            ssl_context=server_context(settings.tls_cert, settings.tls_key),
            # One of several processes on this port (fleetlog.gateway.pool): the kernel
            # spreads the connections over them.
            reuse_port=settings.reuse_port,
            # Thousands of devices reconnect at once after an outage: let the kernel
            # queue them instead of refusing (asyncio's default backlog is 100).
            backlog=4096,
        )

    async def start(self) -> None:
        """Connect, listen, then run; a failure part-way closes what was opened, in reverse.

        Each resource goes on one exit stack as it is opened (the Redis clients,
        the token subscription, the listeners, the background work); :meth:`stop`
        closes the same stack once it drained.  The device port is listened on
        before the producer, the registry and the tasks start: a taken port fails
        there, with nothing but the connections to Redis to close.
        """
        parts, settings = self.parts, self.settings
        if settings.auth == "none":
            log.warning("AUTH IS OFF (--auth none): any client can write records as any device. "
                        "Use --auth token unless this is a legacy fleet on a closed network.")
        async with contextlib.AsyncExitStack() as resources:
            resources.push_async_callback(parts.lookup_client.aclose)
            resources.push_async_callback(parts.client.aclose)
            await initialize(parts.client)
            await initialize(parts.lookup_client)
            await self._choose_replicas()
            # (Once run() ended, it has unsubscribed and stop() finds nothing to do.)
            resources.push_async_callback(parts.token_watcher.stop)
            if settings.auth == "token":
                await parts.token_watcher.start()
            # The metrics listener first: once the device port answers, so does it.
            if settings.gateway_metrics_port:
                try:
                    self._metrics_server = await asyncio.start_server(
                        self._serve_metrics, settings.metrics_host, settings.gateway_metrics_port)
                except OSError as exc:  # a taken port costs the metrics, never the devices
                    log.error("gateway metrics not served on %s:%d: %s", settings.metrics_host,
                              settings.gateway_metrics_port, exc)
                else:
                    resources.callback(self._metrics_server.close)
                    log.info("gateway metrics on http://%s:%d/metrics", settings.metrics_host,
                             settings.gateway_metrics_port)
            self._server = await self._listen()
            resources.callback(self._server.close)
            parts.producer.start()  # closed by stop()'s drain, before its connections close
            parts.registry.start(self.on_control)
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._housekeeping(), name="housekeeping"),
                           loop.create_task(self._keep_alive(), name="keepalive")]
            if settings.auth == "token":
                self._tasks.append(loop.create_task(parts.token_watcher.run(), name="tokens"))
            for task in [*self._tasks, *parts.registry.tasks, *parts.producer.tasks]:
                task.add_done_callback(self._task_ended)
            # Closed in reverse: the registry first (it writes the unlinks of the connections
            # the drain closed), then the tasks the drain cancelled are awaited.
            resources.push_async_callback(self._tasks_ended)
            resources.push_async_callback(parts.registry.close)
            self._resources = resources.pop_all()
        scheme = "wss" if settings.tls_cert else "ws"
        log.info("gateway %s listening on %s://%s:%d (queue: %s, auth: %s)",
                 settings.node_id, scheme, settings.host, self.port, settings.queue, settings.auth)

    async def _choose_replicas(self) -> None:
        """Wait for a replica before acking wherever there is one (``--ack-replicas``).

        Without it an ack means "on the master": a failover to a replica that had
        not copied the write loses acked records (README, "Loss windows").  So
        by default a deployment whose masters all have a replica acks only once
        one replica has the records; one without replicas acks on the master.
        Chosen once, from the topology at start (retried by housekeeping while
        Redis cannot say); a replica that is down then makes frames
        ``unconfirmed`` rather than acked on the master alone.
        """
        chosen = self.settings.ack_replicas
        try:
            replicas = await fewest_replicas(self.parts.client)
        except REDIS_DOWN as exc:
            if self._replicas_unknown:
                log.warning("cannot tell yet whether Redis has replicas (%s): acking on the master "
                            "until it can (--ack-replicas sets it)", exc)
            return
        if chosen is None:
            self._replicas_unknown = False
            if replicas:
                for runner in (self.parts.ingest, self.parts.ingest_plain, self.parts.append):
                    runner.wait_for(1)
                log.info("every Redis master has a replica: acking a frame once one replica has "
                         "its records (--ack-replicas 0 acks on the master alone: faster, but a "
                         "failover can lose acked records)")
        elif chosen == 0 and replicas:
            log.warning("--ack-replicas 0 with replicas present: frames are acked once the master "
                        "has them; a failover to a replica that had not copied them loses them "
                        "(README, \"Loss windows\")")
        elif chosen > replicas:
            log.warning("--ack-replicas %d but a master has only %d replicas: frames will be "
                        "answered unconfirmed, not acked, until it has more", chosen, replicas)

    def _watch_descriptors(self) -> None:
        """Stop accepting before the process runs out of file descriptors; start again below.

        Past the limit ``accept()`` fails with EMFILE, again after each of the
        listener's one-second back-offs while no descriptor is free, a warning
        each time.  So the gateway pauses first: at ``RLIMIT_NOFILE`` minus ``fd_reserve`` connections
        (the reserve keeps descriptors for Redis, the store, logs) it stops
        accepting, one log line; at 90% of that it accepts again.  Connections
        that come meanwhile wait in the kernel's accept queue.
        """
        server = self._server
        total = self.parts.addresses.total
        if server is None or self._stopping:
            return
        if not self._accept_paused and total >= self._descriptor_ceiling:
            self._accept_paused = True
            server.pause()
            self.parts.counts.error("accept_paused")
            log.warning("%d connections open, near this process' limit of %d file descriptors: "
                        "not accepting more until some close", total, self._descriptor_limit)
        elif self._accept_paused and total <= self._descriptor_ceiling * 0.9:
            self._accept_paused = False
            server.resume()
            log.info("%d connections open: accepting again", total)

    async def _tasks_ended(self) -> None:
        """Wait for the server's tasks, cancelled by :meth:`stop`, to end (bounded, as every wait
        of the shutdown: a task that does not end is named and left behind)."""
        if not self._tasks:
            return
        done, unfinished = await asyncio.wait(self._tasks, timeout=_CLOSE_TIMEOUT)
        for task in done:  # retrieved: what a task raised while stopping is no news
            if not task.cancelled():
                task.exception()
        for task in unfinished:
            log.warning("background task %s did not end within %.0f s of shutdown",
                        task.get_name(), _CLOSE_TIMEOUT)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """Say so when a long-lived task ends before shutdown: ``/healthz`` is 503 from now on."""
        if self._stopping:
            return
        exc = None if task.cancelled() else task.exception()
        log.error("background task %s stopped: %r; this node is unhealthy", task.get_name(), exc,
                  exc_info=exc)

    async def _keep_alive(self) -> None:
        """Ping the devices quiet for ``ping_interval``; close those that then stay quiet as long.

        One sweep every quarter interval over every connection, instead of
        picows' task and timer per connection: a device is pinged 1 to 1.25
        intervals after its last frame and closed (1001) 1 to 1.25 intervals
        after an unanswered ping.  Any frame answers a ping.
        """
        interval = self.settings.ping_interval
        while True:
            await asyncio.sleep(interval / 4)
            try:
                now = time.monotonic()
                for connection in [c for c in self.connections if now - c.heard >= interval]:
                    connection.keep_alive(now, interval)
            except Exception as exc:  # a bug: say so, and try again next round
                log_failure("keepalive", exc)

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
                self.parts.limiters.forget_idle(now)
                self.parts.auth_failures.forget_idle(now)
                self.parts.trim.maybe()
                if self._replicas_unknown:
                    await self._choose_replicas()
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
        4. Close what :meth:`start` opened, in reverse: the registry (the links'
           last changes written, the heartbeat removed), the tasks, the
           listeners, the token subscription, the Redis clients.
        Each wait is bounded: a frame that got no reply when its connection
        closed was not acked, and the device sends it again elsewhere.
        """
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        for connection in list(self.connections):
            connection.stop_reading()
        for task in self._tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self.parts.producer.close(),
                                   _DRAIN_TIMEOUT + self.settings.redis_timeout)
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
        resources, self._resources = self._resources, None
        if resources is not None:
            await resources.aclose()


async def _raise(exc: BaseException) -> None:
    raise exc


async def serve(settings: Settings, redis_url: str, stop: asyncio.Event) -> None:
    gateway = Gateway(wire(settings, redis_url))
    await gateway.start()
    freeze_start_up_objects()
    await stop.wait()
    log.info("gateway stopping")
    await gateway.stop()


def run_gateway(settings: Settings, redis_url: str) -> int:
    """Entry point of ``fleetlog gateway``: serve until SIGINT/SIGTERM, return 0.

    A second SIGINT/SIGTERM during the (bounded) shutdown forces the exit at
    once, returning 1: the replies still in flight are not sent, so their
    devices send those records again.
    """
    from fleetlog.lifecycle import Shutdown

    async def main() -> None:
        main_task = asyncio.current_task()
        assert main_task is not None

        def force() -> None:
            log.warning("second signal: exiting now, without waiting for the replies in flight")
            main_task.cancel()

        # Either signal, twice, forces: the replies in flight are not sent, their frames come again.
        shutdown = Shutdown(force_on=(signal.SIGINT, signal.SIGTERM), on_force=force)
        stop = shutdown.install_in(asyncio.get_running_loop())
        await serve(settings, redis_url, stop)

    big_buffers_outside_the_heap()
    try:
        uvloop.run(main())
    except OSError as exc:  # the port is taken, the certificate unreadable ...
        log.error("gateway cannot start: %s", exc)
        return 1
    except asyncio.CancelledError:  # a second signal
        return 1
    return 0
