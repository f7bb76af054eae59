"""fleetlog's exceptions and the error codes of the wire protocol.

::

    FleetlogError
     ├── FrameError          a device sent a frame fleetlog cannot accept
     ├── QueueUnavailable    Redis could not be reached or did not answer
     │    └── QueueClosed    the producer is shutting down: it takes nothing more
     ├── QueueFull           the backlog is over its limit
     └── ConfigError         settings that cannot work together
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an error frame (CONTRACT.md)."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"


class FleetlogError(Exception):
    """Root of every exception fleetlog raises on purpose."""


class FrameError(FleetlogError):
    """Raised when a device's frame cannot be accepted; ``code`` goes on the wire."""

    def __init__(self, code: ErrorCode, message: str, frame_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id
        #: True when the frame was a v2 ``log`` frame (its error is not preceded
        #: by the legacy ``server receive a message!``).
        self.v2 = False


class QueueUnavailable(FleetlogError):
    """Raised when Redis could not be reached, or failed, while queueing."""


class QueueClosed(QueueUnavailable):
    """Raised when records are submitted to a producer that is closing or closed."""


class QueueFull(FleetlogError):
    """Raised when the queue's backlog is over ``max_backlog``."""


class ConfigError(FleetlogError):
    """Raised when settings are individually valid but cannot work together."""
