"""What ``--grep`` and the API's ``q`` match against, with no I/O.

A search is plain text, never a query language, and it matches the record as
the device sent it: the decoded strings of its JSON (keys and values, numbers
as written), not the JSON encoding.  So ``\\`` does not match a record that
only holds an escaped quote, and ``"`` matches a quote character in a value.
Both sides are Unicode case-folded (``str.casefold``), so ``café`` finds
``CAFÉ`` and ``straße`` finds ``STRASSE``.

Every backend computes the searchable text with :func:`search_text` and the
needle with :func:`search_needle`, so whichever part of a store answers (an
index, or a scan of records not indexed yet) the answer is the same.  Both
replace NUL (which PostgreSQL's text cannot hold) with U+FFFD, as the text
columns do (:func:`fleetlog.store.fields.column_text`): a needle holding a NUL
finds the records whose text holds one there, on every store.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from fleetlog import exactjson
from fleetlog.store.fields import column_text

__all__ = ["SEPARATOR", "search_needle", "search_text"]

#: Between the strings of one record, so that a needle never spans two values
#: unless it holds this (unit separator) character itself.
SEPARATOR: Final = "\x1f"


def _strings(value: Any) -> tuple[list[str], bool]:
    """The strings of a decoded record in document order (keys, values, and numbers and
    booleans as JSON writes them), and whether it holds a float; without recursion,
    however deep the record."""
    strings: list[str] = []
    append = strings.append
    floats = False
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            append(item)
        elif kind is dict:
            for key, child in reversed(item.items()):
                stack.append(child)
                stack.append(key)
        elif kind is list:
            stack.extend(reversed(item))
        elif item is not None:
            floats = floats or kind is float
            append(str(item) if kind is int else orjson.dumps(item).decode())  # any size
    return strings, floats


def search_text(data: str | bytes) -> str:
    """The case-folded text a search looks in: a record's decoded strings, joined.

    ``data`` is the record's JSON as stored; text that is not JSON is searched
    as it is.  Decoded with orjson, and again exactly only when a float in it
    may be an integer orjson could not hold (:func:`fleetlog.exactjson.may_change`).
    """
    raw = data.encode(errors="surrogatepass") if isinstance(data, str) else data
    try:
        strings, floats = _strings(orjson.loads(raw))
        if floats and exactjson.may_change(raw):
            strings, _ = _strings(exactjson.loads(raw))
    except ValueError:  # not JSON (or an integer no double holds: the exact path reads it)
        try:
            strings, _ = _strings(exactjson.loads(raw))
        except ValueError:
            text = data if isinstance(data, str) else raw.decode(errors="replace")
            return column_text(text.casefold())
    return column_text(SEPARATOR.join(strings).casefold())


def search_needle(text: str) -> str:
    """What to look for in :func:`search_text`: the user's text, case-folded."""
    return column_text(text.casefold())
