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


async def _open(url: str, index: int, gate: asyncio.Semaphore, local: str | None,
                prefix: str) -> WSTransport:
    async with gate:
        # From another loopback address (127.0.0.2, ...): each source address has its
        # own ephemeral ports, so one machine can hold more than ~28,000 connections.
        extra = {"local_addr": (local, 0)} if local else {}
        transport, listener = await ws_connect(_Quiet, url, websocket_handshake_timeout=20, **extra)
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
