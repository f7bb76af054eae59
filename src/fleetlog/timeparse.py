"""Parse the times users type (``--since 1h``, ``--until 2026-11-26T10:00Z``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

__all__ = ["parse_duration", "parse_time"]

_RELATIVE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
                   "w": 604_800_000}


#: Times fleetlog reads and writes: from the epoch to the end of year 9999.
_LATEST_MS: Final = 253_402_300_800_000


def parse_duration(text: str) -> int:
    """Milliseconds in a duration such as ``90s``, ``12h`` or ``30d``; ValueError if not one."""
    match = _RELATIVE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (30s, 15m, 1h, 2d, 1w)")
    amount, unit = match.groups()
    ms = float(amount) * _UNIT_MS[unit]
    if ms > _LATEST_MS:
        raise ValueError(f"{text!r} is longer than fleetlog can count (over 8,000 years)")
    return int(ms)


def parse_time(text: str, now_ms: int) -> int:
    """Milliseconds since the epoch for ``text``.

    ``text`` is either a duration ago (``90s``, ``15m``, ``1h``, ``2d``, ``1w``)
    or an ISO 8601 date or time; one without a zone is taken as UTC.
    Raises :class:`ValueError` with a message fit for the user.
    """
    if _RELATIVE.match(text):
        return max(0, now_ms - parse_duration(text))
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30s, 15m, 1h, 2d, 1w) nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)  # datetime itself stops at year 9999
