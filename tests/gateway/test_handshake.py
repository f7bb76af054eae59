"""fleetlog.gateway.handshake: finding a device's token in a request head, with no I/O;
what a connection's protocol keeps once its handshake is over."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
import websockets
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from fleetlog.config import Settings
from fleetlog.credentials import Credentials
from fleetlog.gateway.handshake import token_in_head
from fleetlog.gateway.messages import FIRST_READ_SIZE, read_buffer_for
from fleetlog.gateway.server import Gateway
from fleetlog.gateway.wiring import wire
from tests.helpers import RECEIVED, STORED, closed_with, legacy_frame, queued, send_legacy, unfinished_frame


def _head(target: str = "/", *headers: str) -> bytes:
    return "\r\n".join([f"GET {target} HTTP/1.1", "Host: gw", *headers]).encode("latin-1")


@pytest.mark.parametrize(
    ("head", "token"),
    [
        (_head("/", "Authorization: Bearer abc"), "abc"),
        (_head("/", "authorization:   bearer   abc  "), "abc"),  # any case, any spacing
        (_head("/?token=q1"), "q1"),
        (_head("/?x=1&token=q%2B1"), "q+1"),  # the query is URL-decoded
        (_head("/?token=q1", "Authorization: Bearer h1"), "h1"),  # the header wins
        (_head("/", "Authorization: Basic dXNlcjpwdw=="), None),  # not a bearer token
        (_head("/", "Authorization: Bearer "), None),
        (_head("/?token="), None),
        (_head("/"), None),
        (b"GET /?token=q1", None),  # not METHOD TARGET VERSION: picows refuses it
        (b"", None),
    ],
)
def test_token_in_head(head: bytes, token: str | None) -> None:
    assert token_in_head(head) == token


def test_a_header_named_like_authorization_is_not_it() -> None:
    assert token_in_head(_head("/", "X-Authorization: Bearer nope")) is None


async def test_after_the_head_picows_reads_directly_and_the_protocol_keeps_no_dict(
    redis_url: str,
) -> None:
    """A token the gateway's cache does not hold (the deferred upgrade), then idle."""
    client = redis.Redis.from_url(redis_url)
    token = Credentials(client).add("handshake-door")  # before the gateway starts: not cached
    client.close()
    gateway = Gateway(wire(Settings(host="127.0.0.1", ws_port=0, auth="token"), redis_url))
    await gateway.start()
    try:
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/?token={token}") as ws:
            assert await send_legacy(ws, legacy_frame("handshake-door", 0)) == [RECEIVED, STORED]
            (connection,) = gateway.connections
            protocol = connection._transport.underlying_transport.get_protocol()
            # One Python call per read, the read buffer's budget; picows' own get_buffer.
            assert type(protocol).get_buffer is WSProtocol.get_buffer
            assert type(protocol).buffer_updated is not WSProtocol.buffer_updated
            assert not hasattr(protocol, "__dict__"), "one per connection: slots only"
            # The protocol's idea of picows' read buffer is picows' buffer: with nothing
            # unread, its free space is all of it; what it grew by is taken from the budget.
            budget = gateway.parts.shared.budget
            assert len(WSProtocol.get_buffer(protocol, -1)) == protocol.read_size == FIRST_READ_SIZE
            largest = 0
            for seq, size in enumerate((1_000, 5_000, 300_000, 10), start=1):
                frame = legacy_frame("handshake-door", seq, pad="x" * size)
                largest = max(largest, len(frame))
                assert await send_legacy(ws, frame) == [RECEIVED, STORED]
                assert len(WSProtocol.get_buffer(protocol, -1)) == protocol.read_size
                assert protocol.read_size == read_buffer_for(largest)
                assert budget.held == protocol.read_size - FIRST_READ_SIZE
            assert protocol.lookup is None and protocol._head is None
            assert protocol._deferred is None, "the lookup's task is let go once it ended"
            # The upgrade's headers: handshake-only, but picows keeps both messages.
            transport = connection._transport
            assert not transport.request.headers and not transport.response.headers
            # picows makes a child logger per connection out of a logging.Logger only.
            # (A Logger, unlike an adapter, is registered with the logging manager.)
            assert not [name for name in logging.Logger.manager.loggerDict
                        if name.startswith("picows.server.")]
    finally:
        await gateway.stop()
    assert budget.held == 0, "a connection that goes gives its read buffer back"


async def test_unfinished_single_frames_are_held_within_the_budget(redis_url: str) -> None:
    """A frame's bytes wait in picows' read buffer until the frame is whole: 200 connections that
    each sent 1.8 MB of a frame held 345 MB beyond max_buffered_bytes.  Each doubling of a read
    buffer is now taken from the budget first; past it the connection closes (1008), and the
    budget comes back when connections go.  A device meanwhile is answered as usual."""
    limit = 4 * 2**20
    gateway = Gateway(wire(Settings(host="127.0.0.1", ws_port=0, auth="none", max_buffered_bytes=limit),
                           redis_url))
    await gateway.start()
    budget = gateway.parts.shared.budget
    try:
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}") as canary:
            attackers = [await unfinished_frame(gateway.port, 1_000_000, 950_000) for _ in range(4)]
            await asyncio.sleep(0.5)
            assert budget.held <= limit and budget.refused >= 2, (budget.held, budget.refused)
            closed = [await closed_with(reader, 1008, 2) for reader, _ in attackers]
            assert sum(closed) == budget.refused
            assert await send_legacy(canary, legacy_frame("canary", 0)) == [RECEIVED, STORED]
            for _, writer in attackers:
                writer.close()
            await asyncio.sleep(0.5)
            assert budget.held == 0, "the connections gone, their buffers are given back"
            # A refused sender sends its record again, whole: acked, and queued once.
            async with websockets.connect(f"ws://127.0.0.1:{gateway.port}", max_size=None) as again:
                frame = legacy_frame("again", 0, pad="x" * 900_000)
                assert await send_legacy(again, frame) == [RECEIVED, STORED]
    finally:
        await gateway.stop()
    client = redis.Redis.from_url(redis_url)
    assert [device for device, _ in queued(client)] == [b"canary", b"again"]
    client.close()
