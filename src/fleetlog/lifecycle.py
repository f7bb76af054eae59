"""How every fleetlog process stops: a signal asks, a second one forces.

As uvicorn's ``Server`` does it: the handlers only set flags.  The first
SIGINT or SIGTERM sets :attr:`Shutdown.should_exit` and the process runs its
one orderly shutdown path (bounded); a second (of the signals in ``force_on``)
sets :attr:`Shutdown.force_exit` and calls ``on_force``, which does what
forcing means for that process (exit at once, kill its children, cancel the
main task).  Further signals change nothing.

One object serves both kinds of process:

* a thread-based one (the worker, the supervisors, the API under uvicorn):
  :meth:`Shutdown.install` (``signal.signal``, main thread), then wait on or
  poll :attr:`Shutdown.should_exit`, a :class:`threading.Event`;
* an asyncio one (the gateway): :meth:`Shutdown.install_in` (the loop's
  ``add_signal_handler``), then await the :class:`asyncio.Event` it returns.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Collection
from types import FrameType
from typing import Any

__all__ = ["EXIT_FORCED", "SIGNALS", "Shutdown"]

#: 128 + SIGINT, as a shell reports Ctrl-C: the exit code of a process forced to stop.
EXIT_FORCED = 130
#: The signals that ask a fleetlog process to stop.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Shutdown:
    """The stop requests a process received: ``should_exit``, then ``force_exit``.

    ``on_stop`` runs at the first signal (to say so, or to tell a server);
    ``on_force`` at the second of those in ``force_on`` (SIGINT and SIGTERM
    unless told otherwise; a supervisor that takes only a second Ctrl-C for
    "force" passes ``{signal.SIGINT}``).  Both run in the signal handler:
    they must be quick and must not block.
    """

    def __init__(
        self,
        *,
        force_on: Collection[int] = SIGNALS,
        on_stop: Callable[[], object] | None = None,
        on_force: Callable[[], object] | None = None,
    ) -> None:
        self.force_on = frozenset(force_on)
        self.on_stop = on_stop
        self.on_force = on_force
        #: Set at the first signal: run the orderly shutdown.
        self.should_exit = threading.Event()
        #: True after a second signal: the shutdown must not wait any longer.
        self.force_exit = False
        #: The signals received, in order.
        self.received: list[int] = []
        self._event: asyncio.Event | None = None
        self._previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler (also callable directly, as a request to stop)."""
        self.received.append(signum)
        if not self.should_exit.is_set():
            self.should_exit.set()
            if self._event is not None:
                self._event.set()
            if self.on_stop is not None:
                self.on_stop()
        elif signum in self.force_on and not self.force_exit:
            self.force_exit = True
            if self.on_force is not None:
                self.on_force()

    def install(self) -> Shutdown:
        """Take SIGINT and SIGTERM with ``signal.signal`` (main thread only); returns ``self``.

        The main thread must come back to Python often (a timed wait, not a
        bare ``join()``), since that is where the handler runs.  :meth:`restore`
        puts the previous handlers back.
        """
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def install_in(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        """Take SIGINT and SIGTERM in ``loop`` (``add_signal_handler``); await the event returned.

        The event is set at the first signal, with :attr:`should_exit`.
        """
        self._event = asyncio.Event()
        if self.should_exit.is_set():
            self._event.set()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self.handle, signum)
        return self._event
