"""The rules every SQL store shares, the SQL dialect a parameter; no I/O.

SQLite (:mod:`fleetlog.store.sqlite`) and PostgreSQL
(:mod:`fleetlog.store.postgres`) keep the same record columns
(:data:`COLUMNS`), make the same row of a queued record (:func:`prepare`),
turn a :class:`~fleetlog.store.base.LogQuery` into the same WHERE terms
(:func:`where`: device, time range, follow cursor, keyset page, a level and
every level above it), fold the same per-device stats out of a batch
(:func:`device_stats`), and refuse a schema newer than this fleetlog alike
(:func:`check_schema`).  Each backend says how it spells them with a
:class:`Dialect`, so a rule changed here changes on both, and the contract
suite (``tests/store/test_contract.py``) holds them to the same answers.

What stays in a backend is what its engine does its own way: search
(SQLite's FTS5 trigram index and ``instr``, PostgreSQL's ``pg_trgm`` and an
escaped ``LIKE``; both on :func:`fleetlog.store.search.search_text`), how a
batch is written, stats kept (an upsert, insert-only deltas), volume counted,
and retention.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from fleetlog import exactjson
from fleetlog.errors import InvalidRequest, RecordRejected, StoreUnavailable
from fleetlog.records import QueuedRecord, StoredRecord
from fleetlog.store.base import LogQuery
from fleetlog.store.fields import ERROR_LEVELS, LEVELS, columns, normalise_level

__all__ = ["COLUMNS", "NEWEST_FIRST", "Dialect", "Row", "after_statement", "check_schema",
           "check_step", "device_stats", "order_of", "prepare", "row", "select_statement",
           "where"]

#: The columns of a :class:`~fleetlog.records.StoredRecord`, in its order.
COLUMNS: Final = "seq, qid, device_id, received_at, ts, level, message, data"
#: The order of a newest-first read: the keyset of ``LogQuery.before``.
NEWEST_FIRST: Final = "received_at DESC, seq DESC"

#: A record as a store writes it: qid, device_id, received_at, ts, level, message, data.
Row = tuple[str, str, int, int | None, str | None, str | None, str]
#: A new record's (device_id, received_at, level), what :func:`device_stats` folds.
Seen = tuple[str, int, str | None]
#: One device's stats of a batch: device_id, records, first_seen, last_seen, last_error.
DeviceDelta = tuple[str, int, int, int, int | None]


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one SQL engine spells what :func:`where` and the statements here ask for."""

    #: The placeholder of one parameter (``?``, ``%s``).
    param: str
    #: The follow cursor's term, with one parameter (the ``seq`` to start after): a store
    #: whose seq order is not commit order adds what keeps late commits out (base.py).
    after_seq: str
    #: The keyset page as a row-value comparison ``(received_at, seq) < (x, y)``
    #: (else spelt out: ``received_at < x OR (received_at = x AND seq < y)``).
    row_values: bool
    #: The levels as one array parameter (``level = ANY(p)``), else one each (``IN``).
    level_array: bool


def row(values: tuple[Any, ...]) -> StoredRecord:
    """A stored record from the values of :data:`COLUMNS`."""
    return StoredRecord(*values)


#: The columns of a record that is not a JSON object or string.
_NO_COLUMNS: Final = (None, None, None)


def _decoded(data: bytes) -> Any:
    """A record's JSON for its columns: orjson, or the exact decoder where orjson cannot
    read a number (an integer past a double's range, which the gateway accepts).

    An integer orjson reads as a nearby double changes no column (``ts`` that big
    is out of range either way), so only orjson's refusal takes the slower path.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return exactjson.loads(data)


def prepare(record: QueuedRecord) -> Row:
    """The row of one record; :class:`RecordRejected` when its data cannot be stored.

    Every store refuses the same records: bytes that are not UTF-8, JSON that
    does not parse (text that does not look like JSON is kept as text), and a
    raw NUL (PostgreSQL's text cannot hold one).  A NUL sent escaped
    (``\\u0000``) is kept in ``data`` as sent; :func:`~fleetlog.store.fields.extract`
    made it U+FFFD in ``level`` and ``message``.
    """
    try:
        data = record.data
        ts, level, message = columns(_decoded(data)) if data[:1] in b'{"' else _NO_COLUMNS
        text = data.decode()
    except ValueError as exc:  # not JSON (orjson's or the stdlib's error), or not UTF-8
        raise RecordRejected(f"record {record.qid}: {type(exc).__name__}: {exc}") from exc
    if "\x00" in text:
        raise RecordRejected(f"record {record.qid}: a NUL character (not JSON; text cannot hold it)")
    return (record.qid, record.device_id, record.received_at, ts, level, message, text)


def where(query: LogQuery, dialect: Dialect) -> tuple[list[str], list[Any]]:
    """The WHERE terms of ``query`` but its ``grep`` (each backend searches its own way), and
    their parameters.

    ``level`` is a level and every level above it (:data:`~fleetlog.store.fields.LEVELS`);
    a level fleetlog does not know (not one a reader lets through) matches itself.
    """
    p = dialect.param
    terms: list[str] = []
    params: list[Any] = []
    if query.device_id is not None:
        terms.append(f"device_id = {p}")
        params.append(query.device_id)
    if query.since is not None:
        terms.append(f"received_at >= {p}")
        params.append(query.since)
    if query.until is not None:
        terms.append(f"received_at < {p}")
        params.append(query.until)
    if query.after_seq is not None:
        terms.append(dialect.after_seq)
        params.append(query.after_seq)
    if query.before is not None:
        received_at, seq = query.before
        if dialect.row_values:
            terms.append(f"(received_at, seq) < ({p}, {p})")
            params.extend((received_at, seq))
        else:
            terms.append(f"(received_at < {p} OR (received_at = {p} AND seq < {p}))")
            params.extend((received_at, received_at, seq))
    if query.level:
        level = normalise_level(query.level)
        if level not in LEVELS:
            terms.append(f"level = {p}")
            params.append(level)
        elif dialect.level_array:
            terms.append(f"level = ANY({p})")
            params.append(list(LEVELS[LEVELS.index(level):]))
        else:
            wanted = LEVELS[LEVELS.index(level):]
            terms.append(f"level IN ({','.join(p for _ in wanted)})")
            params.extend(wanted)
    return terms, params


def order_of(query: LogQuery) -> str:
    """The ORDER BY of ``query``'s read: seq order to follow, else newest first."""
    return "seq" if query.after_seq is not None else NEWEST_FIRST


def select_statement(dialect: Dialect, terms: list[str], order: str, *, limited: bool) -> str:
    """``SELECT`` :data:`COLUMNS` of the records matching every one of ``terms``, in ``order``
    (with one more parameter, the limit, when ``limited``)."""
    return (f"SELECT {COLUMNS} FROM records{' WHERE ' + ' AND '.join(terms) if terms else ''}"
            f" ORDER BY {order}" + (f" LIMIT {dialect.param}" if limited else ""))


def after_statement(dialect: Dialect) -> str:
    """The records after a seq in store order (:meth:`~fleetlog.store.base.Store.after`);
    parameters: the seq, the limit."""
    return select_statement(dialect, [dialect.after_seq], "seq", limited=True)


def check_step(step: int) -> None:
    """A volume's ``step`` (ms): :class:`InvalidRequest` unless positive."""
    if step <= 0:
        raise InvalidRequest("step must be positive", "step")


def device_stats(new: Iterable[Seen]) -> list[DeviceDelta]:
    """The stats of the devices of ``new`` records: how many each, the first and last
    ``received_at``, and the newest of an error level (:data:`~fleetlog.store.fields.ERROR_LEVELS`;
    None: none).  What a store adds to each device's stats for a batch."""
    stats: dict[str, list[int]] = {}  # device -> [records, first, last, last error (-1: none)]
    for device, at, level in new:
        error = at if level in ERROR_LEVELS else -1
        stat = stats.get(device)
        if stat is None:
            stats[device] = [1, at, at, error]
        else:
            stat[0] += 1
            if at < stat[1]:
                stat[1] = at
            if at > stat[2]:
                stat[2] = at
            if error > stat[3]:
                stat[3] = error
    return [(device, count, first, last, None if error < 0 else error)
            for device, (count, first, last, error) in stats.items()]


def check_schema(name: str, version: int, known: int) -> None:
    """:class:`StoreUnavailable` when the store ``name`` has a schema ``version`` newer than
    the ``known`` one of this fleetlog: it may hold what this one cannot read right."""
    if version > known:
        raise StoreUnavailable(
            f"{name} has schema {version}, newer than this fleetlog reads ({known}): upgrade fleetlog")
