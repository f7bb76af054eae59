"""The device port's listening sockets: accept, pause, resume, and uvloop's own transports.

Every accepted socket becomes a transport of the running loop
(``loop.connect_accepted_socket``: uvloop's ``TCPTransport``, or its TLS
transport).  picows' default, aiofastnet's ``SelectorSocketTransport``, keeps
an array of 256 ``iovec`` inside every transport object: 4,296 bytes per
transport, most of an idle connection's memory (14.2 KiB per connection with
it, 9.0 KiB with uvloop's, 10,000 idle devices).

The accept loop is the gateway's own so that accepting can be paused and
resumed (:meth:`Listener.pause`, :meth:`Listener.resume`: connections wait in
the kernel's accept queue meanwhile), which the gateway does near its
descriptor limit; a failed ``accept()`` for want of descriptors or memory
pauses it for a second instead of spinning on a socket that stays readable.
"""

from __future__ import annotations

import asyncio
import collections.abc
import errno
import itertools
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

__all__ = ["Listener", "listen"]

log = logging.getLogger("fleetlog.gateway")

#: ``accept()`` failures that mean "no descriptor or memory now": retry after this many seconds.
_OUT_OF_RESOURCES: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_ACCEPT_RETRY_DELAY: Final = 1.0


class Listener:
    """Listening sockets that hand every connection to ``protocol_factory``'s protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                 protocol_factory: Callable[[], asyncio.BaseProtocol], *,
                 ssl_context: ssl.SSLContext | None, backlog: int) -> None:
        self._loop = loop
        self._sockets = sockets
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._backlog = backlog
        #: Connections between accept() and their transport (a task each, held until done).
        self._starting: set[asyncio.Task[None]] = set()
        self._paused = False  # by pause()
        self._retry: asyncio.TimerHandle | None = None  # backing off after a failed accept()
        self._reading = False
        for sock in sockets:
            sock.listen(backlog)
        self._update()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def pause(self) -> None:
        """Accept nothing until :meth:`resume`; new connections wait in the kernel's queue."""
        self._paused = True
        self._update()

    def resume(self) -> None:
        self._paused = False
        self._update()

    def close(self) -> None:
        """Stop listening (open connections stay)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._paused = True
        self._update()
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def _update(self) -> None:
        """Watch the sockets while neither paused nor backing off, and only then."""
        reading = not self._paused and self._retry is None
        if reading != self._reading:
            self._reading = reading
            for sock in self._sockets:
                if reading:
                    self._loop.add_reader(sock.fileno(), self._accept, sock)
                else:
                    self._loop.remove_reader(sock.fileno())

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(self._backlog + 1):
            try:
                sock, _addr = listening.accept()
            except ConnectionAbortedError:
                continue  # gone before accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise  # the loop logs it
                log.warning("accept() failed (%s): not accepting for %.0f s", exc, _ACCEPT_RETRY_DELAY)
                if self._retry is None:
                    self._retry = self._loop.call_later(_ACCEPT_RETRY_DELAY, self._retry_accepting)
                    self._update()
                return
            sock.setblocking(False)
            task = self._loop.create_task(self._start(sock))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _retry_accepting(self) -> None:
        self._retry = None
        self._update()

    async def _start(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock, ssl=self._ssl)
        except OSError:  # ssl.SSLError and TimeoutError too
            sock.close()  # reset, or a failed TLS handshake: the device's business
        except Exception:
            sock.close()
            log.exception("could not set up an accepted connection")


async def listen(protocol_factory: Callable[[], asyncio.BaseProtocol], host: str | list[str],
                 port: int, *, ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False,
                 backlog: int = 100) -> Listener:
    """Bind and listen on every address of ``host`` (``""``: all), as ``loop.create_server`` does.

    Each address once; IPv6 sockets are IPv6 only (``127.0.0.1,::1`` is two
    sockets on one port); ``SO_REUSEADDR`` always, ``SO_REUSEPORT`` when
    asked (several processes on one port, the kernel spreads the connections).
    """
    loop = asyncio.get_running_loop()
    hosts: list[str | None]
    if host == "":
        hosts = [None]
    elif isinstance(host, str) or not isinstance(host, collections.abc.Iterable):
        hosts = [host]
    else:
        hosts = list(host)
    found = await asyncio.gather(*(loop.getaddrinfo(one, port, family=socket.AF_UNSPEC,
                                                    type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                                   for one in hosts))
    infos: dict[Any, None] = dict.fromkeys(itertools.chain.from_iterable(found))
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # a family this host lacks
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:  # the family is not enabled
                    sockets.pop().close()
                    continue
                raise OSError(exc.errno, f"error while attempting to bind on address "
                                         f"{address!r}: {str(exc).lower()}") from None
        if not sockets:
            raise OSError(f"could not bind on any address out of {[info[4] for info in infos]!r}")
        for sock in sockets:
            sock.setblocking(False)
        return Listener(loop, sockets, protocol_factory, ssl_context=ssl_context, backlog=backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
