"""A TCP fault proxy for the fault suite: partitions, slow replies, links cut mid-frame.

``tc netem`` is not available here, so a link under test goes through this
proxy (127.0.0.1 only): point the client at :attr:`FaultProxy.port` and the
proxy connects each of its connections to the server.  Modes switch at runtime,
from the test's thread:

* pass-through (the default, and :meth:`heal`);
* :meth:`blackhole`: a partition that drops packets.  Nothing passes in either
  direction and no socket is closed or reset; a new connection is accepted but
  not connected onwards, so it hangs like a SYN that gets no answer.  What either
  end sends meanwhile is held, and delivered once the partition heals, as TCP
  retransmission would (an end that gave up and closed meanwhile has its bytes,
  then its FIN, delivered after the heal).  ``heal(reset=True)`` instead resets
  every connection open during the partition, dropping what was held (TCP gave up);
* :meth:`blackhole_on`: the same partition, starting right after the next chunk
  of at least ``min_bytes`` in one direction (a batch just read, a COPY just sent);
* :meth:`delay`: every server-to-client chunk is delivered ``seconds`` after it
  arrived (order kept): a server that answers slowly;
* :meth:`cut_mid_frame`: the next ``count`` chunks in one direction (not a
  connection's first one, the WebSocket handshake) are cut: only part of each is
  forwarded, its connection stalls (nothing more passes either way), and
  ``stall`` seconds later both its sockets are reset.

The proxy runs its own event loop in a daemon thread; :meth:`close` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]  # up: client to server; down: server to client

_CHUNK = 65536
_POLL_S = 0.01


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and (once connected) the server's."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    stalled: bool = False  # cut mid-frame: nothing more passes, reset soon
    opened_in_partition: bool = False
    chunks: Counter[str] = field(default_factory=Counter)  # chunks forwarded per direction

    def abort(self) -> None:
        """Reset both sockets (RST, not FIN): the link is dead, not closed."""
        for writer in (self.client, self.server):
            if writer is not None:
                sock = writer.transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()


class FaultProxy:
    """See the module docstring; ``target_port`` is the server's port on 127.0.0.1."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._partitioned = False
        self._delay = 0.0
        self._cuts: tuple[int, Direction, float, float] | None = None  # left, direction, keep, stall
        self._trip: tuple[Direction, int] | None = None
        #: When the partition armed by :meth:`blackhole_on` started (monotonic); None: not yet.
        self.tripped_at: float | None = None
        #: connections, chunks and bytes forwarded per direction, cuts made, resets at heal.
        self.stats: Counter[str] = Counter()
        self.port = 0

    # -- control (from the test's thread) -------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def _do(self, action: object) -> None:
        """Run ``action`` (a no-argument callable) in the proxy's loop, and wait for it."""
        async def run() -> None:
            action()  # type: ignore[operator]
        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def blackhole(self) -> None:
        def go() -> None:
            self._partitioned = True
        self._do(go)

    def blackhole_on(self, direction: Direction, min_bytes: int) -> None:
        def arm() -> None:
            self.tripped_at = None
            self._trip = (direction, min_bytes)
        self._do(arm)

    def heal(self, *, reset: bool = False) -> None:
        """Back to pass-through (no partition, no delay, no cut armed)."""
        def go() -> None:
            if reset:
                for link in list(self._links):
                    self.stats["reset at heal"] += 1
                    link.abort()
            self._partitioned = False
            self._trip = None
            self._delay = 0.0
            self._cuts = None
        self._do(go)

    def delay(self, seconds: float) -> None:
        def go() -> None:
            self._delay = seconds
        self._do(go)

    def cut_mid_frame(self, count: int = 1, *, direction: Direction = "up", keep: float = 0.5,
                      stall: float = 2.0) -> None:
        def go() -> None:
            self._cuts = (count, direction, keep, stall)
        self._do(go)

    def cuts_left(self) -> int:
        cuts = self._cuts
        return 0 if cuts is None else cuts[0]

    def wait_tripped(self, timeout: float) -> float:
        """Wait for the partition armed by :meth:`blackhole_on`; when it started (monotonic)."""
        deadline = time.monotonic() + timeout
        while self.tripped_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the armed partition never started: no chunk that big passed")
            time.sleep(0.01)
        return self.tripped_at

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.abort()
            await asyncio.sleep(0)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    # -- the loop's side ------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        sock: socket.socket = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def _passable(self, link: _Link) -> bool:
        """Wait while a partition holds ``link``; False: it was cut, nothing passes any more."""
        while self._partitioned and not link.stalled:  # noqa: ASYNC110 (two flags, set anywhere)
            await asyncio.sleep(_POLL_S)
        return not link.stalled

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, opened_in_partition=self._partitioned)
        self._links.add(link)
        self.stats["connections"] += 1
        try:
            if not await self._passable(link):  # no SYN gets through a partition
                return
            try:
                up_reader, link.server = await asyncio.open_connection(*self.target)
            except OSError:
                return
            await asyncio.gather(self._pipe(link, reader, link.server, "up"),
                                 self._pipe(link, up_reader, writer, "down"))
        finally:
            self._links.discard(link)
            for end in (link.client, link.server):
                if end is not None:
                    end.close()

    async def _pipe(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: Direction) -> None:
        """Read chunks as they come (stamped), deliver them in order when they may pass."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.ensure_future(self._deliver(link, queue, writer, direction))
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                delay = self._delay if direction == "down" else 0.0
                queue.put_nowait((time.monotonic() + delay, data))
                if not data:
                    break
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(self, link: _Link, queue: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter, direction: Direction) -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not await self._passable(link):  # held through a partition; dropped once cut
                return
            if not data:  # the sender closed: pass its FIN on
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            cuts = self._cuts
            if cuts is not None and cuts[1] == direction and link.chunks[direction] > 0:
                left, _, keep, stall = cuts
                self._cuts = (left - 1, *cuts[1:]) if left > 1 else None
                link.stalled = True
                self.stats["cuts " + direction] += 1
                writer.write(data[:max(1, min(len(data) - 1, int(len(data) * keep)))])
                asyncio.get_running_loop().call_later(stall, link.abort)
                return
            writer.write(data)
            link.chunks[direction] += 1
            self.stats[f"chunks {direction}"] += 1
            self.stats[f"bytes {direction}"] += len(data)
            trip = self._trip
            if trip is not None and trip[0] == direction and len(data) >= trip[1]:
                self._trip = None
                self._partitioned = True
                self.tripped_at = time.monotonic()
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return
