"""Hold K idle device connections open, to measure a gateway's memory per connection.

Each connection completes the WebSocket handshake, names its device with one
legacy frame (``{"deviceId": ...}``, no record) and waits for the gateway's
first reply, so the gateway holds what it holds for a real, quiet device.
Handshakes are limited to a few dozen at a time so that the server's listen
backlog never overflows (a dropped SYN costs a 1 s retransmit, not memory).

Once all K are open it prints ``idle ready K`` on stderr and holds them until
SIGTERM (or ``--hold`` seconds), then closes them.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect


class _Quiet(WSListener):
    def __init__(self) -> None:
        self.greeted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT and not self.greeted.done():
            self.greeted.set_result(None)


#: Linux: bind an address now, its port at connect (``socket.IP_BIND_ADDRESS_NO_PORT``, 3.12+).
_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def _connect(url: str, local: str | None) -> tuple[WSTransport, WSListener]:
    """Connect, from ``local`` (127.0.0.2, ...) when given.

    Each source address has its own ports, so one machine can hold more than
    the ~28,000 connections one address has towards one server port.  The
    socket binds the address with ``IP_BIND_ADDRESS_NO_PORT``, so the kernel
    picks the port at connect, by the whole 4-tuple: a plain ``bind`` to port
    0 searches for a port free on its own, which grew slower with every port
    taken (60,000 connections took 55 s, 100,000 took 214 s, the clients
    busy in the kernel).
    """
    if not local:
        return await ws_connect(_Quiet, url, websocket_handshake_timeout=20)

    def bound(_url: object) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
            sock.bind((local, 0))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    return await ws_connect(_Quiet, url, websocket_handshake_timeout=20, socket_factory=bound)


async def _open(url: str, index: int, gate: asyncio.Semaphore, local: str | None,
                prefix: str) -> WSTransport:
    async with gate:
        transport, listener = await _connect(url, local)
        assert isinstance(listener, _Quiet)
        transport.send(WSMsgType.TEXT, orjson.dumps({"deviceId": f"{prefix}{index:06d}"}))
        await asyncio.wait_for(listener.greeted, timeout=20)
        return transport


async def hold(url: str, count: int, hold_s: float, parallel: int, local: str | None = None,
               prefix: str = "idle-") -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    gate = asyncio.Semaphore(parallel)
    transports = await asyncio.gather(*(_open(url, n, gate, local, prefix) for n in range(count)))
    print(f"idle ready {len(transports)}", file=sys.stderr, flush=True)
    try:
        await asyncio.wait_for(stop.wait(), hold_s)
    except TimeoutError:
        pass
    for transport in transports:
        transport.disconnect()
    await asyncio.sleep(0.1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--hold", type=float, default=120.0, help="Give up holding after S seconds.")
    parser.add_argument("--parallel", type=int, default=64, help="Handshakes in flight at once.")
    parser.add_argument("--local-addr", default=None, help="Source address, e.g. 127.0.0.2.")
    parser.add_argument("--prefix", default="idle-", help="Device id prefix.")
    args = parser.parse_args()
    uvloop.run(hold(args.url, args.connections, args.hold, args.parallel, args.local_addr, args.prefix))
