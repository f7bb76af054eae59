"""Bare echo servers and a closed-loop echo client: the ceiling of each library.

``gateway ingest as % of bare echo`` needs, for the same WebSocket library,
the rate at which a server that does nothing but echo can answer the same
load.  Both servers run on uvloop like the gateways:

* ``serve --lib picows``: picows, the library under fleetlog's gateway;
* ``serve --lib websockets``: the library under the baseline gateway;
* ``serve --lib picows --reply legacy-ack``: no echo, the legacy pair
  (``server receive a message!`` + ``log_upload_response``) in one write, as
  the gateway answers a stored record, but at once: ``fleetlog simulate``
  against it measures the ack latency that the machine, the kernel and the
  load generator alone give at a rate (the floor under the gateway's).

``load`` is the echo counterpart of ``fleetlog simulate``: C picows
connections, each sending M frames shaped like a legacy record, the next one
only once the echo came back; it prints one JSON summary with the same keys
(``records_per_s``, ``ack_p50_ms``, ``ack_p99_ms``), timed the same way (from
before the first connect to the last echo).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
from typing import Any

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from fleetlog.gateway.connection import RECEIVED_AND_STORED
from fleetlog.simulate import connect_with_backoff


class _EchoListener(WSListener):
    """Echoes each data frame, or with ``reply`` writes those bytes instead (read it all the same)."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            payload = frame.get_payload_as_bytes()
            if self.reply is None:
                transport.send(frame.msg_type, payload)
            else:
                transport.underlying_transport.write(self.reply)


async def _serve_picows(host: str, port: int, stop: asyncio.Event, reply: str = "echo") -> None:
    wire = RECEIVED_AND_STORED if reply == "legacy-ack" else None
    server = await ws_create_server(lambda _request: _EchoListener(wire), host, port)
    await stop.wait()
    server.close()


async def _serve_websockets(host: str, port: int, stop: asyncio.Event) -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def echo(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    async with serve(echo, host, port, compression=None):
        await stop.wait()


async def serve_echo(lib: str, host: str, port: int, reply: str = "echo") -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if lib == "picows":
        await _serve_picows(host, port, stop, reply)
    else:
        await _serve_websockets(host, port, stop)


class _Echoed(WSListener):
    """Resolves the waiter of the frame in flight when its echo arrives."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("echo server closed the connection"))


async def _device(url: str, index: int, messages: int, latencies: list[float], deadline: float) -> None:
    # Connect like ``fleetlog simulate`` does, so both loads meet a full accept queue alike.
    transport, listener = await connect_with_backoff(_Echoed, url, deadline, cap=2.0)
    device_id = f"echo-{index:05d}"
    try:
        for seq in range(messages):
            payload = orjson.dumps({"deviceId": device_id, "type": 4, "data": {
                "seq": seq, "ts": int(time.time() * 1000), "level": "info",
                "msg": f"simulated record {seq} from {device_id}"}})
            listener.waiter = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            transport.send(WSMsgType.TEXT, payload)
            await asyncio.wait_for(listener.waiter, timeout=30)
            latencies.append(time.perf_counter() - started)
    finally:
        transport.disconnect()


def _percentile_ms(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else 0.0
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return cuts[min(998, max(0, round(q * 1000) - 1))] * 1000


async def load(url: str, connections: int, messages: int, timeout: float) -> dict[str, Any]:
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    await asyncio.wait_for(
        asyncio.gather(*(_device(url, n, messages, latencies, deadline) for n in range(connections))),
        timeout,
    )
    elapsed = time.perf_counter() - started
    return {
        "connections": connections,
        "acked": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(len(latencies) / elapsed, 1),
        "ack_p50_ms": round(_percentile_ms(latencies, 0.50), 3),
        "ack_p99_ms": round(_percentile_ms(latencies, 0.99), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve")
    server.add_argument("--lib", choices=["picows", "websockets"], required=True)
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--reply", choices=["echo", "legacy-ack"], default="echo",
                        help="legacy-ack (picows only): answer every frame with the legacy pair")
    client = commands.add_parser("load")
    client.add_argument("--url", required=True)
    client.add_argument("--connections", type=int, required=True)
    client.add_argument("--messages", type=int, required=True)
    client.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if args.command == "serve":
        if args.reply != "echo" and args.lib != "picows":
            parser.error("--reply legacy-ack needs --lib picows")
        uvloop.run(serve_echo(args.lib, args.host, args.port, args.reply))
        return 0
    summary = uvloop.run(load(args.url, args.connections, args.messages, args.timeout))
    sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
