"""Daily JSON-lines files, like the original's Monolog channel, written exactly once.

Layout (docs/CONTRACT.md): ``ROOT/device/log/YYYY-MM-DD.log``, one JSON object per
line, for the UTC day the record was received.

The files are an export of the store, not a second copy of the queue: after
each committed batch a worker appends every stored record the files do not
have yet, in store order, then fsyncs, and only then acknowledges the queue.
A worker whose queue is quiet exports too, in bounded steps (``limit``): on
PostgreSQL an export reads only below the oldest open write transaction (the
horizon, :mod:`fleetlog.store.postgres`), so a batch committed while another
worker's transaction was open is left for a later export, and with no more
traffic there would be no later batch to run one; a restarted worker with an
empty queue catches up the same way.

Exactly once means once per record, and a record is its queue id (``qid``,
the stream entry id), which every line carries: the same record kept by two
stores (a batch written again after the store file was replaced, a backup
restored over a newer store) is one line.  A store's ``seq`` only orders the
lines of one store, and numbering restarts with a new store, so it is never
compared across stores.

Bookkeeping, under ``.lock`` (one exporter at a time):

* ``.cursor`` says which store the files were last exported from (its
  :attr:`~fleetlog.store.base.Store.store_id`) and the ``seq`` and ``qid`` of
  the last record exported.  It is valid for a store only when the store has
  that id and holds that very qid at that seq: a new store (``rm``), or a
  restored backup (same id, but older, so its seqs go to other records),
  fails the test.
* On the usual path (a valid cursor) every record after the cursor is
  exported, except what a file's last complete line shows is already there
  (a crash after the fsync, before the cursor was written): that line's qid,
  looked up in the store, says where the file stops.
* Otherwise the export resyncs: it walks the whole store and writes each
  record whose qid is not yet in its day's file (each day file is read once).
  That costs one read of the files of the days the store holds, once per
  store replacement, never a duplicate and never a skipped record.

A torn last line (a crash mid-append) is cut off: its records were never
acknowledged and are exported again.  Lines written before qids were added
(and a cursor holding a bare number) are taken as the current store's, by seq.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from fleetlog.errors import InvalidRequest
from fleetlog.records import StoredRecord, utc_day
from fleetlog.store.base import Appended, Store, StoreUnavailable
from fleetlog.view import file_line

__all__ = ["FilesSink", "format_line"]

log = logging.getLogger("fleetlog.files")

_CHUNK: Final = 5000


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the last export stopped: store id, and seq and qid of its last record."""

    store_id: str | None  # None: a bare number left by an older fleetlog
    seq: int
    qid: str | None


def format_line(record: StoredRecord) -> bytes:
    """One line of a daily file: the serializer ``fleetlog logs --json`` uses, with ``qid``.

    ``data`` is spliced in as stored, not re-encoded; only JSON with line
    breaks between its tokens (pretty-printed by some other producer) is
    compacted, since a line must stay a line (:func:`fleetlog.view.record_line`).
    """
    return file_line(record.seq, record.qid, record.device_id, record.received_at,
                     record.data) + b"\n"


def _record_line(raw: bytes) -> dict[str, Any] | None:
    """A line of a daily file parsed, if it is a record's (``None`` for anything else: a
    note an operator appended, a line some other tool wrote)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and isinstance(value.get("qid", value.get("seq")),
                                                            str | int) else None


def _last_line(path: Path) -> dict[str, Any] | None:
    """The last record line of ``path``, parsed; truncates a torn tail.

    Lines that are not a record's are passed over, never an error: a file
    someone appended a note to still says where its records stop.
    """
    try:
        handle = path.open("r+b")
    except FileNotFoundError:
        return None
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        block = 4096
        tail = b""
        position = size
        while position > 0:
            step = min(block, position)
            position -= step
            handle.seek(position)
            tail = handle.read(step) + tail
            if tail.count(b"\n") >= 2 or position == 0:
                break
            block *= 2
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n") + 1  # keep every complete line
            handle.truncate(position + cut)
            os.fsync(handle.fileno())
            tail = tail[:cut]
        lines = tail.splitlines()
        whole = lines if position == 0 else lines[1:]  # the first may be the end of a line
        for raw in reversed(whole):
            if (line := _record_line(raw)) is not None:
                return line
        if position == 0:
            return None
        handle.seek(0)  # the tail is all notes: the last record line in the whole file
        last = None
        for raw in handle:
            last = _record_line(raw) or last
        return last


def _qids_in(path: Path) -> Iterator[str]:
    """The qid of every record line of ``path`` (lines without one are skipped)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break  # a torn tail: cut off before anything is appended
            line = _record_line(raw)
            qid = None if line is None else line.get("qid")
            if isinstance(qid, str):
                yield qid


class FilesSink:
    """Exports stored records to the daily files; see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.directory = Path(root) / "device" / "log"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cursor_path = self.directory / ".cursor"
        self._lock_path = self.directory / ".lock"

    def _read_cursor(self) -> Cursor | None:
        try:
            text = self._cursor_path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            if text.isdigit():
                return Cursor(None, int(text), None)
            value = orjson.loads(text)
            return Cursor(str(value["store"]), int(value["seq"]), str(value["qid"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def _write_cursor(self, store_id: str, seq: int, qid: str) -> None:
        temporary = self._cursor_path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps({"store": store_id, "seq": seq, "qid": qid}))
        os.replace(temporary, self._cursor_path)

    def prune(self, before: int) -> list[Path]:
        """Delete the daily files of UTC days entirely before ``before`` (ms)."""
        first_kept = utc_day(before)
        removed = []
        for path in sorted(self.directory.glob("????-??-??.log")):
            if path.stem < first_kept:
                path.unlink()
                removed.append(path)
        return removed

    def export(self, store: Store, limit: int | None = None, appended: Appended | None = None) -> int:
        """Append every stored record not yet in the files; fsync; return how many.

        ``appended``: what the batch just written appended (:attr:`Store.appended
        <fleetlog.store.base.Store.appended>`).  When the files hold the store
        through the seq right before it (or hold nothing, and it is the store's
        first records), that batch is all they lack, and its rows are written as
        they are instead of read back from the store.

        ``limit`` bounds one call's work, so that catching up a long way never
        holds a worker off its queue for long: it stops once about ``limit``
        records of the store were read, and the next call goes on from the
        cursor.  A resync (a store the files were not exported from) ignores
        it: only a finished resync leaves a cursor the usual path may trust
        (its day files' last lines may belong to records past a partial one).

        Raises :class:`StoreUnavailable` when the files cannot be written (disk
        full, permissions) or the store cannot be read: the caller must not
        acknowledge the batch.
        """
        if limit is not None and limit <= 0:
            raise InvalidRequest(f"limit must be positive, not {limit}", "limit")
        try:
            with self._lock_path.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                cursor = self._read_cursor()
                if appended is not None and limit is not None and len(appended.rows) > limit:
                    appended = None
                if (appended is not None and cursor is None and appended.after == 0
                        and not any(self.directory.glob("????-??-??.log"))):
                    return self._export_appended(appended)  # a new store into new files
                if self._valid(cursor, store):
                    assert cursor is not None
                    if (appended is not None and appended.store_id == cursor.store_id
                            and appended.after == cursor.seq):
                        return self._export_appended(appended)
                    return self._export_after(store, cursor.seq, limit)
                return self._resync(store, cursor)
        except OSError as exc:
            raise StoreUnavailable(f"daily files in {self.directory}: {exc}") from exc

    @staticmethod
    def _valid(cursor: Cursor | None, store: Store) -> bool:
        """Whether ``cursor`` is where this very store's export stopped."""
        if cursor is None:
            return False
        if cursor.store_id is None:
            return True  # an older fleetlog's cursor: its files came from this store
        if cursor.store_id != store.store_id or cursor.qid is None:
            return False
        return store.seqs_of([cursor.qid]).get(cursor.qid) == cursor.seq

    def _file_stops_at(self, store: Store, day: str) -> int:
        """The store seq of the last record of ``day``'s file, if it came from this store."""
        line = _last_line(self.directory / f"{day}.log")
        if line is None:
            return 0
        qid = line.get("qid")
        if not isinstance(qid, str):
            seq = line.get("seq")  # written before lines had a qid
            return seq if isinstance(seq, int) else 0
        return store.seqs_of([qid]).get(qid, 0)

    def _append(self, by_day: dict[str, list[bytes]]) -> int:
        written = 0
        for day, lines in by_day.items():
            with (self.directory / f"{day}.log").open("ab") as handle:
                handle.write(b"".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
            written += len(lines)
        return written

    def _export_after(self, store: Store, cursor: int, limit: int | None) -> int:
        """The usual path: the records after ``cursor`` (a valid cursor of this store)."""
        stops_at: dict[str, int] = {}

        def wanted(day: str, record: StoredRecord) -> bool:
            if day not in stops_at:
                stops_at[day] = self._file_stops_at(store, day)
            if record.seq <= stops_at[day]:
                return False
            stops_at[day] = record.seq
            return True

        return self._export_from(store, cursor, wanted, limit)

    def _export_appended(self, appended: Appended) -> int:
        """The files hold the store through ``appended.after``: append its rows.

        No day file can hold a line past the cursor here (such a line is a record
        of this store above the cursor, and the store had none), so unlike
        :meth:`_export_after` no file's last line needs looking at.
        """
        by_day: dict[str, list[bytes]] = defaultdict(list)
        seq = appended.after
        for qid, device_id, received_at, _ts, _level, _message, data in appended.rows:
            seq += 1
            by_day[utc_day(received_at)].append(
                file_line(seq, qid, device_id, received_at, data) + b"\n")
        written = self._append(by_day)
        self._write_cursor(appended.store_id, seq, appended.rows[-1][0])
        return written

    def _export_from(self, store: Store, cursor: int,
                     wanted: Callable[[str, StoredRecord], bool], limit: int | None = None) -> int:
        """Append the records after ``cursor`` that ``wanted(day, record)`` picks, moving the cursor.

        Stops once ``limit`` records were read (None: at the end of the store).
        """
        store_id = store.store_id
        written = 0
        left = limit
        while left is None or left > 0:
            records = store.after(cursor, _CHUNK if left is None else min(_CHUNK, left))
            if not records:
                break
            if left is not None:
                left -= len(records)
            by_day: dict[str, list[bytes]] = defaultdict(list)
            for record in records:
                day = utc_day(record.received_at)
                if wanted(day, record):
                    by_day[day].append(format_line(record))
            written += self._append(by_day)
            cursor = records[-1].seq
            self._write_cursor(store_id, cursor, records[-1].qid)
        return written

    def _resync(self, store: Store, cursor: Cursor | None) -> int:
        """Export every record of ``store`` whose qid no day file holds yet."""
        store_id = store.store_id
        noisy = cursor is not None or any(self.directory.glob("????-??-??.log"))
        if noisy:
            log.warning("daily files: store %s is not the one they were last exported from "
                        "(%s); matching its records to the files by qid", store_id,
                        f"store {cursor.store_id}, seq {cursor.seq}" if cursor else "no cursor")
        in_files: dict[str, set[str]] = {}

        def wanted(day: str, record: StoredRecord) -> bool:
            if day not in in_files:
                in_files[day] = self._stored_qids_in(store, day)
            if record.qid in in_files[day]:
                return False
            in_files[day].add(record.qid)
            return True

        written = self._export_from(store, 0, wanted)
        if noisy:
            log.warning("daily files: %d records of store %s exported by resync", written, store_id)
        return written

    def _stored_qids_in(self, store: Store, day: str) -> set[str]:
        """The qids of ``day``'s file that ``store`` holds (what of the store it has)."""
        path = self.directory / f"{day}.log"
        _last_line(path)  # cut a torn tail first
        found: set[str] = set()
        chunk: list[str] = []
        for qid in _qids_in(path):
            chunk.append(qid)
            if len(chunk) >= _CHUNK:
                found.update(store.seqs_of(chunk))
                chunk = []
        if chunk:
            found.update(store.seqs_of(chunk))
        return found
