"""A log line per interval, with a count, for events a hostile client can repeat at will.

A flood of refused handshakes or failed lookups must not become a flood of
log lines (one WARNING per 503 once wrote 8,479 lines in seconds): the first
occurrence is logged at once, later ones within ``interval`` are counted and
summed up in the next line.
"""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """:meth:`note` logs at most one WARNING per ``interval`` seconds, saying how many it stood for."""

    __slots__ = ("_last", "_log", "_quiet", "interval", "total")

    def __init__(self, log: logging.Logger, *, interval: float = 10.0) -> None:
        self._log = log
        self.interval = interval
        self._last = float("-inf")
        self._quiet = 0  # noted since the last line
        #: Every event noted, logged or not.
        self.total = 0

    def note(self, message: str, now: float | None = None) -> bool:
        """Count one event; log ``message`` unless a line went out within ``interval``.

        Returns whether a line was written.
        """
        now = time.monotonic() if now is None else now
        self.total += 1
        if now - self._last < self.interval:
            self._quiet += 1
            return False
        if self._quiet:
            self._log.warning("%s (and %d more like it in the last %.0fs)",
                              message, self._quiet, now - self._last)
        else:
            self._log.warning("%s", message)
        self._last = now
        self._quiet = 0
        return True
