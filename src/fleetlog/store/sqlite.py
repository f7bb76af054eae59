"""The embedded default store: one SQLite file in WAL mode.

WAL lets ``fleetlog logs`` read while a worker writes.  ``synchronous=FULL``
makes every committed batch survive a power cut, which matters because the
worker acknowledges the queue right after the commit: a batch lost here after
its XACK would be lost for good.

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` only
ever grows, and opening a store brings it up to date.

The trigram full-text index costs six times what storing a record does, so it
is not built in the ingest transaction: :meth:`SQLiteStore.index_step` indexes
stored records in bounded steps (the worker runs them through
:meth:`SQLiteStore.upkeep` when it is idle, or when the index falls too far
behind), and ``--grep`` scans the few records not yet indexed, so a search is
always complete.  Index and scan look at the same text
(:func:`fleetlog.store.search.search_text`: the record's decoded strings,
case-folded), kept in the ``search`` table, so they give the same answers.

Readers open the file with ``mode=ro``: they never create, migrate or write it.

Readers must never stop ingest, nor let the WAL grow without end.  A checkpoint
copies the WAL into the database, but only up to the oldest snapshot a reader
still uses, and the WAL starts over from its beginning only once no reader uses
it at all: with reads always in flight (a busy console, an API under load) the
passive checkpoints SQLite runs after commits never complete, and the WAL grew
to 500 MB, slowing every read and write.  So every read statement is short and
runs on its own (no transaction is held across statements, pages or waits; a
search scans the records the index does not cover yet in slices of
:data:`_SCAN_SLICE` seqs, each its own statement); and the writer, once the WAL
passes :data:`WAL_LIMIT` bytes, runs ``wal_checkpoint(RESTART)``: it holds new
writes, waits (briefly) for the reads in flight to end and copies the WAL over,
and the next commit writes the WAL from its start again, ``journal_size_limit``
cutting the file back to :data:`WAL_LIMIT` (see :meth:`SQLiteStore._bound_wal`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from fleetlog.records import DeviceStats, QueuedRecord, StoredRecord
from fleetlog.store import core
from fleetlog.store.base import (
    Appended,
    LogQuery,
    ReadLimit,
    RecordRejected,
    StoreMissing,
    StoreUnavailable,
    VolumeBucket,
)
from fleetlog.store.search import search_needle, search_text

__all__ = ["MIGRATIONS", "WAL_LIMIT", "SQLiteStore"]

log = logging.getLogger("fleetlog.store")

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: records, per-device stats, full-text search on the record's JSON.
    """
    CREATE TABLE records (
        seq         INTEGER PRIMARY KEY,
        qid         TEXT    NOT NULL UNIQUE,
        device_id   TEXT    NOT NULL,
        received_at INTEGER NOT NULL,
        ts          INTEGER,
        level       TEXT,
        message     TEXT,
        data        TEXT    NOT NULL
    );
    CREATE INDEX records_device_seq ON records (device_id, seq);
    CREATE INDEX records_device_received ON records (device_id, received_at);
    CREATE TABLE devices (
        device_id  TEXT PRIMARY KEY,
        records    INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen  INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- trigram: substring search that also works for text without spaces (Chinese).
    CREATE VIRTUAL TABLE records_fts USING fts5 (
        data, content='records', content_rowid='seq', tokenize='trigram'
    );
    CREATE TRIGGER records_fts_insert AFTER INSERT ON records BEGIN
        INSERT INTO records_fts (rowid, data) VALUES (new.seq, new.data);
    END;
    CREATE TRIGGER records_fts_delete AFTER DELETE ON records BEGIN
        INSERT INTO records_fts (records_fts, rowid, data) VALUES ('delete', old.seq, old.data);
    END;
    """,
    # 2: retention deletes the oldest records first.
    """
    CREATE INDEX records_received ON records (received_at);
    """,
    # 3: the full-text index is built after the commit, off the ingest path (see
    # SQLiteStore.index_step); meta.fts_through is the highest seq it covers.
    """
    DROP TRIGGER records_fts_insert;
    DROP TRIGGER records_fts_delete;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO meta (key, value) SELECT 'fts_through', coalesce(max(seq), 0) FROM records;
    CREATE TRIGGER records_fts_delete AFTER DELETE ON records
    WHEN old.seq <= (SELECT value FROM meta WHERE key = 'fts_through') BEGIN
        INSERT INTO records_fts (records_fts, rowid, data) VALUES ('delete', old.seq, old.data);
    END;
    """,
    # 4: one index per device serves every read: SQLite appends the rowid (seq) to
    # it, so "newest first" is (received_at, seq) order straight from the index.
    # Retention walks the table in seq order instead.  Inserts maintain one index fewer.
    """
    DROP INDEX records_device_seq;
    DROP INDEX records_received;
    """,
    # 5: the store's identity, drawn once when it is created (or upgraded) and kept
    # with its data: a backup has its original's id, a new file a new one.  The daily
    # files export tells stores apart by it (see fleetlog.store.files).
    """
    INSERT INTO meta (key, value) VALUES ('store_id', abs(random() % 9223372036854775807));
    """,
    # 6: search the text as the device sent it, not its JSON (a backslash must not
    # match an escaped quote), case-folded for all of Unicode: ``search`` holds
    # search_text(data) of every indexed record, and the trigram index is on it.
    # Built by index_step, off the ingest path; the old index is rebuilt from 0.
    """
    DROP TRIGGER records_fts_delete;
    DROP TABLE records_fts;
    CREATE TABLE search (seq INTEGER PRIMARY KEY, text TEXT NOT NULL);
    CREATE VIRTUAL TABLE search_fts USING fts5 (
        text, content='search', content_rowid='seq', tokenize='trigram'
    );
    CREATE TRIGGER records_search_delete AFTER DELETE ON records
    WHEN old.seq <= (SELECT value FROM meta WHERE key = 'fts_through') BEGIN
        DELETE FROM search WHERE seq = old.seq;
    END;
    CREATE TRIGGER search_fts_delete AFTER DELETE ON search BEGIN
        INSERT INTO search_fts (search_fts, rowid, text) VALUES ('delete', old.seq, old.text);
    END;
    UPDATE meta SET value = 0 WHERE key = 'fts_through';
    """,
    # 7: when each device last sent an error (or fatal) record, kept with its stats so
    # the device list (console, GET /api/devices) needs no scan of the records.
    """
    ALTER TABLE devices ADD COLUMN last_error INTEGER;
    UPDATE devices SET last_error = (
        SELECT max(received_at) FROM records
        WHERE records.device_id = devices.device_id AND level IN ('error', 'fatal'));
    """,
    # 8: the fleet's volume per minute and level, counted at ingest (one upsert per
    # batch and minute) so a day's chart reads ~1,440 rows, not every record of the
    # day.  A record without a level counts under the empty blob, which no level
    # (text) equals: a WITHOUT ROWID key cannot hold NULL.  One device's volume is
    # fast through its index and is not kept here.
    """
    CREATE TABLE volume (
        minute INTEGER NOT NULL,
        level  TEXT    NOT NULL,
        n      INTEGER NOT NULL,
        PRIMARY KEY (minute, level)
    ) WITHOUT ROWID;
    INSERT INTO volume (minute, level, n)
    SELECT (received_at - ((received_at % 60000) + 60000) % 60000) / 60000,
           coalesce(level, x''), count(*)
    FROM records GROUP BY 1, 2;
    """,
    # 9: the newest received_at in each block of 1,024 seqs, kept by index_step (off
    # the ingest path) for the records it indexes.  A fleet-wide newest-first read
    # looks at the newest seqs first and stops once nothing older in seq can be newer
    # in received_at (see SQLiteStore._newest_fleet).  Pruning leaves it an upper
    # bound, which is all the reads need.
    """
    CREATE TABLE received_max (block INTEGER PRIMARY KEY, received_at INTEGER NOT NULL);
    INSERT INTO received_max (block, received_at)
    SELECT seq >> 10, max(received_at) FROM records
    WHERE seq <= (SELECT value FROM meta WHERE key = 'fts_through') GROUP BY 1;
    """,
)
#: The first schema with ``devices.last_error``; older ones (read-only) report None.
_LAST_ERROR_SCHEMA: Final = 7
#: The first schema with the ``search`` table; older ones (read-only) are scanned.
_SEARCH_SCHEMA: Final = 6
#: The first schema with the ``volume`` table; older ones (read-only) count records.
_VOLUME_SCHEMA: Final = 8
#: The first schema with ``received_max``; older ones (read-only) sort every match.
_RECEIVED_MAX_SCHEMA: Final = 9
#: One ``volume`` row counts a minute.
_MINUTE: Final = 60_000
#: ``received_max`` keeps one row per ``1 << _BLOCK_BITS`` seqs.
_BLOCK_BITS: Final = 10
#: The seqs a fleet-wide newest-first read looks at first; each retry looks at 4x more.
_FIRST_WINDOW: Final = 4096
#: The level under which ``volume`` counts records that have none (see migration 8).
_NO_LEVEL: Final = b""
_UPSERT_VOLUME: Final = """
    INSERT INTO volume (minute, level, n) VALUES (?, ?, ?)
    ON CONFLICT (minute, level) DO UPDATE SET n = n + excluded.n
"""

#: How SQLite spells the shared rules (:mod:`fleetlog.store.core`): one writer at a time,
#: so seq order is commit order and the follow cursor needs nothing more.
DIALECT: Final = core.Dialect(param="?", after_seq="seq > ?", row_values=False, level_array=False)
_AFTER: Final = core.after_statement(DIALECT)
_INSERT: Final = (
    "INSERT INTO records (qid, device_id, received_at, ts, level, message, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (qid) DO NOTHING"
)
_UPSERT_DEVICE: Final = """
    INSERT INTO devices (device_id, records, first_seen, last_seen, last_error)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (device_id) DO UPDATE SET
        records = records + excluded.records,
        first_seen = min(first_seen, excluded.first_seen),
        last_seen = max(last_seen, excluded.last_seen),
        last_error = CASE WHEN excluded.last_error IS NULL THEN last_error
                          ELSE max(coalesce(last_error, 0), excluded.last_error) END
"""
#: How long a write waits for another writer's lock before the store reports itself unavailable.
_BUSY_TIMEOUT_MS: Final = 5000
#: The shortest text the trigram index can find; shorter ``--grep`` scans.
_TRIGRAM: Final = 3
#: The most distinct trigrams of a ``--grep`` the index is asked for (see :func:`_fts_query`).
_MAX_TRIGRAMS: Final = 32
#: SQLite virtual-machine steps between two checks of a read's time budget.
_PROGRESS_STEPS: Final = 1000
#: Records indexed per transaction at most (a few MiB of WAL).
_INDEX_CHUNK: Final = 5_000
#: Pages one step of :meth:`SQLiteStore._reclaim_search` may write (one transaction):
#: ~256 x 4 KiB, a few milliseconds here.
_RECLAIM_PAGES: Final = 256
#: Seqs a fleet-wide read looks at per statement (FTS5 and the rowid seek to them): a
#: few ms for a word in a fifth of the records.  Smaller slices cost a search nothing
#: measurable (a million seqs in slices of 4,096 or 32,768: 285 ms either way), and
#: each is a shorter wait for a writer restarting the WAL (see the module docstring).
_WINDOW_SLICE: Final = 4096
#: Seqs a search scans per statement among the records not indexed yet (a few ms).
_SCAN_SLICE: Final = 256
#: The WAL size (bytes) past which a writer restarts the WAL (``wal_checkpoint(RESTART)``):
#: just above what ``wal_autocheckpoint`` (10,000 pages, 39 MiB) lets it reach while no
#: reader is in the way, so this acts when readers are.  Under four reading clients the
#: WAL then peaks at about 47 MiB (``python -m bench.ingest_reads``).
WAL_LIMIT: Final = 40 * 2**20
#: How long the first try at restarting the WAL waits for the reads in flight (ms); each
#: try that finds reads still in the way doubles it, up to :data:`_WAL_WAIT_MAX_MS`.
_WAL_WAIT_MS: Final = 20
_WAL_WAIT_MAX_MS: Final = 1000
#: After a try that waited the longest in vain (a read holding a transaction open), the
#: next comes this many seconds later: such a reader costs ingest at most a tenth.
_WAL_STUCK_S: Final = 10.0


def _file_identity(path: Path, *, missing_ok: bool = True) -> tuple[int, int] | None:
    """(st_dev, st_ino) of ``path``: which file it is, whatever its name."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    return status.st_dev, status.st_ino


def _own_sidecars(path: Path) -> list[tuple[Path, tuple[int, int]]]:
    """``path``'s ``-wal`` and ``-shm`` files that this process has open (Linux /proc)."""
    open_files = set()
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                status = os.stat(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            open_files.add((status.st_dev, status.st_ino))
    except OSError:
        return []
    sidecars = []
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        identity = _file_identity(side)
        if identity is not None and identity in open_files:
            sidecars.append((side, identity))
    return sidecars


def _fts_phrase(text: str) -> str:
    """``text`` as one FTS5 string: every character literal (``*``, ``NEAR(``, ``-x``)."""
    return '"' + text.replace('"', '""') + '"'


def _fts_query(needle: str) -> str:
    """An FTS5 query (trigram index) matching at least every text that contains ``needle``.

    Not the needle as one phrase: FTS5 matches a phrase by walking the position
    lists of all its trigrams side by side, and a needle that repeats one trigram
    (``aaaa...``) against texts that repeat it too cost minutes of CPU and
    gigabytes (1,000 ``a`` against 8 records of 300,000 ``a``: 10 s).  Every
    text holding the needle holds each of its trigrams, so the AND of its
    distinct trigrams (at most :data:`_MAX_TRIGRAMS`, spread over the needle)
    narrows as well and costs one doclist per trigram; ``instr`` on the same
    text then decides, as it always did.
    """
    trigrams = list(dict.fromkeys(needle[i:i + _TRIGRAM] for i in range(len(needle) - _TRIGRAM + 1)))
    if len(trigrams) > _MAX_TRIGRAMS:
        step = len(trigrams) / _MAX_TRIGRAMS
        trigrams = [trigrams[int(i * step)] for i in range(_MAX_TRIGRAMS)]
    return " AND ".join(_fts_phrase(trigram) for trigram in trigrams)


def _search_text(data: str | bytes | None) -> str:
    return search_text(data) if data is not None else ""


def _statements(script: str) -> list[str]:
    """Split a script into statements (``executescript`` would commit on its own)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return statements


class SQLiteStore:
    """:class:`~fleetlog.store.base.Store` on one SQLite file."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._identity: tuple[int, int] | None = None
        self._store_id: str | None = None
        self._limit: ReadLimit | None = None
        #: The WAL's path, and how long the next try at restarting it may wait (ms).
        self._wal = self.path.with_name(self.path.name + "-wal")
        self._wal_wait_ms = _WAL_WAIT_MS
        self._wal_next_try = 0.0  # monotonic
        self._wal_tries = self._wal_restarts = 0
        self._appended: Appended | None = None
        self._open()

    def _open(self) -> None:
        if self.readonly:
            self._open_readonly()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = sqlite3.connect(self.path, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                # Checkpoint (and fsync the database file) every ~40 MB of WAL rather
                # than every 4 MB: fewer fsyncs of the database file for the drain; readers are
                # unaffected (bench.ingest_reads measures both).
                self._db.execute("PRAGMA wal_autocheckpoint = 10000")
                # A WAL that grew past the limit (readers in the way) is cut back to it when
                # it starts over, so its file's size says how much it holds (_bound_wal).
                self._db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
                self._migrate()
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._db.create_function("fleetlog_search_text", 1, self._search_text, deterministic=True)
        self._identity = _file_identity(self.path)
        self._store_id = None
        self.set_read_limit(self._limit)

    def _open_readonly(self) -> None:
        """Open for reading only: no directory, file, migration or write, ever."""
        if not self.path.parent.is_dir():
            raise StoreMissing(
                f"no data directory {self.path.parent}: nothing has been stored there; "
                "pass --data-dir DIR (or --store URL) to read the store you mean")
        if not self.path.is_file():
            raise StoreMissing(
                f"no store at {self.path}: nothing has been stored there; "
                "pass --data-dir DIR (or --store URL) to read the store you mean")
        try:
            self._db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            version = self.schema_version
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"cannot read {self.path}: {exc}") from exc
        if version == 0:
            try:
                empty = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            except sqlite3.DatabaseError as exc:
                raise StoreUnavailable(f"cannot read {self.path}: {exc}") from exc
            finally:
                self._db.close()
            if empty:  # a writer has created the file and not yet its schema (one transaction)
                raise StoreMissing(f"no store at {self.path} yet: its writer is creating it")
            raise StoreUnavailable(f"{self.path} is not a fleetlog store (no schema)")
        try:
            core.check_schema(str(self.path), version, len(MIGRATIONS))
        except StoreUnavailable:
            self._db.close()
            raise

    # -- identity -------------------------------------------------------------

    @property
    def store_id(self) -> str:
        if self._store_id is None:
            with self._reading():
                row = self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            if row is None:
                raise StoreUnavailable(f"SQLite {self.path}: no store id (schema not migrated)")
            self._store_id = f"{row[0]:016x}"
        return self._store_id

    def replaced(self) -> bool:
        """True when the file at ``path`` is gone or is another file than the one open.

        Compares (st_dev, st_ino) of the path now with those it had when opened:
        an ``rm`` or an ``mv backup.db fleetlog.db`` under a running worker.
        """
        try:
            return _file_identity(self.path, missing_ok=False) != self._identity
        except FileNotFoundError:
            return True
        except OSError:
            return False  # unreadable directory: writes will say what is wrong

    def reopen(self) -> None:
        """Close the replaced file and open the one at ``path`` (created and migrated).

        The replaced database's ``-wal`` and ``-shm`` are still at the path when
        the file was removed or moved over, and SQLite would apply that WAL to
        the new file (the new store would show the old one's pages): they are
        deleted first, but only while they are the very files this connection
        has open, never ones another process created for the new file.
        """
        stale = _own_sidecars(self.path)
        self._appended = None
        self._db.close()
        for side, identity in stale:
            if _file_identity(side) == identity:
                side.unlink(missing_ok=True)
                log.warning("removed %s: it belonged to the replaced store", side)
        self._open()

    def _search_text(self, data: str | bytes | None) -> str:
        """The SQL function ``fleetlog_search_text``: one call can be the costly step of a scan
        (a large record), so it checks the read's budget too."""
        if self._limit is not None and self._limit.stopped():
            raise self._limit.error()  # SQLite stops the statement; _reading says why
        return _search_text(data)

    # -- time budgets -----------------------------------------------------------

    def set_read_limit(self, limit: ReadLimit | None) -> None:
        """Stop the reads that follow once ``limit`` is past or cancelled (a progress handler).

        The handler runs every :data:`_PROGRESS_STEPS` steps of SQLite's virtual
        machine, in the reading thread: SQLite then interrupts the statement,
        which :meth:`_reading` turns into :class:`~fleetlog.errors.ReadTimeout`.
        """
        self._limit = limit
        self._db.set_progress_handler(None if limit is None else limit.stopped, _PROGRESS_STEPS)

    # -- schema ---------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _migrate(self) -> None:
        if self.schema_version == len(MIGRATIONS):
            return  # up to date: no need for the write lock another writer may hold
        with self._transaction() as db:
            version = self.schema_version
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """A read; the store's own faults (locked, I/O error) become :class:`StoreUnavailable`."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if self._limit is not None and self._limit.stopped():
                raise self._limit.error() from exc  # interrupted by the progress handler
            raise StoreUnavailable(f"SQLite {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # a subclass: a bug, not the store
                raise
            raise StoreUnavailable(f"SQLite {self.path}: {exc}") from exc  # malformed, not a db

    @contextmanager
    def _transaction(self, *, upkeep: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; the store's own faults become :class:`StoreUnavailable`.

        Locked past the busy timeout, disk full, I/O error: the store's fault, not
        the records', and the transaction is rolled back.  Upkeep (indexing,
        retention) waits only briefly for the lock: it can always be done later,
        and the worker must get back to ingesting, or to saying why it cannot.
        """
        db = self._db
        if upkeep:
            db.execute("PRAGMA busy_timeout = 100")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:
                raise
            raise StoreUnavailable(f"SQLite {self.path}: {exc}") from exc
        finally:
            if upkeep:
                db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")

    # -- writes ---------------------------------------------------------------

    def write_batch(self, records: Sequence[QueuedRecord]) -> int:
        """Store ``records`` in one transaction; return how many were new.

        Raises :class:`RecordRejected` when a record's own data cannot be stored
        (nothing of the batch is then kept: the caller may store them one by one)
        and :class:`StoreUnavailable` for a fault of the store.
        """
        self._appended = None
        if not records:
            return 0
        try:
            with self._transaction() as db:
                new, appended = self._insert(db, records)
        except (sqlite3.IntegrityError, sqlite3.DataError) as exc:
            raise RecordRejected(f"SQLite refused the record: {exc}") from exc
        self._appended = appended  # committed
        self._bound_wal()
        return new

    @property
    def appended(self) -> Appended | None:
        return self._appended

    def _bound_wal(self) -> None:
        """Restart the WAL once it is over :data:`WAL_LIMIT` (after a commit; never raises).

        ``wal_checkpoint(RESTART)`` takes the write lock (so every read that
        starts meanwhile sees the newest state and is not in the way), copies
        every frame into the database once the reads still on an older state
        have ended, and returns once no read uses the WAL: the next commit
        writes it from its start (and ``journal_size_limit`` cuts the file back
        to :data:`WAL_LIMIT`; emptying it instead, ``TRUNCATE``, made the
        commits after it grow the file again: ingest under reads went from
        0.88 to 0.75 of its rate alone).  Reads are
        single short statements, so the wait is short: it is polled every
        millisecond (SQLite's own busy handler sleeps up to 100 ms at a time),
        at first for :data:`_WAL_WAIT_MS`, doubled after each try that found
        reads still in the way (a long search), up to :data:`_WAL_WAIT_MAX_MS`.
        A try that could not finish has still copied what it could, and the
        next one comes after the writer wrote for as long as it waited (so at
        most half of its time goes to waiting), or :data:`_WAL_STUCK_S` later
        once a wait of :data:`_WAL_WAIT_MAX_MS` was in vain: a reader that keeps
        a transaction open lets the WAL grow, and costs ingest at most a tenth.
        The commit stands either way.
        """
        try:
            size = os.stat(self._wal).st_size
        except OSError:
            return
        if size <= WAL_LIMIT:
            return
        started = time.monotonic()
        if started < self._wal_next_try:
            return
        db = self._db
        deadline = started + self._wal_wait_ms / 1000
        self._wal_tries += 1
        try:
            db.execute("PRAGMA busy_timeout = 0")
            try:
                while True:
                    busy, frames, copied = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                    if not busy or time.monotonic() >= deadline:
                        break
                    time.sleep(0.001)
            finally:
                db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            log.warning("SQLite %s: restarting the WAL failed (%s); trying after the next commit",
                        self.path, exc)
            return
        now = time.monotonic()
        if busy:
            log.debug("WAL of %s not restarted: reads in the way for %d ms (%d of %d frames "
                      "copied)", self.path, (now - started) * 1000, copied, frames)
            if self._wal_wait_ms >= _WAL_WAIT_MAX_MS:
                self._wal_next_try = now + _WAL_STUCK_S
                log.warning("SQLite %s: a reader has held the WAL for over %d ms (%d MiB): "
                            "trying again in %g s", self.path, _WAL_WAIT_MAX_MS, size >> 20,
                            _WAL_STUCK_S)
            else:
                self._wal_next_try = now + (now - started)
            self._wal_wait_ms = min(_WAL_WAIT_MAX_MS, 2 * self._wal_wait_ms)
        else:
            self._wal_wait_ms = _WAL_WAIT_MS
            self._wal_next_try = 0.0
            self._wal_restarts += 1

    def _insert(self, db: sqlite3.Connection,
                records: Sequence[QueuedRecord]) -> tuple[int, Appended | None]:
        """Insert the new ones of ``records``; how many, and what was appended if only new ones."""
        rows = [core.prepare(record) for record in records]
        # A record stored before (a redelivery) is skipped by the insert itself (the
        # unique qid), not by a lookup of every qid first: the usual batch has none.
        top = db.execute("SELECT max(seq) FROM records").fetchone()[0] or 0
        inserted = db.executemany(_INSERT, rows).rowcount
        if inserted == len(rows):
            # A new row's seq (the rowid) is one above the largest: these are top + 1 on.
            appended: Appended | None = Appended(self.store_id, top, rows)
        else:
            appended = None
            # Some were there already, or twice in this batch: the new rows are the
            # ones above the old top seq (a new row's seq is above every seq there).
            new = {qid for (qid,) in db.execute("SELECT qid FROM records WHERE seq > ?", (top,))}
            kept = []
            for row in rows:
                if row[0] in new:  # its first copy in the batch: the one inserted
                    new.discard(row[0])
                    kept.append(row)
            rows = kept
        volume: dict[tuple[int, str | bytes], int] = {}
        for row in rows:
            level = row[4]
            key = (row[2] // _MINUTE, _NO_LEVEL if level is None else level)
            volume[key] = volume.get(key, 0) + 1
        # Every row of ``rows`` was inserted: a redelivered batch counts nothing twice.
        db.executemany(_UPSERT_DEVICE, core.device_stats((row[1], row[2], row[4]) for row in rows))
        db.executemany(_UPSERT_VOLUME, [(minute, level, n)
                                        for (minute, level), n in volume.items()])
        return len(rows), appended

    # -- reads ----------------------------------------------------------------

    def _where(self, query: LogQuery, seqs: tuple[int, int] | None = None,
               indexed: bool | None = None) -> tuple[list[str], list[Any]]:
        """The WHERE terms of ``query`` (:func:`fleetlog.store.core.where`, and the search).

        ``seqs``: only records of seq in ``[low, high]``.  ``indexed``: for a
        ``grep``, look only in the search index (True) or only scan the records
        it does not cover yet (False: those of ``seqs``, which the caller knows
        the index does not cover, else those past ``fts_through``); both (None)
        by default.
        """
        where: list[str] = []
        params: list[Any] = []
        if seqs is not None:
            where.append("seq BETWEEN ? AND ?")
            params.extend(seqs)
        shared, shared_params = core.where(query, DIALECT)
        where += shared
        params += shared_params
        if query.grep:
            needle = search_needle(query.grep)
            scan = "instr(fleetlog_search_text(data), ?) > 0"
            if self.schema_version < _SEARCH_SCHEMA:  # an old store opened read-only
                where.append(scan)
                params.append(needle)
            else:
                # Indexed records: the trigram index narrows (three characters or
                # more), instr on the same text decides.  The rest: a scan.
                search = "SELECT seq FROM search WHERE instr(text, ?) > 0"
                search_params: list[Any] = [needle]
                if seqs is not None:
                    search += " AND seq BETWEEN ? AND ?"
                    search_params.extend(seqs)
                if len(needle) >= _TRIGRAM:
                    fts = "SELECT rowid FROM search_fts WHERE search_fts MATCH ?"
                    search_params.append(_fts_query(needle))
                    if seqs is not None:  # FTS5 seeks its doclists to the first such rowid
                        fts += " AND rowid BETWEEN ? AND ?"
                        search_params.extend(seqs)
                    search += f" AND seq IN ({fts})"
                unindexed = f"seq > (SELECT value FROM meta WHERE key = 'fts_through') AND {scan}"
                if indexed is None:
                    where.append(f"(seq IN ({search}) OR ({unindexed}))")
                    params.extend((*search_params, needle))
                elif indexed:
                    where.append(f"seq IN ({search})")
                    params.extend(search_params)
                else:
                    where.append(scan if seqs is not None else unindexed)
                    params.append(needle)
        return where, params

    def query(self, query: LogQuery) -> list[StoredRecord]:
        with self._reading():
            if (query.device_id is None and query.after_seq is None
                    and self.schema_version >= _RECEIVED_MAX_SCHEMA):
                rows = self._newest_fleet(query)
            else:
                rows = self._select(query)
        if query.after_seq is None:
            rows.reverse()
        return rows

    def _select(self, query: LogQuery, seqs: tuple[int, int] | None = None,
                indexed: bool | None = None) -> list[StoredRecord]:
        """The query's records (see :meth:`_where`), newest first (or seq order: follow)."""
        where, params = self._where(query, seqs, indexed)
        sql = core.select_statement(DIALECT, where, core.order_of(query), limited=True)
        params.append(query.limit)
        return [core.row(values) for values in self._db.execute(sql, params)]

    def _newest_fleet(self, query: LogQuery) -> list[StoredRecord]:
        """The fleet's newest ``limit`` matches by ``(received_at, seq)``, newest first.

        There is no index on ``received_at`` (it costs every insert), and a common
        word matches a fifth of the store: sorting every match for the newest 100
        took 0.5 s at 1M records.  But received_at mostly grows with seq, so this
        reads the newest seqs first, ``seq >= low`` (FTS5 and the rowid seek
        there), and widens the window 4x at a time (reading only what it adds)
        until it holds ``limit`` matches, the ``limit``-th of which is at least as
        new as anything below ``low`` can be: ``received_max`` bounds the
        received_at of every seq under ``low`` (a block boundary), and at an equal
        received_at a lower seq sorts older.  So the answer is the one the full
        sort gives, also for records that arrived out of seq order (a worker
        committing a later batch first, a redelivery); only the work differs.
        The records the index does not cover yet (``received_max`` neither) are
        scanned once, whatever the window.

        Every statement reads a slice of at most :data:`_WINDOW_SLICE` seqs
        (:data:`_SCAN_SLICE` where it scans), and no transaction spans them: a
        reader in a long statement or transaction keeps the writer from
        restarting the WAL (see the module docstring); a common word absent from
        the newest records took one statement of 0.5 s over a million seqs, and
        slices stretch under a CPU-starved reader (the API runs at ``nice 19``).
        Every range is fixed by the first statement (``through``, ``top``), so
        records written or indexed meanwhile change nothing, and one pruned
        meanwhile may show or not, as it would a moment earlier or later.
        """
        if query.limit <= 0:
            return []
        through, first, top = self._db.execute(
            "SELECT (SELECT value FROM meta WHERE key = 'fts_through'),"
            " (SELECT coalesce(min(seq), 0) FROM records),"
            " (SELECT coalesce(max(seq), 0) FROM records)").fetchone()
        through = min(through, top)
        found = self._slices(query, through + 1, top, indexed=False,
                             step=_SCAN_SLICE if query.grep else _WINDOW_SLICE)
        high = through  # the seqs above it are read
        width = max(_FIRST_WINDOW, 16 * query.limit)
        while True:  # 4x wider each time: the whole store within 15 rounds
            low = (through + 1 - width) >> _BLOCK_BITS << _BLOCK_BITS
            whole = low <= first
            low = 0 if whole else low
            found = self._newest(query, found + self._slices(query, low, high, indexed=True))
            high = low - 1
            if whole:
                return found
            if len(found) == query.limit:
                (older,) = self._db.execute(
                    "SELECT max(received_at) FROM received_max WHERE block < ?",
                    (low >> _BLOCK_BITS,)).fetchone()
                if older is None or found[-1].received_at >= older:
                    return found
            width *= 4

    @staticmethod
    def _newest(query: LogQuery, rows: list[StoredRecord]) -> list[StoredRecord]:
        rows.sort(key=lambda row: (row.received_at, row.seq), reverse=True)
        return rows[:query.limit]

    def _slices(self, query: LogQuery, low: int, high: int, *, indexed: bool,
                step: int = _WINDOW_SLICE) -> list[StoredRecord]:
        """The newest ``limit`` matches of seqs ``[low, high]``, one statement per ``step`` seqs."""
        found: list[StoredRecord] = []
        for top in range(high, low - 1, -step):
            found = self._newest(query, found + self._select(
                query, (max(low, top - step + 1), top), indexed=indexed))
        return found

    def volume(self, device_id: str | None, since: int, until: int,
               step: int) -> list[VolumeBucket]:
        core.check_step(step)
        if (device_id is None and since >= 0 and since % _MINUTE == 0 and until % _MINUTE == 0
                and step % _MINUTE == 0 and self.schema_version >= _VOLUME_SCHEMA):
            return self._fleet_volume(since, until, step)
        where, params = core.where(LogQuery(device_id, since=since, until=until), DIALECT)
        sql = (f"SELECT received_at / ? * ? AS bucket, level, count(*) FROM records"
               f" WHERE {' AND '.join(where)} GROUP BY bucket, level ORDER BY bucket, level")
        with self._reading():
            return [VolumeBucket(*values)
                    for values in self._db.execute(sql, [step, step, *params])]

    def _fleet_volume(self, since: int, until: int, step: int) -> list[VolumeBucket]:
        """The fleet's volume from the per-minute counts, in buckets of ``step`` (whole minutes).

        Exact for whole minutes only; :meth:`volume` counts the records themselves
        for anything else (a device, a step or bound within a minute).
        """
        sql = ("SELECT minute * ? / ? * ? AS bucket,"
               " CASE WHEN typeof(level) = 'blob' THEN NULL ELSE level END AS lvl, sum(n)"
               " FROM volume WHERE minute >= ? AND minute < ?"
               " GROUP BY bucket, lvl ORDER BY bucket, lvl")
        with self._reading():
            return [VolumeBucket(*values) for values in self._db.execute(
                sql, (_MINUTE, step, step, since // _MINUTE, until // _MINUTE))]

    def after(self, seq: int, limit: int) -> list[StoredRecord]:
        with self._reading():
            return [core.row(values) for values in self._db.execute(_AFTER, (seq, limit))]

    def seqs_of(self, qids: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        with self._reading():
            for start in range(0, len(qids), 500):
                chunk = list(qids[start:start + 500])
                found.update(self._db.execute(
                    f"SELECT qid, seq FROM records WHERE qid IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall())
        return found

    def index_lag(self) -> int:
        """About how many stored records the search index does not cover yet (SQLite only)."""
        with self._reading():
            lag: int = self._db.execute(
                "SELECT coalesce(max(seq), 0) - (SELECT value FROM meta WHERE key = 'fts_through')"
                " FROM records"
            ).fetchone()[0]
        return max(0, lag)

    def index_step(self, limit: int) -> int:
        """Add up to ``limit`` stored records to the search index; return how many."""
        with self._transaction(upkeep=True) as db:
            through = db.execute("SELECT value FROM meta WHERE key = 'fts_through'").fetchone()[0]
            rows = db.execute(
                "SELECT seq, data, received_at FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (through, limit),
            ).fetchall()
            if not rows:
                return 0
            last = rows[-1][0]
            texts = [(seq, search_text(data)) for seq, data, _ in rows]
            newest: dict[int, int] = {}
            for seq, _, received_at in rows:
                block = seq >> _BLOCK_BITS
                newest[block] = max(newest.get(block, received_at), received_at)
            db.executemany("INSERT INTO search (seq, text) VALUES (?, ?)", texts)
            db.executemany("INSERT INTO search_fts (rowid, text) VALUES (?, ?)", texts)
            db.executemany(
                "INSERT INTO received_max (block, received_at) VALUES (?, ?) ON CONFLICT (block)"
                " DO UPDATE SET received_at = max(received_at, excluded.received_at)",
                list(newest.items()))
            db.execute("UPDATE meta SET value = ? WHERE key = 'fts_through'", (last,))
        return len(rows)

    def upkeep(self, budget: int) -> int:
        """Index up to ``budget`` records (see :meth:`index_step`); return the index lag.

        In transactions of at most :data:`_INDEX_CHUNK` records, the WAL bounded
        after each: one transaction's pages all go into the WAL, whatever the
        readers: a chunk bounds what one transaction adds to the WAL.
        """
        if budget > 0 and not self.readonly:
            while budget > 0:
                done = self.index_step(min(budget, _INDEX_CHUNK))
                self._bound_wal()
                if done == 0:
                    break
                budget -= done
        return self.index_lag()

    def used_bytes(self) -> int:
        """Bytes of the database in use (free pages excluded)."""
        with self._reading():
            pages, free, size = (
                self._db.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("page_count", "freelist_count", "page_size")
            )
        return int((pages - free) * size)

    def prune(self, *, before: int | None, max_bytes: int | None, limit: int) -> int:
        """Delete up to ``limit`` of the oldest records received before ``before``
        or, when the store is over ``max_bytes``, the oldest records until it is
        not; return how many.

        One short transaction per ``limit`` records, so a worker can interleave
        pruning with ingestion without stalling it for long.  The newest record
        is always kept: SQLite numbers a new row max(seq) + 1, so emptying the
        table would hand out seqs again from 1, and every cursor (``--follow``,
        the daily files) holding an old seq would skip the new records (see the
        cursor contract).

        By size, what a deleted record took is not all given back at once: its
        table and index pages go to the free list (not counted), but the full-text
        index only records that the record left, in pages of its own, until its
        segments are merged.  Measured while those pages stay, the store looked
        over the cap until nothing was left (20,000 records pruned to 1 by a cap
        of half the store).  So a size pass first gives the full-text index's
        pages back (:meth:`_reclaim_search`, when records left since), measures,
        and deletes the oldest records in proportion to how far over it is (the
        records' share of the store is their share of its bytes), then measures
        again.
        """
        if before is not None:
            # The oldest records by seq (no index on received_at: it would slow every
            # insert); a record redelivered long after its peers goes a little later.
            return self._delete_oldest(
                "SELECT seq FROM (SELECT seq, received_at FROM records ORDER BY seq LIMIT ?)"
                " WHERE received_at < ?", (limit, before))
        if max_bytes is None:
            return 0
        deleted = 0
        while (used := self.used_bytes()) > max_bytes:
            if self._reclaim_search():
                continue  # measure again, without the pages the index gave back
            live = self._live_records()
            over = min(live - 1, max(1, -(-live * (used - max_bytes) // used)))
            if over <= 0:
                break  # only the newest record is left (kept: see above)
            while over > 0:
                done = self._delete_oldest("SELECT seq FROM records ORDER BY seq LIMIT ?",
                                           (min(limit, over),))
                if not done:
                    return deleted
                deleted += done
                over -= done
        return deleted

    def _live_records(self) -> int:
        with self._reading():
            row = self._db.execute("SELECT coalesce(sum(records), 0) FROM devices").fetchone()
        return int(row[0])

    def _delete_oldest(self, victims: str, params: tuple[int, ...]) -> int:
        """Delete the records ``victims`` selects (never the newest); return how many."""
        with self._transaction(upkeep=True) as db:
            gone: Counter[str] = Counter()
            volume: Counter[tuple[int, str | bytes]] = Counter()
            for device, received_at, level in db.execute(
                    f"DELETE FROM records WHERE seq IN ({victims})"
                    " AND seq < (SELECT max(seq) FROM records)"
                    " RETURNING device_id, received_at, level", params):
                gone[device] += 1
                volume[received_at // _MINUTE, _NO_LEVEL if level is None else level] += 1
            db.executemany("UPDATE devices SET records = max(0, records - ?) WHERE device_id = ?",
                           [(count, device) for device, count in gone.items()])
            counts = [(n, minute, level) for (minute, level), n in volume.items()]
            db.executemany("UPDATE volume SET n = n - ? WHERE minute = ? AND level = ?", counts)
            db.executemany("DELETE FROM volume WHERE n <= 0 AND minute = ? AND level = ?",
                           [(minute, level) for minute, level in volume])
            # Blocks wholly pruned; the rest stay an upper bound, which is all reads need.
            db.execute("DELETE FROM received_max WHERE block <"
                       f" (SELECT coalesce(min(seq), 0) FROM records) >> {_BLOCK_BITS}")
            if gone:  # the full-text index holds pages for them until merged (_reclaim_search)
                db.execute("INSERT INTO meta (key, value) VALUES ('search_reclaim', 1)"
                           " ON CONFLICT (key) DO UPDATE SET value = 1")
        self._bound_wal()
        return sum(gone.values())

    def _reclaim_search(self) -> bool:
        """Merge the full-text index's segments until the records deleted from it are gone
        from its pages too; whether there was anything to do.

        FTS5 keeps a deleted row's entries, and a note that it left, until a merge
        brings them together; ``merge`` with a negative count merges whatever the
        segments' levels, a bounded amount of work per transaction (the WAL is
        bounded after each), and changes nothing once the index is one segment
        without deleted rows: the end of ``optimize``, in steps.
        """
        with self._reading():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'search_reclaim'").fetchone()
        if not row or not row[0]:
            return False
        while True:
            with self._transaction(upkeep=True) as db:
                before = db.total_changes
                db.execute("INSERT INTO search_fts (search_fts, rank) VALUES ('merge', ?)",
                           (-_RECLAIM_PAGES,))
                merged = db.total_changes - before > 1  # the command's own row counts one
                if not merged:
                    db.execute("UPDATE meta SET value = 0 WHERE key = 'search_reclaim'")
            self._bound_wal()
            if not merged:
                return True

    def max_seq(self) -> int:
        with self._reading():
            seq: int = self._db.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]
        return seq

    def devices(self) -> list[DeviceStats]:
        with self._reading():
            last_error = ("last_error" if self.schema_version >= _LAST_ERROR_SCHEMA
                          else "NULL")  # an old store opened read-only
            cursor = self._db.execute(
                f"SELECT device_id, records, first_seen, last_seen, {last_error}"
                " FROM devices ORDER BY device_id"
            )
            return [DeviceStats(*values) for values in cursor]

    def close(self) -> None:
        self._db.close()
