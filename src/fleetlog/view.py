"""How records and devices are printed (text for people, JSON lines for scripts and files).

Everything a device sends is untrusted text.  Printed as it is, a ``msg``
holding a newline forges a second log line and an ESC sequence rewrites the
operator's terminal, so text output passes every device-supplied string
through :func:`safe_text`, and JSON output guarantees one object per line
(:func:`record_line`, shared by ``fleetlog logs --json`` and the daily files).
"""

from __future__ import annotations

import re
from typing import Final

import orjson

from fleetlog import exactjson
from fleetlog.records import StoredRecord, iso_ms

__all__ = ["file_line", "record_json", "record_line", "record_text", "safe_text"]

#: Characters that move the cursor, end a line, reorder text or hide: C0/C1 controls,
#: DEL, line/paragraph separators, the bidirectional marks and overrides (Trojan
#: Source; U+061C too), the invisible zero-width space, word joiner and operators
#: (U+200B, U+2060-2064: two ids that look alike), the BOM, and lone surrogates
#: (which cannot even be written out as UTF-8).  The joiners U+200C/U+200D stay:
#: scripts and emoji sequences need them.
_UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u2069"
    "\ufeff\ud800-\udfff]"
)
_SHORT: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def safe_text(text: str) -> str:
    """``text`` with every character that could control a terminal shown as an escape.

    A backslash stays a backslash: the output is for reading, not for parsing
    back (that is what ``--json`` is for).  Other Unicode (Chinese, emoji with
    their joiners) is printed as it is.
    """
    return _UNSAFE.sub(_escape, text)


#: UTF-8 of the code points that JSON leaves raw inside strings but that
#: line-oriented readers (Python's ``splitlines``, JavaScript) take as line ends.
_LINE_BREAKS_IN_STRINGS: Final = (
    (b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"),
)


def _one_line(data: str) -> bytes:
    """The stored data as one line of JSON: the same value, never a line break inside.

    The store keeps what does not look like JSON (not an object or a string:
    a list-mode record pushed as plain text) as text: such data that does not
    parse is written as a JSON string.  An object or a string was parsed when
    it was stored, so it is spliced in as it is (re-encoded only if another
    producer pretty-printed it).
    """
    raw = data.encode()
    if raw[:1] not in (b"{", b'"'):
        try:
            exactjson.loads(raw)
        except ValueError:
            return _one_line_string(data)
    if b"\n" in raw or b"\r" in raw:
        try:
            raw = exactjson.dumps(exactjson.loads(raw))
        except ValueError:  # not what the store keeps: the file was changed underneath
            return _one_line_string(data)
    return _escape_line_breaks(raw)


def _escape_line_breaks(raw: bytes) -> bytes:
    """JSON ``raw`` with the line breaks JSON leaves raw in strings escaped."""
    if raw.isascii():  # the usual id or record: none of them (each has a byte above 0x7f)
        return raw
    for char, escaped in _LINE_BREAKS_IN_STRINGS:
        if char in raw:
            raw = raw.replace(char, escaped)
    return raw


def record_line(record: StoredRecord, *, fields: bool = True, qid: bool = False) -> bytes:
    """One JSON object on one line (no newline at the end); ``data`` spliced in as stored.

    ``fields`` adds the columns the store pulled out of the record (``ts``,
    ``level``, ``message``: ``fleetlog logs --json``); the daily files leave
    them out, since ``data`` holds them already, and add ``qid`` instead, the
    record's queue identity that makes their export exactly-once.
    """
    extracted = b""
    if fields:  # each key always there, null when the record has none (as the API documents)
        extracted = b',"ts":%b,"level":%b,"message":%b' % (
            b"null" if record.ts is None else b'"%b"' % iso_ms(record.ts).encode(),
            b"null" if record.level is None else _one_line_string(record.level),
            b"null" if record.message is None else _one_line_string(record.message))
    return _line(record.seq, record.qid if qid else None, record.device_id, record.received_at,
                 extracted, record.data)


def file_line(seq: int, qid: str, device_id: str, received_at: int, data: str) -> bytes:
    """``record_line(record, fields=False, qid=True)`` from the columns themselves.

    What the daily files write for every record drained, so it is built without
    a record object (a batch's rows go to the files as they were written:
    :class:`~fleetlog.store.base.Appended`).
    """
    return _line(seq, qid, device_id, received_at, b"", data)


def _line(seq: int, qid: str | None, device_id: str, received_at: int, extracted: bytes,
          data: str) -> bytes:
    """The one serializer of a record line: one format, each string escaped once."""
    return b'{"seq":%d%b,"device_id":%b,"received_at":"%b"%b,"data":%b}' % (
        seq, b"" if qid is None else b',"qid":' + _one_line_string(qid),
        _one_line_string(device_id), iso_ms(received_at).encode(), extracted, _one_line(data))


def _one_line_string(text: str) -> bytes:
    """``text`` as a JSON string, the line breaks JSON leaves raw escaped."""
    return _escape_line_breaks(orjson.dumps(text))


def record_json(record: StoredRecord) -> bytes:
    """The ``fleetlog logs --json`` line of a record."""
    return record_line(record)


def record_text(record: StoredRecord) -> str:
    """``RECEIVED_AT  LEVEL  MESSAGE``; the record's JSON when it has no message."""
    level = safe_text((record.level or "-").upper())
    body = record.message if record.message is not None else record.data
    return f"{iso_ms(record.received_at)}  {level:<5}  {safe_text(body)}"
