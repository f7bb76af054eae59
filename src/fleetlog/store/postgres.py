"""The store for fleets that outgrow one file: PostgreSQL, records partitioned by day.

Several workers on several machines write to one database; readers (``fleetlog
logs``, the API) may read from replicas.  The design, and why:

* **Partitions by day of ``received_at``** (declarative range partitioning), so
  retention by age drops whole tables (:meth:`PostgresStore.prune`) instead of
  deleting rows (only the day the cutoff falls in is deleted from by row),
  and a time-range read touches only its days.  Days ahead are
  created in advance (:data:`DAYS_AHEAD`), so an insert never waits on DDL; a
  record of a day with no partition yet (a redelivery from long ago) gets its
  partition created before its batch is written.
* **Idempotent writes**: ``received_at`` derives from the Redis stream id, so
  a redelivered record falls into the same partition, and the primary key
  (``qid``, ``stream``, ``received_at``) refuses it.  A batch is ``COPY``-ed
  straight into ``records`` (the common case: every record new); when the key
  refuses one (a redelivery) the batch is written again in a new transaction
  through a staging table and ``INSERT ... ON CONFLICT DO NOTHING``.  The stream
  key is part of the identity: the same id from two stream shards is two records.
* **A cursor that never skips a late commit.**  With several writers, a
  sequence number taken at insert time is not the order in which rows become
  visible: a transaction holding seq 10 may commit after one holding seq 11,
  and a reader that already moved past 11 would never see 10.  Here ``seq`` is
  ``transaction id * 2**20 + position in the batch`` (:data:`SEQ_SHIFT`), and a
  cursor read (:meth:`PostgresStore.after`, ``LogQuery.after_seq``,
  :meth:`PostgresStore.max_seq`) only returns rows below the reader's
  snapshot ``xmin``: every transaction with a lower id has committed or
  aborted, and every transaction to come gets a higher one, so nothing can
  appear below the horizon later.  A reader waits (at most) for the oldest
  open write transaction, and never skips or repeats a record.
* **Search** matches exactly what every backend matches
  (:mod:`fleetlog.store.search`): ``search.body`` holds
  :func:`~fleetlog.store.search.search_text` of the record (its decoded
  strings, case-folded by Python's ``str.casefold``, which PostgreSQL's
  ``lower()`` is not), the needle is case-folded in Python too, and the two
  meet in a ``LIKE`` with every wildcard escaped, served by a ``pg_trgm`` GIN
  index: substring search that works for Chinese, the choice the SQLite store
  makes with its trigram index.  As there, the index costs more than storing
  the record, so it is built after the commit by :meth:`PostgresStore.upkeep`
  (below the horizon only, so a late commit is indexed later, never skipped),
  and a search matches the few records not indexed yet in Python.
* **Per-device stats** are kept as insert-only deltas (``device_counts``), so
  two workers writing records of the same devices never wait on each other's
  row locks; :meth:`PostgresStore.upkeep` folds them together.  They hold what
  the SQLite store's ``devices`` table holds: records, first and last seen, and
  ``last_error``, the ``received_at`` of the device's newest ``error``/``fatal``
  record (:data:`~fleetlog.store.fields.ERROR_LEVELS`), which retention leaves
  as it is (as on SQLite).
* **Text columns hold no NUL** (PostgreSQL's text cannot): a NUL sent escaped in
  a record's JSON is U+FFFD in ``level`` and ``message`` on every store
  (:func:`~fleetlog.store.fields.column_text`), and kept as sent in ``data``.
  A record whose raw bytes hold a NUL is refused on every store.
* **Readers** (``readonly=True``) never create nor migrate anything: a
  database without fleetlog's tables is :class:`StoreMissing`, and their
  sessions are read-only.

Connections come from a pool (psycopg 3); TLS, passwords and the rest come
from the URL or libpq's ``PG*`` environment variables.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from fleetlog.config import mask_url
from fleetlog.errors import BatchTooLarge
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

__all__ = ["DAYS_AHEAD", "MIGRATIONS", "SEQ_SHIFT", "PostgresStore"]

log = logging.getLogger("fleetlog.store")

DAY_MS: Final = 86_400_000
#: Partitions are created this many days ahead of today.
DAYS_AHEAD: Final = 7
#: ``seq`` = transaction id << SEQ_SHIFT | position in the batch: at most 2**20 - 1
#: records per transaction; 2**43 transactions (a thousand a second for 270 years) fit.
SEQ_SHIFT: Final = 20
MAX_BATCH: Final = (1 << SEQ_SHIFT) - 1
#: Delta rows of device stats written since the last fold before upkeep reports work due.
_FOLD_AFTER: Final = 4096
#: How long a pooled connection may be waited for before the store counts as unavailable.
_POOL_TIMEOUT_S: Final = 3.0
#: How long pruning waits for the lock on the records table before giving up for now.
_UPKEEP_LOCK_TIMEOUT: Final = "2s"
#: Serialises partition DDL and migrations between workers (an arbitrary advisory lock key).
_DDL_LOCK: Final = 0x666C656574

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: records partitioned by day, device stats as deltas, the store's identity.
    """
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE TABLE records (
        seq         bigint NOT NULL,
        stream      text   COLLATE "C" NOT NULL,
        qid         text   COLLATE "C" NOT NULL,
        device_id   text   COLLATE "C" NOT NULL,
        received_at bigint NOT NULL,
        ts          bigint,
        level       text,
        message     text,
        data        text   NOT NULL,
        PRIMARY KEY (qid, stream, received_at)
    ) PARTITION BY RANGE (received_at);
    CREATE INDEX records_device ON records (device_id, received_at, seq);
    CREATE INDEX records_seq ON records (seq);
    -- The fleet's newest first (the API's pages, --retention's boundary day), per partition.
    CREATE INDEX records_time ON records (received_at, seq);
    -- What a search looks in (fleetlog.store.search), written by upkeep, partitioned alike.
    CREATE TABLE search (
        received_at bigint NOT NULL,
        seq         bigint NOT NULL,
        body        text   NOT NULL
    ) PARTITION BY RANGE (received_at);
    CREATE INDEX search_body ON search USING gin (body gin_trgm_ops);
    CREATE INDEX search_seq ON search (seq);
    CREATE TABLE device_counts (
        device_id  text   NOT NULL,
        records    bigint NOT NULL,
        first_seen bigint NOT NULL,
        last_seen  bigint NOT NULL
    );
    CREATE INDEX device_counts_device ON device_counts (device_id);
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    INSERT INTO meta (key, value)
        VALUES ('store_id', lpad(to_hex((random() * 9.2e18)::bigint), 16, '0')),
               ('search_through', '0');
    """,
    # 2: when each device last sent an error (or fatal) record, as the SQLite store keeps it
    # (its migration 7): one delta row per device that has one, from the records stored.
    """
    ALTER TABLE device_counts ADD COLUMN last_error bigint;
    INSERT INTO device_counts (device_id, records, first_seen, last_seen, last_error)
    SELECT device_id, 0, min(received_at), max(received_at), max(received_at) FROM records
    WHERE level IN ('error', 'fatal') GROUP BY device_id;
    """,
)
#: The first schema with ``device_counts.last_error``; older ones (read-only) report None.
_LAST_ERROR_SCHEMA: Final = 2

_STAGED: Final = "n, stream, qid, device_id, received_at, ts, level, message, data"
_COPY: Final = ("COPY records (seq, stream, qid, device_id, received_at, ts, level, message, data)"
                " FROM STDIN")
#: What is added to transaction ids: 0 until the store is restored into a cluster whose ids
#: are behind its records' (a ``pg_dump`` restored into a new ``initdb``), then what keeps
#: ``seq`` ahead of every record it holds (:meth:`PostgresStore._keep_seq_ahead`).
_XID_OFFSET: Final = "coalesce((SELECT value::bigint FROM meta WHERE key = 'xid_offset'), 0)"
#: This transaction's id, as ``seq`` counts it.
_XID: Final = f"(pg_current_xact_id()::text::bigint + {_XID_OFFSET})"
#: Everything below it is final: no transaction with a lower id can still commit.
_HORIZON: Final = (f"((pg_snapshot_xmin(pg_current_snapshot())::text::bigint + {_XID_OFFSET})"
                   f" << {SEQ_SHIFT})")
#: How PostgreSQL spells the shared rules (:mod:`fleetlog.store.core`): a follow cursor
#: reads only below the horizon (see the module docstring).
DIALECT: Final = core.Dialect(param="%s", after_seq=f"seq > %s AND seq < {_HORIZON}",
                              row_values=True, level_array=True)
_AFTER: Final = core.after_statement(DIALECT).encode()
_STAGING: Final = """
    CREATE TEMP TABLE IF NOT EXISTS staging (
        n integer, stream text, qid text, device_id text, received_at bigint, ts bigint,
        level text, message text, data text
    ) ON COMMIT DELETE ROWS
"""
_INSERT: Final = f"""
    WITH new AS (
        INSERT INTO records (seq, {_STAGED.removeprefix('n, ')})
        SELECT ({_XID} << {SEQ_SHIFT}) + n,
               {_STAGED.removeprefix('n, ')}
        FROM staging ORDER BY n
        ON CONFLICT DO NOTHING
        RETURNING device_id, received_at, level
    )
    SELECT device_id, received_at, level FROM new
"""
_COUNT: Final = """
    INSERT INTO device_counts (device_id, records, first_seen, last_seen, last_error)
    SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])
"""
_FOLD: Final = """
    WITH gone AS (DELETE FROM device_counts RETURNING *)
    INSERT INTO device_counts (device_id, records, first_seen, last_seen, last_error)
    SELECT device_id, sum(records), min(first_seen), max(last_seen), max(last_error)
    FROM gone GROUP BY device_id
"""
_DEVICES: Final = (
    "SELECT device_id, greatest(sum(records), 0)::bigint, min(first_seen), max(last_seen), {}"
    ' FROM device_counts GROUP BY device_id ORDER BY device_id COLLATE "C"'
)
_PARTITION: Final = re.compile(r"records_(\d{8})")
#: Records indexed per upkeep transaction at most.
_INDEX_CHUNK: Final = 20_000
#: Counting what is not indexed yet stops here (the worker only compares it to a limit).
_LAG_CAP: Final = 1_000_000
#: Between two counts of what is not indexed, the count is kept up to date by this process.
_LAG_COUNT_EVERY_S: Final = 1.0
#: One worker indexes at a time (others skip, not wait): an arbitrary advisory lock key.
_INDEX_LOCK: Final = 0x666C656575
#: libpq's words when the URL's database is not there.
_NO_DATABASE: Final = re.compile(r'database "[^"]*" does not exist')


def day_of(ms: int) -> int:
    """The number of the UTC day ``ms`` falls in (days since the epoch)."""
    return ms // DAY_MS


def partition_name(day: int, table: str = "records") -> str:
    return f"{table}_" + datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y%m%d")


def _partition_day(name: str) -> int | None:
    match = _PARTITION.fullmatch(name)
    if match is None:
        return None
    moment = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC)
    return int(moment.timestamp()) // 86_400


def _like(text: str) -> str:
    """An ILIKE pattern finding ``text`` anywhere, its wildcards taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _stamp(qid: str) -> int | None:
    """The milliseconds of a stream id (``ms-n``), which is the record's ``received_at``."""
    head, dash, tail = qid.partition("-")
    if dash and head.isdigit() and tail.isdigit():
        return int(head)
    return None


class PostgresStore:
    """:class:`~fleetlog.store.base.Store` on a PostgreSQL database (``postgresql://...``)."""

    def __init__(self, url: str, *, readonly: bool = False, pool_size: int = 4,
                 timeout: float = _POOL_TIMEOUT_S) -> None:
        self.url = url
        self.timeout = timeout
        self.readonly = readonly
        self.pool_size = pool_size
        self._store_id: str | None = None
        self._days: set[int] = set()  # partitions known to exist
        self._ahead_until = 0  # today's day number + DAYS_AHEAD when last made sure of
        self._unfolded = 0
        self._lag_counted = 0  # records not indexed at the last count (-1: count again)
        self._lag_counted_at = float("-inf")
        self._limit: ReadLimit | None = None
        self._has_last_error = False  # the schema has device_counts.last_error (known so far)
        self._open()

    # -- connections ----------------------------------------------------------

    def _open(self) -> None:
        # The worker acknowledges the queue right after the commit: a commit must be
        # durable whatever the server's default (synchronous_commit=off loses the last
        # commits in a crash), so every connection asks for it.
        options = "-c synchronous_commit=on"
        if self.readonly:
            options += " -c default_transaction_read_only=on"
        kwargs = {"options": options, "application_name": "fleetlog"}
        self._probe(kwargs)
        # No check of a connection at each checkout: it cost a round trip per batch
        # (15% of a worker's time).  A connection the server dropped fails its next
        # statement instead (StoreUnavailable: the worker retries, acking nothing)
        # and the pool discards it.
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url, min_size=1, max_size=self.pool_size, open=False, kwargs=kwargs,
            timeout=self.timeout, name="fleetlog-store",
        )
        try:
            self._pool.open(wait=True, timeout=self.timeout)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {mask_url(self.url)}: {exc}") from exc
        if not self.readonly:
            self._migrate()
            self._keep_seq_ahead()
            self._ensure_ahead()

    def _probe(self, kwargs: dict[str, str]) -> None:
        """Connect once before pooling: say at once why the store cannot be used.

        (A pool would retry a refused login or a missing database until its
        timeout.)  A reader also checks that the database holds a fleetlog
        store it can read: none is :class:`StoreMissing`, never one created.
        """
        where = mask_url(self.url)
        try:
            conn = psycopg.connect(self.url, connect_timeout=max(1, round(self.timeout)),
                                   autocommit=True, options=kwargs["options"],
                                   application_name=kwargs["application_name"])
        except psycopg.OperationalError as exc:
            if self.readonly and _NO_DATABASE.search(str(exc)):
                raise StoreMissing(
                    f"no store at {where}: the database does not exist; "
                    "pass --store URL to read the store you mean") from exc
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {where}: {exc}") from exc
        try:
            # Records are UTF-8 text: a LATIN1 database refuses some (the worker exited on
            # them, again on every restart), a SQL_ASCII one gives bytes back to readers.
            row = conn.execute("SHOW server_encoding").fetchone()
            value = row[0] if row is not None else "?"
            encoding = value.decode() if isinstance(value, bytes) else str(value)  # SQL_ASCII: bytes
            if encoding.upper().replace("-", "") != "UTF8":
                raise StoreUnavailable(
                    f"{where} has encoding {encoding}: fleetlog stores UTF-8 text; create the "
                    "database with ENCODING 'UTF8' (createdb -E UTF8 -T template0 ...)")
            if not self.readonly:
                return
            version = self._version(conn)
            if version == 0:
                raise StoreMissing(
                    f"no store at {where}: the database has no fleetlog tables "
                    "(nothing has been stored there); pass --store URL to read the store you mean")
            core.check_schema(where, version, len(MIGRATIONS))
            missing = [table for table in ("records", "device_counts", "meta")
                       if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,)]
            if missing:
                raise StoreUnavailable(f"{where} is a damaged fleetlog store: no table "
                                       + ", ".join(missing))
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot read {where}: {type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection, in a transaction committed on success.

        The server's faults (down, restarting, disk full, a lock not granted in
        time, the pool exhausted) become :class:`StoreUnavailable`; a broken
        connection is discarded by the pool, and the next call gets a fresh one.
        """
        limit = self._limit
        if limit is None:
            try:
                with self._pool.connection() as conn:
                    yield conn
            except psycopg.errors.ProgramLimitExceeded:
                raise  # the statement's data past a limit (an index row): the same on every try
            except (psycopg.OperationalError, PoolTimeout) as exc:
                raise StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}".strip()) from exc
            return
        if limit.stopped():
            raise limit.error()
        try:
            with self._pool.connection(timeout=min(self.timeout, limit.remaining() or self.timeout)) as conn:
                left = limit.remaining()
                if left is not None:  # the budget left, for each statement of this transaction
                    conn.execute(f"SET LOCAL statement_timeout = {max(1, int(left * 1000))}")
                with limit.stopper(conn.cancel_safe):
                    yield conn
        except (psycopg.errors.QueryCanceled, PoolTimeout) as exc:
            if limit.stopped() or isinstance(exc, psycopg.errors.QueryCanceled):
                raise limit.error() from exc
            raise StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}".strip()) from exc
        except psycopg.errors.ProgramLimitExceeded:
            raise
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}".strip()) from exc

    def set_read_limit(self, limit: ReadLimit | None) -> None:
        """Hold the reads that follow to ``limit``: ``statement_timeout`` set to what is left
        of it in each transaction, and a cancel request sent when it is cancelled."""
        self._limit = limit

    # -- identity ---------------------------------------------------------------

    @property
    def store_id(self) -> str:
        if self._store_id is None:
            with self._connection() as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            if row is None:
                raise StoreUnavailable("PostgreSQL: no store id (schema not migrated)")
            self._store_id = str(row[0])
        return self._store_id

    def replaced(self) -> bool:
        """Always False: a database is not a file that can be moved away under a worker.

        (A restored backup keeps its store id; the daily files tell it apart by
        the seqs it holds, as for SQLite.)
        """
        return False

    def reopen(self) -> None:
        self._pool.close()
        self._days.clear()
        self._ahead_until = 0
        self._store_id = None
        self._open()

    # -- schema -------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        with self._connection() as conn:
            return self._version(conn)

    @staticmethod
    def _version(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(
            "SELECT coalesce(max(version), 0) FROM schema_version"
        ).fetchone() if conn.execute(
            "SELECT to_regclass('schema_version') IS NOT NULL"
        ).fetchone() == (True,) else (0,)
        return int(row[0]) if row is not None else 0

    def _migrate(self) -> None:
        """Bring the schema up to :data:`MIGRATIONS` (up only), one worker at a time."""
        with self._connection() as conn:
            if self._version(conn) == len(MIGRATIONS):
                return
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            version = self._version(conn)
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                conn.execute(script.encode())
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
                log.info("PostgreSQL store migrated to schema version %d", number)

    def _keep_seq_ahead(self) -> None:
        """Make the next ``seq`` greater than every stored one, whatever the cluster.

        ``seq`` is a transaction id: restored into a new cluster (``pg_dump``,
        then ``pg_restore`` into a fresh ``initdb``, as for a major upgrade or
        a lost server), the store's records hold ids far ahead of the new
        cluster's, and new records got smaller seqs than theirs: every cursor
        (the daily files, ``--follow``, the search index's) passed them over.
        Once the ids are behind, :data:`_XID_OFFSET` is set to what puts them
        ahead again, under the lock every writer takes to change the schema.
        """
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            row = conn.execute(f"SELECT coalesce(max(seq), 0), pg_current_xact_id()::text::bigint,"
                               f" {_XID_OFFSET} FROM records").fetchone()
            assert row is not None
            newest, xid, offset = (int(value) for value in row)
            if (xid + offset) << SEQ_SHIFT > newest:
                return
            offset = (newest >> SEQ_SHIFT) + 1 - xid
            conn.execute("INSERT INTO meta (key, value) VALUES ('xid_offset', %s)"
                         " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(offset),))
            log.warning("the store's records are ahead of this PostgreSQL's transaction ids (a "
                        "restore into a new cluster?): seq now counts from %d on", newest + 1)

    def _ensure_days(self, days: set[int]) -> None:
        """Create the partitions of ``days`` that do not exist yet (own transaction)."""
        missing = days - self._days
        if not missing:
            return
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            existing = {
                _partition_day(name) for (name,) in conn.execute(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'records'::regclass"
                )
            }
            for day in sorted(missing - existing):
                for table in ("records", "search"):
                    conn.execute(sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {}"
                        " FOR VALUES FROM ({}) TO ({})"
                    ).format(sql.Identifier(partition_name(day, table)), sql.Identifier(table),
                             sql.Literal(day * DAY_MS), sql.Literal((day + 1) * DAY_MS)))
                log.info("PostgreSQL partition %s created", partition_name(day))
        self._days |= missing

    def _ensure_ahead(self) -> None:
        """Partitions from yesterday to :data:`DAYS_AHEAD` days ahead, made once a day."""
        today = day_of(int(time.time() * 1000))
        if self._ahead_until >= today + DAYS_AHEAD:
            return
        self._ensure_days(set(range(today - 1, today + DAYS_AHEAD + 1)))
        self._ahead_until = today + DAYS_AHEAD

    # -- writes -------------------------------------------------------------------

    @property
    def appended(self) -> Appended | None:
        """Never known: seqs drawn at insert are not commit order here (the horizon)."""
        return None

    def write_batch(self, records: Sequence[QueuedRecord]) -> int:
        """Store ``records`` in one transaction; return how many were new.

        Raises :class:`RecordRejected` when a record's own data cannot be stored
        (nothing of the batch is then kept) and :class:`StoreUnavailable` for a
        fault of the server.
        """
        if self.readonly:
            raise StoreUnavailable(f"{mask_url(self.url)} is open read-only: no writes")
        if not records:
            return 0
        rows: list[tuple[Any, ...]] = []
        seen: set[tuple[str, str, int]] = set()
        for record in records:
            key = (record.stream, record.qid, record.received_at)
            if key in seen:
                continue  # the same entry twice in one batch
            seen.add(key)
            rows.append((len(rows) + 1, record.stream, *core.prepare(record)))
        if len(rows) > MAX_BATCH:
            raise BatchTooLarge(f"a batch holds at most {MAX_BATCH} records, not {len(rows)}")
        self._ensure_ahead()
        self._ensure_days({day_of(row[4]) for row in rows})
        try:
            try:
                new = self._copy(rows)
            except psycopg.errors.UniqueViolation:
                new = self._merge(rows)  # some are stored already (a redelivery)
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded) as exc:
            # (A value too long for an index, "index row size 4032 exceeds ... 2704", is a
            # limit of the record's data: retried as unavailable, it stopped the worker for good.)
            raise RecordRejected(f"PostgreSQL refused the record: {exc}") from exc
        self._lag_counted += new
        return new

    def _copy(self, rows: list[tuple[Any, ...]]) -> int:
        """Every row is new (the common case): ``COPY`` straight into ``records``.

        ``seq`` is this transaction's id (drawn first) and the row's place in
        the batch.  A row already stored raises UniqueViolation, and nothing of
        the transaction stays.
        """
        with self._connection() as conn:
            row = conn.execute(f"SELECT {_XID}").fetchone()
            base = int(row[0]) << SEQ_SHIFT if row is not None else 0
            with conn.cursor() as cursor, cursor.copy(_COPY) as copy:
                for values in rows:
                    copy.write_row((base + values[0], *values[1:]))
            self._count(conn, [(values[3], values[4], values[6]) for values in rows])
        return len(rows)

    def _merge(self, rows: list[tuple[Any, ...]]) -> int:
        """Some rows may be stored already: through a staging table, ``ON CONFLICT DO NOTHING``."""
        with self._connection() as conn:
            conn.execute(_STAGING)
            with conn.cursor() as cursor:
                with cursor.copy(f"COPY staging ({_STAGED}) FROM STDIN") as copy:
                    for values in rows:
                        copy.write_row(values)
                new = cursor.execute(_INSERT).fetchall()
            self._count(conn, new)
        return len(new)

    def _count(self, conn: psycopg.Connection[Any],
               new: Sequence[tuple[str, int, str | None]]) -> None:
        """Add the device-stat deltas (:func:`~fleetlog.store.core.device_stats`) of ``new``
        (device, received_at, level) rows."""
        stats = core.device_stats(new)
        if stats:  # one array per column
            conn.execute(_COUNT, [list(column) for column in zip(*stats, strict=True)])
        self._unfolded += len(stats)

    # -- upkeep ---------------------------------------------------------------------

    def upkeep(self, budget: int) -> int:
        """Index up to ``budget`` records for search, fold device stats; return records not indexed.

        The trigram index is the costly part of a write (twice what storing a
        record costs), so as in the SQLite store it is built after the commit,
        off the ingest path: :meth:`query` scans what it does not cover yet, so
        a search is complete whatever is left.  One worker indexes at a time
        (another finds the lock taken and goes back to its queue).  Device-stat
        deltas are folded once :data:`_FOLD_AFTER` piled up, and partitions are
        made ahead.  ``upkeep(0)`` only reports.
        """
        if budget > 0 and not self.readonly:
            self._ensure_ahead()
            while budget > 0:
                done = self._index(min(budget, _INDEX_CHUNK))
                if done == 0:
                    break
                budget -= done
            if self._unfolded >= _FOLD_AFTER:
                with self._connection() as conn:
                    conn.execute(_FOLD)
                self._unfolded = 0
        return self._lag()

    def _index(self, limit: int) -> int:
        """Index the next ``limit`` final records after ``search_through``; how many (0: none or busy)."""
        with self._connection() as conn:
            if conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_INDEX_LOCK,)).fetchone() != (True,):
                return 0
            through = self._through(conn)
            rows = conn.execute(
                f"SELECT received_at, seq, data FROM records WHERE seq > %s AND seq < {_HORIZON}"
                " ORDER BY seq LIMIT %s", (through, limit)).fetchall()
            if not rows:
                return 0
            with conn.cursor() as cursor, cursor.copy(
                    "COPY search (received_at, seq, body) FROM STDIN") as copy:
                for received_at, seq, data in rows:
                    copy.write_row((received_at, seq, search_text(data)))
            conn.execute("UPDATE meta SET value = %s WHERE key = 'search_through'",
                         (str(rows[-1][1]),))
        self._lag_counted -= len(rows)
        if len(rows) < limit:  # caught up (or a late commit in the way): count again
            self._lag_counted_at = float("-inf")
        return len(rows)

    @staticmethod
    def _through(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'search_through'").fetchone()
        return int(row[0]) if row is not None else 0

    def _lag(self) -> int:
        """Records stored and not indexed yet (counted up to :data:`_LAG_CAP`).

        Counting is a scan of the records not indexed, and the worker asks
        after every batch: it counts at most every :data:`_LAG_COUNT_EVERY_S`,
        and in between adds what it wrote and takes off what it indexed (other
        workers' writes show at the next count).
        """
        now = time.monotonic()
        if now - self._lag_counted_at < _LAG_COUNT_EVERY_S:
            return max(0, self._lag_counted)
        self._lag_counted_at = now
        with self._connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM (SELECT FROM records WHERE seq >"
                " (SELECT value::bigint FROM meta WHERE key = 'search_through') LIMIT %s) AS lag",
                (_LAG_CAP,)).fetchone()
        self._lag_counted = int(row[0]) if row is not None else 0
        return self._lag_counted

    def _partitions(self, conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
        """(day, name) of every partition, oldest first."""
        found = []
        for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'records'::regclass"
        ):
            day = _partition_day(name)
            if day is not None:
                found.append((day, name))
        return sorted(found)

    def used_bytes(self) -> int:
        """Bytes on disk of every partition (records and search: tables, indexes, TOAST)
        and the device stats."""
        with self._connection() as conn:
            return self._size(conn) + self._one_size(conn, "device_counts")

    @staticmethod
    def _one_size(conn: psycopg.Connection[Any], table: str) -> int:
        row = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (table,)).fetchone()
        return int(row[0]) if row is not None else 0

    @staticmethod
    def _forget(conn: psycopg.Connection[Any], gone: Sequence[tuple[Any, ...]]) -> int:
        """Take ``(device, records, first, last)`` rows that left out of the device stats."""
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO device_counts (device_id, records, first_seen, last_seen)"
                " VALUES (%s, %s, %s, %s)",
                [(device, -count, first, last) for device, count, first, last in gone],
            )
        return sum(int(count) for _, count, _, _ in gone)

    def _drop(self, conn: psycopg.Connection[Any], name: str) -> int:
        """Drop one day partition; its records leave the device stats; how many records."""
        gone = conn.execute(sql.SQL(
            "SELECT device_id, count(*), min(received_at), max(received_at) FROM {}"
            " GROUP BY device_id"
        ).format(sql.Identifier(name))).fetchall()
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
        search = name.replace("records_", "search_", 1)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(search)))
        count = self._forget(conn, gone)
        log.info("retention: dropped partition %s (%d records)", name, count)
        return count

    def _delete(self, conn: psycopg.Connection[Any], name: str, before: int | None,
                limit: int) -> int:
        """Delete the oldest ``limit`` records of one partition (received before ``before``)."""
        gone = conn.execute(sql.SQL(
            "WITH gone AS (DELETE FROM {table} WHERE ctid IN ("
            "  SELECT ctid FROM {table} WHERE received_at < %s"
            "  ORDER BY received_at, seq LIMIT %s) RETURNING device_id, received_at, seq),"
            " unsearched AS (DELETE FROM {search} WHERE seq IN (SELECT seq FROM gone))"
            " SELECT device_id, count(*), min(received_at), max(received_at) FROM gone"
            " GROUP BY device_id"
        ).format(table=sql.Identifier(name),
                 search=sql.Identifier(name.replace("records_", "search_", 1))),
            (before if before is not None else 2**62, limit)).fetchall()
        return self._forget(conn, gone)

    def prune(self, *, before: int | None, max_bytes: int | None, limit: int) -> int:
        """Delete records past retention, oldest first; return how many went.

        By age (``before``): every day partition that ends at or before it goes
        in one cheap ``DROP`` whatever its size (so ``limit``, meant to keep row
        deletes short, does not bound those), then up to ``limit`` records of
        the day it falls in, by row.  By size (``max_bytes``): the oldest past
        days' partitions, whole, while the store is over.  Not rows: a row
        delete frees space for reuse, never on disk, so the size measured after
        it is the same, and deleting "while over" went on until the store was
        empty (acked records just stored included).  Today's partition is never
        dropped: a cap below one day's records is said in the log.  ``seq``
        never goes back (it is a transaction id).  The lock a ``DROP`` needs is
        waited for at most :data:`_UPKEEP_LOCK_TIMEOUT`.
        """
        if self.readonly:
            raise StoreUnavailable(f"{mask_url(self.url)} is open read-only: no writes")
        today = day_of(int(time.time() * 1000))
        deleted = 0
        with self._connection() as conn:
            conn.execute(f"SET LOCAL lock_timeout = '{_UPKEEP_LOCK_TIMEOUT}'")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            partitions = self._partitions(conn)
            if before is not None:
                for day, name in partitions:
                    if (day + 1) * DAY_MS <= before:
                        deleted += self._drop(conn, name)
                        self._days.discard(day)
                    elif day * DAY_MS < before:
                        deleted += self._delete(conn, name, before, limit)
                        break
                    else:
                        break
            elif max_bytes is not None:
                for day, name in partitions:
                    size = self._size(conn)
                    if size <= max_bytes:
                        break
                    if day >= today:
                        log.warning("retention: the store is %d bytes, over --retention-bytes %d, "
                                    "with only today's records left: on PostgreSQL size retention "
                                    "drops whole past days (raise the cap, or use --retention)",
                                    size, max_bytes)
                        break
                    deleted += self._drop(conn, name)
                    self._days.discard(day)
        return deleted

    @staticmethod
    def _size(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0) FROM pg_inherits i"
            " WHERE i.inhparent IN ('records'::regclass, 'search'::regclass)"
        ).fetchone()
        return int(row[0]) if row is not None else 0

    # -- reads --------------------------------------------------------------------------

    def query(self, query: LogQuery) -> list[StoredRecord]:
        """The newest ``query.limit`` matching records, oldest first (see the Store contract).

        With ``after_seq`` (``--follow``): the oldest ``limit`` records after it
        in seq order that are final (below the horizon, see the module docstring).
        With ``grep``: the trigram index answers for the records it covers
        (``seq <= search_through``), and the few stored since are read and
        matched here with the same :func:`~fleetlog.store.search.search_text`.
        """
        where, params = core.where(query, DIALECT)
        span = ""  # the time range again, for the search table's partitions
        if query.since is not None:
            span += f" AND received_at >= {int(query.since)}"
        if query.until is not None:
            span += f" AND received_at < {int(query.until)}"
        newest_first = query.after_seq is None
        order = core.order_of(query)
        with self._connection() as conn:
            if not query.grep:
                rows = self._select(conn, where, params, order, query.limit)
            else:
                needle = search_needle(query.grep)
                through = self._through(conn)
                # Both sides case-folded in Python: LIKE, not ILIKE (lower() is not casefold()).
                indexed = f"seq IN (SELECT seq FROM search WHERE body LIKE %s AND seq <= %s{span})"
                rows = self._select(conn, [*where, indexed], [*params, _like(needle), through],
                                    order, query.limit)
                recent = self._select(conn, [*where, "seq > %s"], [*params, through], order, None)
                for row in recent:
                    if self._limit is not None and self._limit.stopped():
                        raise self._limit.error()
                    if needle in search_text(row.data):
                        rows.append(row)
                key = ((lambda r: (r.received_at, r.seq)) if newest_first
                       else (lambda r: (r.seq, 0)))
                rows = sorted(rows, key=key, reverse=newest_first)[:query.limit]
        if newest_first:
            rows.reverse()
        return rows

    @staticmethod
    def _select(conn: psycopg.Connection[Any], where: list[str], params: list[Any], order: str,
                limit: int | None) -> list[StoredRecord]:
        statement = core.select_statement(DIALECT, where, order, limited=limit is not None)
        values = [*params, limit] if limit is not None else params
        return [core.row(row) for row in conn.execute(statement.encode(), values)]

    def volume(self, device_id: str | None, since: int, until: int,
               step: int) -> list[VolumeBucket]:
        """Records received in ``[since, until)`` per ``step`` ms and level (partitions pruned)."""
        core.check_step(step)
        where, params = core.where(LogQuery(device_id, since=since, until=until), DIALECT)
        statement = (
            "SELECT received_at / %s * %s AS bucket, level, count(*) FROM records"
            f" WHERE {' AND '.join(where)} GROUP BY bucket, level"
            ' ORDER BY bucket, level COLLATE "C" NULLS FIRST'
        )
        with self._connection() as conn:
            return [VolumeBucket(int(start), level, int(count)) for start, level, count
                    in conn.execute(statement.encode(), [step, step, *params])]

    def after(self, seq: int, limit: int) -> list[StoredRecord]:
        """Records after ``seq`` in store order, only those no late commit can precede."""
        with self._connection() as conn:
            return [core.row(values) for values in conn.execute(_AFTER, (seq, limit))]

    def seqs_of(self, qids: Sequence[str]) -> dict[str, int]:
        """The seq of each of ``qids`` held; a stream id's time names its partition."""
        found: dict[str, int] = {}
        stamped = [(qid, stamp) for qid in qids if (stamp := _stamp(qid)) is not None]
        with self._connection() as conn:
            for start in range(0, len(stamped), 1000):
                chunk = stamped[start:start + 1000]
                found.update(conn.execute(
                    "SELECT r.qid, r.seq FROM records r"
                    " JOIN unnest(%s::text[], %s::bigint[]) AS k (qid, received_at)"
                    " ON r.qid = k.qid AND r.received_at = k.received_at",
                    ([qid for qid, _ in chunk], [stamp for _, stamp in chunk]),
                ).fetchall())
            # A record whose received_at is not its id's time (not from a stream):
            # every partition's primary key is probed.
            other = [qid for qid in qids if qid not in found]
            for start in range(0, len(other), 1000):
                found.update(conn.execute(
                    "SELECT qid, seq FROM records WHERE qid = ANY(%s)",
                    (other[start:start + 1000],),
                ).fetchall())
        return found

    def max_seq(self) -> int:
        """The ``seq`` of the newest record no late commit can precede (0 when none).

        A ``--follow`` that starts here and reads :meth:`after` it misses nothing.
        """
        with self._connection() as conn:
            row = conn.execute(
                f"SELECT coalesce(max(seq), 0) FROM records WHERE seq < {_HORIZON}"
            ).fetchone()
        return int(row[0]) if row is not None else 0

    def devices(self) -> list[DeviceStats]:
        with self._connection() as conn:
            if not self._has_last_error:  # an old store opened read-only has no last_error
                self._has_last_error = self._version(conn) >= _LAST_ERROR_SCHEMA
            last_error = "max(last_error)" if self._has_last_error else "NULL::bigint"
            cursor = conn.execute(_DEVICES.format(last_error).encode())
            return [DeviceStats(*values) for values in cursor]

    def close(self) -> None:
        self._pool.close()
