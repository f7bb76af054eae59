"""Pull the searchable fields out of a record, with no I/O.

Devices send any JSON.  When a record is an object with a time
(``ts``/``time``/``timestamp``), a ``level`` or a message
(``msg``/``message``), the store keeps those in their own columns so that
reads can filter and sort on them; the full record is always kept too.

Those columns are text, and PostgreSQL's text cannot hold U+0000: a NUL a
device sent escaped (``"msg": "a\\u0000b"``) becomes U+FFFD (the replacement
character) in ``level`` and ``message``, on every store alike, so that every
store returns the same columns for the same record.  ``data`` keeps the record
exactly as sent (the ``\\u0000`` escape included); searches look at ``data``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, NamedTuple

from fleetlog.errors import InvalidRequest

__all__ = ["ERROR_LEVELS", "LEVELS", "Fields", "check_level", "column_text", "columns", "extract",
           "normalise_level"]

_TIME_KEYS: Final = ("ts", "time", "timestamp")
_MESSAGE_KEYS: Final = ("msg", "message")

#: Severity order used by ``--level`` (a level shows itself and everything above).
LEVELS: Final = ("trace", "debug", "info", "warn", "error", "fatal")
_ALIASES: Final = {"warning": "warn", "err": "error", "critical": "fatal", "crit": "fatal"}
#: The levels (normalised) that count as an error: a device's ``last_error`` is its newest one.
ERROR_LEVELS: Final = frozenset(("error", "fatal"))


class Fields(NamedTuple):
    ts: int | None
    level: str | None
    message: str | None


#: Each level and alias spelt in lower case, to its level: one dict lookup for the usual record.
_NORMAL: Final = {level: level for level in LEVELS} | _ALIASES


def normalise_level(level: str) -> str:
    normal = _NORMAL.get(level)
    if normal is not None:
        return normal
    lowered = level.strip().lower()
    return _ALIASES.get(lowered, lowered)


def column_text(text: str) -> str:
    """``text`` as a text column holds it on every store: NUL replaced by U+FFFD."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def check_level(level: str) -> str:
    """A level a reader asked for, normalised; :class:`InvalidRequest` naming the levels if unknown."""
    normal = normalise_level(level)
    if normal not in LEVELS:
        raise InvalidRequest(f"unknown level {level!r}: use one of {', '.join(LEVELS)}", "level")
    return normal


def _epoch_ms(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        # Seconds or milliseconds: 1e11 s is the year 5138, 1e11 ms is 1973.
        ms = value if abs(value) >= 1e11 else value * 1000
        return int(ms) if abs(ms) < 1e15 else None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            return None  # a wall-clock time in an unknown zone is not a point in time
        return int(moment.timestamp() * 1000)
    return None


def _first(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    return None


def extract(record: Any) -> Fields:
    """The record's own time (ms), level and message, where it has them."""
    return Fields(*columns(record))


#: Epoch milliseconds a time already is (1973 to 33658): the usual ``ts``, taken as it is.
_MS_LOW: Final = 100_000_000_000
_MS_HIGH: Final = 1_000_000_000_000_000


def columns(record: Any) -> tuple[int | None, str | None, str | None]:
    """:func:`extract` as a plain tuple: the worker's path, once per record stored.

    The usual record (a dict with an integer ``ts`` in ms, a known ``level`` and a
    ``msg``) goes through with a few lookups and no call per field; anything else
    takes the general rules (:func:`_epoch_ms`, :func:`normalise_level`).
    """
    if not isinstance(record, dict):
        return None, None, column_text(record) if isinstance(record, str) else None
    # The first key of each kind that is there, even with a null value: the usual
    # spelling ("ts", "msg") is looked at first, without a loop.
    when = record["ts"] if "ts" in record else _first(record, _TIME_KEYS)
    ts: int | None
    if type(when) is int and _MS_LOW <= when < _MS_HIGH:
        ts = when
    else:
        ts = None if when is None else _epoch_ms(when)
    level = record.get("level")
    level = (_NORMAL.get(level) or column_text(normalise_level(level))) if isinstance(level, str) else None
    message = record["msg"] if "msg" in record else _first(record, _MESSAGE_KEYS)
    if isinstance(message, str):
        if "\x00" in message:
            message = message.replace("\x00", "\ufffd")
    else:
        message = None
    return ts, level, message
