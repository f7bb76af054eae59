"""Daily JSON-lines files, like the original's Monolog channel, written exactly once.

Layout (CONTRACT.md): ``ROOT/device/log/YYYY-MM-DD.log``, one JSON object per
line, for the UTC day the record was received.

The files are an export of the store, not a second copy of the queue: after
each committed batch a worker appends every stored record the files do not
have yet, in store order, then fsyncs, and only then acknowledges the queue.
Exactly-once needs no bookkeeping beyond the files themselves: one exporter at
a time holds ``.lock``, each file's lines are in increasing ``seq``, so the
last line of a file says where it stops.  ``.cursor`` (the highest ``seq``
exported) is only a hint that saves a scan; a stale cursor costs time, never a
duplicate.  A torn last line (a crash mid-append) is cut off: its records were
never acknowledged and are exported again.
"""

from __future__ import annotations

import fcntl
import os
from collections import defaultdict
from pathlib import Path
from typing import Final

import orjson

from fleetlog.records import StoredRecord, iso_ms, utc_day
from fleetlog.store.base import Store, StoreUnavailable

__all__ = ["FilesSink", "format_line"]

_CHUNK: Final = 5000


def format_line(record: StoredRecord) -> bytes:
    """One line of a daily file; ``data`` is spliced in as stored, not re-encoded.

    Only JSON with line breaks between its tokens (pretty-printed by some other
    producer) is compacted, since a line must stay a line.
    """
    data = record.data.encode()
    if b"\n" in data or b"\r" in data:
        data = orjson.dumps(orjson.loads(data))
    head = orjson.dumps(
        {"seq": record.seq, "device_id": record.device_id, "received_at": iso_ms(record.received_at)}
    )
    return head[:-1] + b',"data":' + data + b"}\n"


def _last_seq(path: Path) -> int:
    """The ``seq`` of the last complete line of ``path``; truncates a torn tail."""
    try:
        handle = path.open("r+b")
    except FileNotFoundError:
        return 0
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
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
        if not lines:
            return 0
        seq: int = orjson.loads(lines[-1])["seq"]
        return seq


class FilesSink:
    """Exports stored records to the daily files; see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.directory = Path(root) / "device" / "log"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cursor_path = self.directory / ".cursor"
        self._lock_path = self.directory / ".lock"

    def _read_cursor(self) -> int:
        try:
            return int(self._cursor_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_cursor(self, seq: int) -> None:
        temporary = self._cursor_path.with_suffix(".tmp")
        temporary.write_text(str(seq))
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

    def export(self, store: Store) -> int:
        """Append every stored record not yet in the files; fsync; return how many.

        Raises :class:`StoreUnavailable` when the files cannot be written (disk
        full, permissions): the caller must not acknowledge the batch.
        """
        try:
            with self._lock_path.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                return self._export_locked(store)
        except OSError as exc:
            raise StoreUnavailable(f"daily files in {self.directory}: {exc}") from exc

    def _export_locked(self, store: Store) -> int:
        cursor = self._read_cursor()
        last_in_file: dict[str, int] = {}
        written = 0
        while True:
            records = store.after(cursor, _CHUNK)
            if not records:
                break
            by_day: dict[str, list[bytes]] = defaultdict(list)
            for record in records:
                day = utc_day(record.received_at)
                if day not in last_in_file:
                    last_in_file[day] = _last_seq(self.directory / f"{day}.log")
                if record.seq > last_in_file[day]:
                    by_day[day].append(format_line(record))
                    last_in_file[day] = record.seq
            for day, lines in by_day.items():
                with (self.directory / f"{day}.log").open("ab") as handle:
                    handle.write(b"".join(lines))
                    handle.flush()
                    os.fsync(handle.fileno())
                written += len(lines)
            cursor = records[-1].seq
            self._write_cursor(cursor)
        return written
