"""One retry policy for everything that waits to try again: capped exponential, full jitter.

Workers, gateways and simulated devices all retry against the same Redis or
gateway after the same outage; without jitter they would all come back at the
same instant and knock it over again.  Full jitter (a delay drawn uniformly
from zero to the current ceiling) spreads them most for the same mean wait
(see "Exponential Backoff And Jitter", AWS Architecture Blog, 2015).
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["Backoff", "retry"]

T = TypeVar("T")


class Backoff:
    """Delays for successive attempts; call :meth:`reset` after a success.

    The ceiling starts at ``initial`` and doubles on every :meth:`next_delay`
    up to ``cap``; each delay is drawn from ``[0, ceiling]``.  Not thread-safe:
    one per retry loop.
    """

    __slots__ = ("_attempt", "cap", "initial")

    def __init__(self, initial: float = 0.1, cap: float = 5.0) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"need 0 < initial <= cap, got initial={initial}, cap={cap}")
        self.initial = initial
        self.cap = cap
        self._attempt = 0

    @property
    def attempts(self) -> int:
        """Delays handed out since the last :meth:`reset` (failures in a row)."""
        return self._attempt

    def ceiling(self) -> float:
        """The largest delay the next :meth:`next_delay` may return."""
        # Stop doubling once over the cap: 2**attempt must not grow without bound.
        return min(self.cap, self.initial * 2.0 ** min(self._attempt, 64))

    def next_delay(self) -> float:
        """The time to wait before the next attempt, in seconds."""
        ceiling = self.ceiling()
        self._attempt += 1
        return random.uniform(0.0, ceiling)

    async def sleep(self) -> float:
        """``await asyncio.sleep(self.next_delay())``; returns the delay slept."""
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        """After a success: the next failure starts again from ``initial``."""
        self._attempt = 0


def retry(
    operation: Callable[[], T],
    errors: tuple[type[BaseException], ...],
    backoff: Backoff,
    stopping: threading.Event,
    describe: Callable[[BaseException, float], object],
    *,
    deadline: float = math.inf,
    finish_when_stopping: bool = False,
) -> T | None:
    """``operation()``'s result, tried again after each failure in ``errors``; None if given up.

    After a failure, ``describe(exc, delay)`` says so (the caller's log line)
    and the retry waits ``delay`` (from ``backoff``), cut short by ``stopping``
    or at ``deadline`` (``time.monotonic()``); it gives up when either comes.
    ``backoff`` is reset after a success, so a caller may keep one across calls.
    With ``finish_when_stopping`` (an ack: what it acknowledges is stored) a stop
    cuts the wait short but the operation is still tried once more, and a
    failure once stopping gives up at once, without a word.  ``operation``
    must not return None.  Exceptions not in ``errors`` escape.
    """
    while True:
        try:
            result = operation()
        except errors as exc:
            if finish_when_stopping and stopping.is_set():
                return None
            delay = backoff.next_delay()
            describe(exc, delay)
            stopped = stopping.wait(min(delay, max(0.0, deadline - time.monotonic())))
            if (stopped and not finish_when_stopping) or time.monotonic() >= deadline:
                return None
        else:
            backoff.reset()
            return result
