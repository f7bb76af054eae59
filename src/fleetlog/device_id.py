"""What a device id may be: one policy, pure, used wherever an id enters fleetlog.

A device id ends up in Redis keys, SQLite rows, daily-file lines, log lines
and terminal tables, and it is chosen by firmware or by whoever mints JWTs.  So it must be short and
printable, and two ids that look the same should be the same:

* 1 to :data:`MAX_LENGTH` (128) characters;
* no control, format or separator characters (Unicode categories ``Cc``,
  ``Cf``, ``Cs``, ``Zl``, ``Zp``): no newline or escape sequence to forge a
  log line or repaint a terminal, no zero-width or bidi character to make two
  ids look alike, no lone surrogate that has no UTF-8 form;
* no leading or trailing whitespace.

Anything else is allowed, ``:`` and non-ASCII letters included (Redis keys
are escaped by :mod:`fleetlog.keys`).  The checks apply at ``fleetlog device
add``, to a JWT's ``sub`` and to a frame's ``deviceId``.
"""

from __future__ import annotations

import unicodedata
from typing import Final

from fleetlog.errors import InvalidDeviceId

__all__ = ["MAX_LENGTH", "InvalidDeviceId", "check_device_id", "device_id_problem"]

MAX_LENGTH: Final = 128

#: Control, format, surrogate, line and paragraph separator characters.
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_EDGE_SPACE: Final = "device id starts or ends with whitespace"


def device_id_problem(device_id: str) -> str | None:
    """Why ``device_id`` is not a valid device id, or ``None`` if it is.

    The reason never quotes the id itself: it may be 10 KB long or carry a
    terminal escape sequence.
    """
    if not device_id:
        return "device id is empty"
    if len(device_id) > MAX_LENGTH:
        return f"device id is longer than {MAX_LENGTH} characters ({len(device_id)})"
    if device_id.isascii() and device_id.isprintable():  # the usual id: no category lookups
        return None if device_id[0] != " " and device_id[-1] != " " else _EDGE_SPACE
    for position, char in enumerate(device_id):
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return (f"device id has a control, format or separator character "
                    f"(U+{ord(char):04X} at position {position})")
    if device_id != device_id.strip():
        return _EDGE_SPACE
    return None


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is valid; raise :class:`InvalidDeviceId` saying why not."""
    problem = device_id_problem(device_id)
    if problem is not None:
        raise InvalidDeviceId(problem)
    return device_id
