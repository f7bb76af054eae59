"""Pull the searchable fields out of a record, with no I/O.

Devices send any JSON.  When a record is an object with a time
(``ts``/``time``/``timestamp``), a ``level`` or a message
(``msg``/``message``), the store keeps those in their own columns so that
reads can filter and sort on them; the full record is always kept too.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final, NamedTuple

__all__ = ["LEVELS", "Fields", "check_level", "extract", "normalise_level", "search_text"]

_TIME_KEYS: Final = ("ts", "time", "timestamp")
_MESSAGE_KEYS: Final = ("msg", "message")

#: Severity order used by ``--level`` (a level shows itself and everything above).
LEVELS: Final = ("trace", "debug", "info", "warn", "error", "fatal")
_ALIASES: Final = {"warning": "warn", "err": "error", "critical": "fatal", "crit": "fatal"}


class Fields(NamedTuple):
    ts: int | None
    level: str | None
    message: str | None


def normalise_level(level: str) -> str:
    lowered = level.strip().lower()
    return _ALIASES.get(lowered, lowered)


def check_level(level: str) -> str:
    """A level a reader asked for, normalised; ValueError naming the levels if unknown."""
    normal = normalise_level(level)
    if normal not in LEVELS:
        raise ValueError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")
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
    if not isinstance(record, dict):
        return Fields(None, None, record if isinstance(record, str) else None)
    level = record.get("level")
    message = _first(record, _MESSAGE_KEYS)
    return Fields(
        _epoch_ms(_first(record, _TIME_KEYS)),
        normalise_level(level) if isinstance(level, str) else None,
        message if isinstance(message, str) else None,
    )


# A JSON escape: a surrogate pair first (an emoji), then any single one.
_ESCAPE: Final = re.compile(
    r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|\\u([0-9a-f]{4})|\\(.)",
    re.IGNORECASE | re.DOTALL,
)
_SIMPLE: Final = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                  "t": "\t"}


def _unescape(match: re.Match[str]) -> str:
    high, low, single, simple = match.groups()
    if high is not None:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    if single is not None:
        code = int(single, 16)
        # A lone surrogate cannot be text; NUL cannot be kept in PostgreSQL's text.
        return "\ufffd" if code == 0 or 0xD800 <= code <= 0xDFFF else chr(code)
    return _SIMPLE.get(simple, simple)


def search_text(data: str) -> str:
    """The text a search looks in: the record as the device sent it, JSON escapes undone.

    ``{"msg":"say \\"hi\\""}`` is searched as ``{"msg":"say "hi""}``, so a
    search for ``\\`` finds only records that hold a backslash, not every one
    with a quote, and ``"hi"`` finds this one.  Keys, numbers and punctuation
    stay, so a JSON fragment as typed (``"level":"error"``) is found too.  In
    valid JSON a backslash only ever starts an escape inside a string, so most
    records (no backslash at all) are their own search text.
    """
    if "\\" not in data:
        return data
    return _ESCAPE.sub(_unescape, data)
