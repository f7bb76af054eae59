"""fleetlog's exceptions, and the error and close codes of the wire protocol.

Every exception fleetlog raises on purpose is defined here and derives from
:class:`FleetlogError`; the modules that raise them import them from here (and
the older import paths, ``fleetlog.store.base.StoreUnavailable`` and the like,
still work)::

    FleetlogError
     ├── FrameError            a device sent a frame fleetlog cannot accept (error frame)
     ├── MessageError          WebSocket frames break the protocol (close with ``code``)
     ├── Refused               a handshake's credentials are missing or wrong (HTTP 401)
     │    └── TooManyAuthFailures  its address failed too many lookups lately (HTTP 429)
     ├── QueueUnavailable      Redis could not be reached or refused: nothing was written
     │    └── QueueClosed      the producer is shutting down: it takes nothing more
     ├── WriteUnconfirmed      the write was sent and may have happened, but was not confirmed
     │    └── NotReplicated    written on the master, not on ``--ack-replicas`` replicas in time
     ├── QueueFull             the backlog is over its limit
     ├── StoreUnavailable      the store cannot be used right now; retrying may succeed
     │    └── ReadTimeout      a read ran past its time budget, or its caller left: it was stopped
     ├── StoreMissing          a reader found no store (nothing is created for it)
     ├── UnsupportedStore      a store URL names no backend fleetlog has (also a ValueError)
     ├── RecordRejected        the store cannot take a record because of its own data
     ├── BatchTooLarge         one write holds more records than a store takes (also a ValueError)
     ├── UnknownDevice         a credential command names a device that has none
     ├── DeviceExists          a device to be given a token has one already
     ├── InvalidDeviceId       a device id breaks the policy (also a ValueError)
     ├── InvalidRequest        a read asks for something malformed: level, time, limit, step, cursor, q
     ├── ConfigError           settings that cannot work together
     ├── ServerError           the embedded Valkey/Redis server
     │    ├── ServerNotFound   no server binary (also a FileNotFoundError)
     │    └── ServerNotReady   it exited at start or did not answer (also a RuntimeError)
     ├── CannotConnect         ``simulate`` cannot connect, and retrying will not help
     ├── UnknownToken          an operator (API) token command names a token that does not exist
     ├── ApiError              the HTTP API could not be reached or refused a request (``send``)
     ├── BodyRefused           an HTTP request body the API will not take (fleetlog.api.limits)
     │    ├── BodyTooLarge     over ``max_command_bytes`` (HTTP 413)
     │    └── BodyTimeout      not sent whole within ``body_timeout`` (HTTP 408)
     ├── InvalidRule           an alert rule that cannot be saved (also a ValueError)
     │    └── ConditionTooCostly  its condition ran past its time or memory on records (preview)
     ├── UnknownRule           no alert rule of that name
     └── RuleExists            an alert rule of that name exists already
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an error frame (docs/CONTRACT.md)."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    #: The write reached Redis (or may have) but was not confirmed: a v2 resend of the
    #: same frame id is deduplicated; a legacy resend may store the record twice.
    UNCONFIRMED = "unconfirmed"


class CloseCode(IntEnum):
    """Every WebSocket close code the gateway sends (RFC 6455 §7.4, and docs/CONTRACT.md's own)."""

    NORMAL = 1000  #: idle timeout
    GOING_AWAY = 1001  #: the gateway is shutting down; reconnect elsewhere or later
    PROTOCOL_ERROR = 1002  #: frames that break RFC 6455
    POLICY_VIOLATION = 1008  #: too many connections from one address
    MESSAGE_TOO_BIG = 1009  #: a message over ``max_message_bytes``
    REVOKED = 4401  #: the device's token was revoked or rotated
    TAKEN_OVER = 4409  #: a newer connection of the same device replaced this one


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
    """Raised when Redis could not be reached, or refused the write: nothing was queued.

    Only raised when it is certain that nothing was written (the call never
    left, or Redis answered it with an error before running it), so a device
    told ``unavailable`` may send the same records again without a duplicate.
    """


class WriteUnconfirmed(FleetlogError):
    """Raised when a write was sent but its success was not confirmed (not acked).

    The connection failed or timed out after the call left, or the replicas
    did not confirm it in time: the records may be queued.  Told apart from
    :class:`QueueUnavailable` so that a refusal never claims "not stored" for
    records that were (the wire code ``unconfirmed``).
    """


class NotReplicated(WriteUnconfirmed):
    """Raised when queued records did not reach ``--ack-replicas`` replicas in time (not acked)."""


class QueueClosed(QueueUnavailable):
    """Raised when records are submitted to a producer that is closing or closed."""


class QueueFull(FleetlogError):
    """Raised when the queue's backlog is over ``max_backlog``."""


class ConfigError(FleetlogError):
    """Raised when settings are individually valid but cannot work together."""


class MessageError(FleetlogError):
    """Raised when frames break the protocol; the connection must close with ``code``."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Refused(FleetlogError):
    """Raised when a handshake's credentials are missing or wrong (HTTP 401)."""


class TooManyAuthFailures(Refused):
    """Raised when an address failed too many token lookups lately (HTTP 429, ``Retry-After``)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed authentications from this address; retry in "
                         f"{retry_after:.1f}s")
        self.retry_after = retry_after


class StoreUnavailable(FleetlogError):
    """Raised when the store cannot be written or read right now; retrying may succeed."""


class ReadTimeout(StoreUnavailable):
    """Raised when a read ran past its time budget, or was cancelled, and was stopped.

    (See :class:`fleetlog.store.base.ReadLimit`.)  ``cancelled`` is True when
    its caller stopped it (an HTTP client that went away), False for the budget.
    """

    def __init__(self, message: str, *, cancelled: bool = False) -> None:
        super().__init__(message)
        self.cancelled = cancelled


class StoreMissing(FleetlogError):
    """Raised when a reader opens a store that does not exist (nothing is created)."""


class UnsupportedStore(FleetlogError, ValueError):
    """Raised when a store URL names no backend fleetlog has; the message lists those it has."""


class RecordRejected(FleetlogError):
    """Raised when the store cannot take a record because of the record's own data."""


class BatchTooLarge(FleetlogError, ValueError):
    """Raised when one :meth:`~fleetlog.store.base.Store.write_batch` holds more records
    than the store takes in one transaction: the caller must split it (nothing was written)."""


class UnknownDevice(FleetlogError):
    """Raised when a credential command names a device that has none."""


class DeviceExists(FleetlogError):
    """Raised when ``device add`` names a device that has a token already."""


class InvalidDeviceId(FleetlogError, ValueError):
    """Raised when a device id breaks the policy; the message says which rule."""


class InvalidRequest(FleetlogError, ValueError):
    """Raised when a read asks for something malformed (level, time, limit, step, cursor, q).

    ``field`` names the parameter at fault (``level``, ``since``...), for a
    front end to point at; the message says what is wrong with it.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ServerError(FleetlogError):
    """Raised when the embedded Valkey/Redis server cannot be found or started."""


class ServerNotFound(ServerError, FileNotFoundError):
    """Raised when no Valkey/Redis server binary is installed."""


class ServerNotReady(ServerError, RuntimeError):
    """Raised when the server exits at start or does not answer PING in time."""


class CannotConnect(FleetlogError):
    """Raised when ``simulate`` cannot connect for a reason that retrying will not fix."""


class UnknownToken(FleetlogError):
    """Raised when ``api-token revoke`` names a token that does not exist."""


class ApiError(FleetlogError):
    """Raised when the HTTP API could not be reached or refused the request."""


class BodyRefused(FleetlogError):
    """Raised while an API request's body is read, when it cannot be taken; answered with
    ``status_code`` and ``detail`` (see :mod:`fleetlog.api.limits`)."""

    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BodyTooLarge(BodyRefused):
    """Raised when a request body goes over ``max_command_bytes``."""

    status_code = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes (max_command_bytes)")


class BodyTimeout(BodyRefused):
    """Raised when a request body is not sent whole within ``body_timeout``."""

    status_code = 408

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s (body_timeout)")


class InvalidRule(FleetlogError, ValueError):
    """Raised for an alert rule that cannot be saved: ``field`` names what is wrong,
    ``position`` where (line, column)."""

    def __init__(self, message: str, field: str | None = None,
                 position: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.position = position


class ConditionTooCostly(InvalidRule):
    """Raised when a condition tried on records ran past its time or memory (the API's preview:
    :mod:`fleetlog.alerts.sandbox`); answered as an invalid rule's ``when``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "when")


class UnknownRule(FleetlogError):
    """Raised when no alert rule has that name."""


class RuleExists(FleetlogError):
    """Raised when an alert rule of that name exists already."""
