"""fleetlog.gateway.handshake: finding a device's token in a request head, with no I/O;
what a connection's protocol keeps once its handshake is over."""

from __future__ import annotations

import logging

import pytest
import redis
import websockets
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from fleetlog.config import Settings
from fleetlog.credentials import Credentials
from fleetlog.gateway.handshake import token_in_head
from fleetlog.gateway.server import Gateway
from fleetlog.gateway.wiring import wire
from tests.helpers import RECEIVED, STORED, legacy_frame, send_legacy


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
            # No Python call per read: the transport finds picows' own methods.
            assert type(protocol).get_buffer is WSProtocol.get_buffer
            assert type(protocol).buffer_updated is WSProtocol.buffer_updated
            assert not hasattr(protocol, "__dict__"), "one per connection: slots only"
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
