"""The device-facing WebSocket server: picows glue around the pure protocol.

Everything a connection does happens in :class:`DeviceConnection`'s
callbacks, synchronously: a frame is reassembled (:mod:`.messages`), parsed
(:mod:`fleetlog.protocol`), its record handed to the :class:`Producer`, and
its replies put in the connection's reply queue.  Replies leave in the order
the frames came, each frame's replies together in one write, and
``log_upload_response`` only once Redis acknowledged the record.

The WebSocket library is picows (chosen by measurement, see ``bench/``); it
is used only in this module and behind :class:`Gateway`, so it can be swapped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections import deque
from typing import Any, Final

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
    ws_create_server,
)

from fleetlog import protocol
from fleetlog.config import Settings
from fleetlog.errors import ErrorCode, FleetlogError, FrameError, QueueFull
from fleetlog.gateway.messages import CloseCode, MessageError, Reassembler
from fleetlog.gateway.registry import LinkRegistry
from fleetlog.queue.connection import connect_async
from fleetlog.queue.producer import Producer

__all__ = ["DeviceConnection", "Gateway", "run_gateway"]

log = logging.getLogger("fleetlog.gateway")

_RECEIVED: Final = protocol.server_text_frame(protocol.SERVER_RECEIVED)
_RECEIVED_AND_STORED: Final = _RECEIVED + protocol.server_text_frame(protocol.LOG_UPLOAD_RESPONSE)
#: Frames a device may have in flight before the gateway stops reading from it.
_MAX_IN_FLIGHT: Final = 256


def _error(code: ErrorCode, message: str) -> bytes:
    return protocol.server_text_frame(protocol.error_frame(code, message))


def _queue_error(exc: FleetlogError) -> bytes:
    code = ErrorCode.BUSY if isinstance(exc, QueueFull) else ErrorCode.UNAVAILABLE
    return _error(code, f"{exc}; not stored, send it again later")


class _Reply:
    """One frame's replies, filled in when they are known."""

    __slots__ = ("wire",)

    def __init__(self, wire: bytes | None = None) -> None:
        self.wire = wire


class DeviceConnection(WSListener):
    """One device's WebSocket connection; see the module docstring."""

    def __init__(self, gateway: Gateway, conn_id: str) -> None:
        self.gateway = gateway
        self.conn_id = conn_id
        self.device_id: str | None = None
        self.last_activity = time.monotonic()
        self._reassembler = Reassembler(gateway.settings.max_frame_bytes)
        self._replies: deque[_Reply] = deque()
        self._transport: WSTransport | None = None
        self._paused = False

    # -- picows callbacks -------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        self.gateway.connections.add(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gateway.connections.discard(self)
        if self.device_id is not None:
            self.gateway.registry.unlink(self.device_id, self.conn_id)
        self._transport = None

    def pause_writing(self) -> None:
        self._pause_reading()

    def resume_writing(self) -> None:
        self._resume_reading()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if msg_type not in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            return  # PONG: picows' keepalive already noted it
        self.last_activity = time.monotonic()
        try:
            message = self._reassembler.feed(msg_type.value, frame.fin, frame.get_payload_as_bytes())
        except MessageError as exc:
            if exc.code == CloseCode.MESSAGE_TOO_BIG:
                self._send(_error(ErrorCode.TOO_LARGE, exc.reason))
            self.close(exc.code, exc.reason)
            return
        if message is None:
            return
        if message.binary:
            self._reply(_RECEIVED + _error(ErrorCode.BAD_FRAME, "binary frames are not accepted"))
            return
        self.receive(message.payload)

    # -- protocol ---------------------------------------------------------------

    def receive(self, payload: bytes) -> None:
        """Handle one complete text message of the legacy protocol."""
        try:
            frame = protocol.parse_legacy(payload)
        except FrameError as exc:
            self._reply(_RECEIVED + _error(exc.code, exc.message))
            return
        if frame.device_id is not None and frame.device_id != self.device_id:
            if self.device_id is not None:
                self.gateway.registry.unlink(self.device_id, self.conn_id)
            self.device_id = frame.device_id
            self.gateway.registry.link(frame.device_id, self.conn_id)
        if frame.record is None:
            self._reply(_RECEIVED)
            return
        reply = _Reply()
        self._replies.append(reply)
        if len(self._replies) >= _MAX_IN_FLIGHT:
            self._pause_reading()

        def done(error: FleetlogError | None) -> None:
            reply.wire = _RECEIVED_AND_STORED if error is None else _RECEIVED + _queue_error(error)
            self._flush_replies()

        device_id = self.device_id if self.device_id is not None else "unknown"
        self.gateway.producer.submit(((device_id, frame.record),), done)

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
        if self._paused and len(replies) < _MAX_IN_FLIGHT // 2:
            self._resume_reading()

    def _send(self, wire: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_close_frame_sent:
            transport.underlying_transport.write(wire)

    def _pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.underlying_transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.underlying_transport.resume_reading()

    def close(self, code: int, reason: str) -> None:
        transport = self._transport
        if transport is not None and not transport.is_close_frame_sent:
            transport.send_close(code, reason.encode())  # type: ignore[arg-type]  # any int goes
            transport.disconnect()


class Gateway:
    """A gateway node: WebSocket server, producer, link registry."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.connections: set[DeviceConnection] = set()
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        client = connect_async(redis_url, timeout=settings.redis_timeout)
        self._client = client
        self.producer = Producer(
            client, mode=settings.queue, stream=settings.stream, max_backlog=settings.max_backlog
        )
        self.registry = LinkRegistry(
            client,
            node_id=settings.node_id,
            heartbeat_ttl=settings.heartbeat_ttl,
            info={"host": settings.host, "port": settings.ws_port},
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _accept(self, request: WSUpgradeRequest) -> Any:
        if request.path.split(b"?")[0] == b"/healthz":
            body = orjson.dumps(
                {"status": "ok", "node": self.settings.node_id, "connections": len(self.connections)}
            )
            response = WSUpgradeResponse.create_ok_response(
                body, extra_headers={"Content-Type": "application/json"}
            )
            return WSUpgradeResponseWithListener(response, None)
        return DeviceConnection(self, f"{self.settings.node_id}/{next(self._ids)}")

    async def start(self) -> None:
        self.producer.start()
        self.registry.start()
        settings = self.settings
        self._server = await ws_create_server(
            self._accept,
            settings.host,
            settings.ws_port,
            max_frame_size=settings.max_frame_bytes,
            enable_auto_ping=True,
            auto_ping_idle_timeout=settings.ping_interval,
            auto_ping_reply_timeout=settings.ping_interval,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            websocket_handshake_timeout=10,
            reuse_address=True,
        )
        self._sweeper = asyncio.get_running_loop().create_task(self._close_idle())
        log.info("gateway %s listening on ws://%s:%d (queue: %s, auth: %s)",
                 settings.node_id, settings.host, self.port, settings.queue, settings.auth)

    async def _close_idle(self) -> None:
        timeout = self.settings.idle_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            deadline = time.monotonic() - timeout
            for connection in [c for c in self.connections if c.last_activity < deadline]:
                connection.close(CloseCode.NORMAL, "idle timeout")

    async def stop(self) -> None:
        """Stop accepting, send the acks in flight, close devices with 1001, clean up."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.producer.close()
        for connection in list(self.connections):
            connection.close(CloseCode.GOING_AWAY, "gateway shutting down")
        for _ in range(50):
            if not self.connections:
                break
            await asyncio.sleep(0.02)
        await self.registry.close()
        await self._client.aclose()


async def serve(settings: Settings, redis_url: str, stop: asyncio.Event) -> None:
    gateway = Gateway(settings, redis_url)
    await gateway.start()
    await stop.wait()
    log.info("gateway stopping")
    await gateway.stop()


def run_gateway(settings: Settings, redis_url: str) -> int:
    """Entry point of ``fleetlog gateway``: serve until SIGINT/SIGTERM, return 0."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, redis_url, stop)

    uvloop.run(main())
    return 0
