"""JSON as devices send it, decoded and encoded without changing a value.

One decoder for a record's JSON wherever it is read (the gateway, the store,
search, the CLI's output), so that whatever the gateway accepts and acks, every
later reader can take too.  orjson does the work; two cases it cannot do go
another way or are refused up front:

* integers beyond 64 bits: orjson reads them as doubles, silently changing a
  value (``12345678901234567890123`` becomes ``1.2345678901234568e+22``) or
  failing when the double overflows (a 400-digit id); the stdlib keeps them exact;
* nesting deeper than :data:`MAX_DEPTH`: orjson reads 1,024 levels but writes
  254, and the stdlib recurses in Python; a record nested deeper is refused with
  a :class:`ValueError` that says so, never a :class:`RecursionError`.

Either way a lone surrogate escape (``"\\ud800"``) is refused, as orjson refuses
it: it has no UTF-8 form, and no store could keep it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import orjson

__all__ = ["MAX_DEPTH", "dumps", "loads", "may_change"]

#: Levels of arrays and objects a value may have: what orjson can write back.
MAX_DEPTH: Final = 254

#: Integers of 19 digits or more may not fit in 64 bits.  To find one, every
#: ASCII digit becomes "0" and every other byte a space, and the run of 19 zeros
#: is looked for: two passes at C speed, where a regex (\d{19}) tried every digit
#: as a start and took a tenth of the gateway's time on v2 frames.
_DIGITS_AS_ZEROS: Final = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_INTEGER: Final = b"0" * 19


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text} is out of range")
    return value


def _too_deep() -> ValueError:
    return ValueError(f"nested deeper than {MAX_DEPTH} levels")


def _depth(value: Any) -> int:
    """Levels of arrays and objects in ``value``, counted without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def may_change(raw: bytes) -> bool:
    """Whether orjson could read a number of ``raw`` as another (an integer of 19+ digits).

    For a reader that decodes with orjson first and needs the exact value only
    where it differs (two passes at C speed over the bytes).
    """
    return _LONG_INTEGER in raw.translate(_DIGITS_AS_ZEROS)


def loads(data: bytes) -> Any:
    """Decode strict JSON exactly: fast with orjson, exact for integers beyond 64 bits.

    Raises :class:`ValueError` on anything that is not strict JSON (NaN,
    Infinity, a number out of range, bytes that are not UTF-8, nesting orjson
    refuses).
    """
    if not may_change(data):
        return orjson.loads(data)
    try:
        value = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise _too_deep() from None
    if b"\\u" in data:  # the stdlib reads a lone surrogate escape (\ud800), orjson refuses it
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("a lone surrogate (\\ud800 to \\udfff) is not Unicode") from None
    return value


def dumps(value: Any) -> bytes:
    """Encode compactly with Unicode unescaped, as the original server did.

    Raises :class:`ValueError` for what has no JSON form here: nesting deeper
    than :data:`MAX_DEPTH`, a lone surrogate (the stdlib decoder lets one through).
    """
    try:
        # orjson's bytes keep a 4 KiB allocation however short they are; records
        # wait in memory until Redis has them, so keep an exact-size copy.
        return memoryview(orjson.dumps(value)).tobytes()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, or too deep
        if _depth(value) > MAX_DEPTH:
            raise _too_deep() from None
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
