"""Local TCP ports: pick a free one, and wait until a server listens on one.

``fleetlog up``, the tests and the benchmarks all start a server process and
must wait until it accepts connections, giving up early if the process died;
this is the one way they do it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from enum import Enum
from typing import Final

__all__ = ["PortWait", "free_port", "listening", "wait_for_port"]

#: Between two connection attempts: short next to a server's start (tenths of a
#: second), long enough not to spin.
_POLL_INTERVAL: Final = 0.05
#: One connection attempt: a listening server on 127.0.0.1 answers in microseconds.
_CONNECT_TIMEOUT: Final = 0.5


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick); another program may take it first."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


class PortWait(Enum):
    """How :func:`wait_for_port` ended."""

    LISTENING = "listening"
    GONE = "gone"  #: ``gone()`` said so: the server exited (or the wait was called off)
    TIMED_OUT = "timed out"


def wait_for_port(
    port: int,
    *,
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    gone: Callable[[], bool] = lambda: False,
) -> PortWait:
    """Wait until something listens on ``host:port``, at most ``timeout`` seconds.

    ``gone`` is asked before each attempt; when it returns True (the process
    that should listen has exited) the wait ends at once.  The caller turns
    :attr:`PortWait.GONE` and :attr:`PortWait.TIMED_OUT` into its own error,
    with what it knows (the exit code, the process's log).
    """
    deadline = time.monotonic() + timeout
    while True:
        if gone():
            return PortWait.GONE
        if listening(port, host):
            return PortWait.LISTENING
        if time.monotonic() >= deadline:
            return PortWait.TIMED_OUT
        time.sleep(_POLL_INTERVAL)
