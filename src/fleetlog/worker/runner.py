"""The worker: queue -> batch -> one store transaction -> files -> ack.

A record is acknowledged only after it is committed to the store and, when the
files sink is on, fsynced into its daily file.  Everything between the read and
the ack is idempotent (the store keys on the queue id, the files sink resumes
from its own last line), so a crash anywhere redelivers records and stores
none twice.

How each kind of trouble is met:

* Redis down: back off (capped, jittered) and reconnect; nothing is lost, the
  records are still pending in Redis.
* Redis out of memory (``maxmemory`` with ``noeviction`` refuses writes): keep
  draining, since reading, XACK and XTRIM are still allowed and free memory;
  what needs a write (creating the group, a dead letter) waits and is retried.
* The store or the disk failing (:class:`StoreUnavailable`: locked, full, I/O
  error, also on the reads of upkeep): keep the batch, say why in the log,
  retry with backoff, never acknowledge meanwhile.
* The store file removed or replaced under the worker (``rm``, a backup moved
  over it): what went into the old file is not acknowledged; the worker says
  so, reopens the file at the path and writes the batch there.
* A record the store rejects (:class:`RecordRejected`) while others go
  through: it stays pending and is retried on redelivery; after
  ``max_deliveries`` it goes to the dead-letter stream with the error, and the
  rest keep flowing.
* SIGTERM/SIGINT, ``max_runtime``, ``max_messages``: finish the batch, ack,
  exit 0 (planned).  A second SIGINT exits at once (killed by SIGINT): nothing
  stored is lost and nothing unstored was acknowledged, so it is always safe.

Between batches the worker does the store's upkeep in bounded steps: the
full-text index catches up (fully when the queue is quiet; under sustained load
only when it lags by more than ``index_max_lag`` records, so indexing never
throttles ingestion until then), and retention prunes.  When the queue is
quiet the daily files catch up too (at most every :data:`_IDLE_EXPORT_EVERY`
seconds, :data:`_IDLE_EXPORT_STEP` records a step): the export after a batch
misses what is not final yet (on PostgreSQL, a batch committed while another
worker's write transaction was open), and once traffic stops no batch would
come to export it, nor to a restarted worker with an empty queue.
* Anything else is a bug (a ``TypeError`` in the store, say): acknowledge
  nothing, write a fatal-error record with the traceback in
  ``DATA_DIR/logs/device/fatal_error/<day>.log``, exit 1.  Dead-lettering good
  records because of a bug would be worse.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import orjson
from prometheus_client import CollectorRegistry, start_http_server

from fleetlog import keys
from fleetlog.backoff import Backoff, retry
from fleetlog.config import Settings, mask_url
from fleetlog.lifecycle import EXIT_FORCED, Shutdown
from fleetlog.metrics import SIZE_BUCKETS, Histogram, TallyCollector
from fleetlog.process import freeze_start_up_objects
from fleetlog.queue.connection import REDIS_DOWN, connect, is_cluster
from fleetlog.queue.consumer import REDIS_REFUSING, Consumer, ListConsumer, StreamConsumer
from fleetlog.queue.lease import LeasedListConsumer
from fleetlog.queue.shards import ShardedConsumer
from fleetlog.queue.stats import QueueCollector, queue_stats_for
from fleetlog.records import QueuedRecord, iso_ms, utc_day
from fleetlog.store import RecordRejected, Store, StoreUnavailable, open_store
from fleetlog.store.files import FilesSink
from fleetlog.worker.commits import CommitAnnouncer
from fleetlog.worker.retention import Pruner

__all__ = ["Backoff", "Worker", "next_batch", "run_worker"]

log = logging.getLogger("fleetlog.worker")

EXIT_PLANNED = 0
EXIT_FATAL = 1

#: How many times in a row one batch is written again because the store file was
#: replaced under it, before that counts as the store being unavailable.
_MAX_REPLACED = 3
#: Records indexed per step when the queue is quiet: catches up fast, yet one
#: step stays well under a second on SQLite, so a new record waits little.
_IDLE_INDEX_STEP = 20_000
#: Block this long (ms) for the next records while the index is behind, so the
#: catching up is not held back by an idle blocking read.
_LAGGING_BLOCK_MS = 10
#: Beyond the longest blocking read: the socket timeout must not cut a
#: blocking XREADGROUP short and report Redis down when it was only quiet.
_BLOCK_TIMEOUT_MARGIN = 2.0
#: How often the main thread wakes from joining the worker thread, so the signal
#: handlers (which run only in the main thread) run promptly.
_JOIN_INTERVAL = 0.2
#: Redis retries: from 0.1 s up to 5 s (2 s at start): long enough not to spin
#: on a dead Redis, short enough to resume within seconds of its return.
_REDIS_BACKOFF = (0.1, 5.0)
_REDIS_START_BACKOFF = (0.1, 2.0)
#: Store retries: from 0.2 s up to 2 s.  A locked or full store may take long to
#: clear, but a retry costs one failed write, so the cap is set by how soon the
#: worker must notice it cleared (space freed: records flow again within ~2 s).
_STORE_BACKOFF = (0.2, 2.0)
_STORE_START_BACKOFF = (0.2, 2.0)
#: A quiet worker exports to the daily files at most this often (seconds), so what
#: an export after a batch could not take yet is in the files a second or so later.
_IDLE_EXPORT_EVERY = 0.5
#: Behind (the last read came back full), a transaction takes up to this many times
#: ``batch`` records, doubling read by read: each commit is an fsync (SQLite's
#: ``synchronous=FULL``), and 500-record commits were a seventh of a drain.  The first
#: short read goes back to ``batch``, so a worker that keeps up commits as before.
_BEHIND_GROWTH = 8
#: ... unless its records already hold this many bytes: big records stay in batches of ``batch``.
_BEHIND_MAX_BYTES = 8 * 1024 * 1024
#: Records one quiet export reads at most: a long catch-up (a restart after the
#: files fell far behind) goes in steps, with the queue looked at between them.
_IDLE_EXPORT_STEP = 20_000


#: What a retry on Redis waits out: Redis down, or refusing writes (out of memory).
_REDIS_ERRORS = (*REDIS_DOWN, *REDIS_REFUSING)


def _redis_trouble(exc: BaseException, delay: float) -> None:
    """The read loop's line for a failure it waits out."""
    if isinstance(exc, REDIS_DOWN):
        log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
    else:  # only a queue that needs writes to read (the legacy list) gets here
        log.warning("Redis refuses writes (%s); retrying in %.1fs", exc, delay)


def next_batch(base: int, batch: int, records: Sequence[QueuedRecord], asked: int) -> int:
    """How many records to ask for after a read of ``asked`` gave ``records``: ``base``
    while the worker keeps up, doubling up to :data:`_BEHIND_GROWTH` times it while behind."""
    if len(records) < asked or sum(len(record.data) for record in records) > _BEHIND_MAX_BYTES:
        return base
    return min(batch * 2, base * _BEHIND_GROWTH)


class Worker:
    """Drains one consumer into one store; :meth:`run` returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        store: Store,
        files: FilesSink | None,
        stopping: threading.Event | None = None,
        commits: CommitAnnouncer | None = None,
    ) -> None:
        self.settings = settings
        self.commits = commits
        #: Records per batch and seconds per store write (read by ``/metrics``).
        self.batch_sizes = Histogram(SIZE_BUCKETS)
        self.write_latency = Histogram()
        self.consumer = consumer
        self.store = store
        self.files = files
        self.pruner = Pruner(store, files, retention_ms=settings.retention_ms,
                             max_bytes=settings.retention_bytes, interval=settings.prune_interval)
        self.stopping = stopping or threading.Event()
        self.stored = 0
        self.dead_lettered = 0
        self._deadline = float("inf")
        #: When a quiet worker next exports to the files (at once after a start: a
        #: restart catches up even if no record ever comes), and whether the last
        #: export found records to write (then the next looks again at once).
        self._export_due = 0.0
        self._files_behind = False
        try:
            self._owed = store.upkeep(0)  # the store's background work left (its index)
        except StoreUnavailable:
            self._owed = 1  # find out at the first upkeep

    def run(self, deadline: float | None = None) -> int:
        """Drain until stopped, ``max_messages`` or ``max_runtime`` (counted from now, or
        until ``deadline``: the process' start, when it waited for Redis or the store)."""
        self._deadline = deadline if deadline is not None else _deadline(self.settings)
        limit = self.settings.max_messages
        backoff = Backoff(*_REDIS_BACKOFF)
        batch = self.settings.batch
        while not self.stopping.is_set():
            if time.monotonic() >= self._deadline:
                log.info("max runtime of %ss reached: planned exit", self.settings.max_runtime)
                break
            if limit is not None and self.stored + self.dead_lettered >= limit:
                log.info("max messages (%d) reached: planned exit", limit)
                break
            count = batch
            if limit is not None:
                count = min(count, limit - self.stored - self.dead_lettered)
            # Redis trouble: whatever was taken stays pending in Redis and comes back.
            records = retry(functools.partial(self._step, count), _REDIS_ERRORS, backoff,
                            self.stopping, _redis_trouble, deadline=self._deadline)
            if records is not None:
                batch = next_batch(self.settings.batch, batch, records, count)
        log.info("worker stopped: %d stored, %d dead-lettered", self.stored, self.dead_lettered)
        return EXIT_PLANNED

    def _step(self, count: int) -> list[QueuedRecord]:
        """Read up to ``count`` records, store and ack them, do some upkeep; the records read."""
        # While upkeep is behind, do not sit in a blocking read.
        lagging = self._owed or self._files_behind
        block = _LAGGING_BLOCK_MS if lagging else self.settings.block_ms
        records = self.consumer.fetch(count, block)
        if records:
            self._handle(records)
        self._upkeep(fetched=len(records), wanted=count)
        return records

    def _upkeep(self, fetched: int, wanted: int) -> None:
        """Index, prune and (when quiet) export in bounded steps; a fault only postpones them."""
        try:
            if self.store.replaced():  # even when idle: readers must not see a stale file
                self._reopen()
            budget = 0
            if self._owed:
                if fetched == 0:  # quiet: catch up
                    budget = _IDLE_INDEX_STEP
                elif fetched < wanted or self._owed > self.settings.index_max_lag:
                    budget = fetched
            self._owed = self.store.upkeep(budget)
            self.pruner.step()
        except StoreUnavailable as exc:
            log.warning("index and retention postponed: %s", exc)
        if fetched == 0:
            self._catch_up_files()

    def _catch_up_files(self) -> None:
        """Export what the files lack, one bounded step, when due (the queue is quiet).

        Separate from the index and retention, so that a files fault (a full
        disk) never postpones the pruning that may free the space.
        """
        if self.files is None:
            return
        now = time.monotonic()
        if not self._files_behind and now < self._export_due:
            return
        try:
            written = self.files.export(self.store, limit=_IDLE_EXPORT_STEP)
        except StoreUnavailable as exc:
            log.warning("daily files not caught up now: %s", exc)
            self._files_behind = False
            self._export_due = now + _STORE_BACKOFF[1]
            return
        if written:
            log.debug("daily files caught up by %d records while the queue was quiet", written)
        self._files_behind = written > 0
        self._export_due = now + _IDLE_EXPORT_EVERY

    def _handle(self, records: Sequence[QueuedRecord]) -> None:
        done = self._store(records)
        if done is None:
            return  # stopping while the store is down: the records stay pending

        def ack() -> bool:
            self.consumer.ack(done)
            if self.commits is not None and done:
                self._announce(done)
            return True

        # Tried even when stopping; given up then: stored already, redelivery will
        # find them and not store twice.
        retry(ack, _REDIS_ERRORS, Backoff(*_REDIS_BACKOFF), self.stopping,
              lambda exc, delay: log.warning("ack failed, Redis unavailable (%s); retrying in %.1fs",
                                             exc, delay),
              finish_when_stopping=True)

    def _announce(self, done: Sequence[QueuedRecord]) -> None:
        """Tell live readers the store moved (after the ack: what they read is final)."""
        assert self.commits is not None
        try:
            seq = self.store.max_seq()
        except StoreUnavailable as exc:
            log.warning("commit not announced: %s", exc)
            return
        self.commits.announce(seq, done)

    def _store(self, records: Sequence[QueuedRecord]) -> list[QueuedRecord] | None:
        """Store (and file) ``records``; return those that may be acknowledged.

        Returns None when told to stop while the store is unavailable.  Any
        exception other than the store's own (a bug) escapes: nothing is acknowledged.
        """
        # Max runtime while the store is down: a planned exit, the records stay pending.
        return retry(lambda: self._store_once(records), (StoreUnavailable,), Backoff(*_STORE_BACKOFF),
                     self.stopping, lambda exc, delay: log.error(
                         "store unavailable, not acknowledging %d records: %s; retrying in %.1fs",
                         len(records), exc, delay), deadline=self._deadline)

    def _store_once(self, records: Sequence[QueuedRecord]) -> list[QueuedRecord]:
        """One attempt; written again into the file at the path if the store was replaced."""
        dead: list[QueuedRecord] = []
        for _ in range(_MAX_REPLACED):
            if self.store.replaced():
                self._reopen()
            pending = [record for record in records if record not in dead] if dead else records
            try:
                started = time.monotonic()
                self.store.write_batch(pending)
                self.write_latency.observe(time.monotonic() - started)
                self.batch_sizes.observe(len(pending))
                stored = list(pending)
            except RecordRejected as exc:
                log.warning("batch rejected (%s); storing it in halves to find the records rejected", exc)
                stored = self._store_apart(pending, dead, exc)
            if self.files is not None:
                self.files.export(self.store, appended=self.store.appended)
            # Last look before the ack: a batch that went into a removed or
            # replaced file is not stored where anyone will ever read it.
            if not self.store.replaced():
                self.stored += len(stored)
                return stored + dead
            log.error("the store file %s was removed or replaced while %d records were written "
                      "to it: not acknowledging them; writing them again into the new file",
                      self.settings.store_url, len(pending))
        raise StoreUnavailable(f"the store file was replaced {_MAX_REPLACED} times in a row")

    def _reopen(self) -> None:
        log.error("the store at %s is no longer the file this worker has open (removed or "
                  "replaced): reopening it", self.settings.store_url)
        self.store.reopen()
        log.warning("store %s reopened: store id %s, %d records",
                    self.settings.store_url, self.store.store_id, self.store.max_seq())
        self._owed = 1

    def _store_apart(self, records: Sequence[QueuedRecord], dead: list[QueuedRecord],
                     rejection: RecordRejected) -> list[QueuedRecord]:
        """Store a rejected batch in halves, each rejected half in halves again, down to the
        records rejected alone (``rejection``: why ``records`` were); returns those stored.

        In order, so a device's records are written in the order they came.  A
        transaction per record cost a batch of 6,000 with 3 bad records 15 s on
        PostgreSQL; halves cost a few dozen transactions (about 2 log2(n) a bad record).
        """
        if len(records) == 1:
            self._rejected(records[0], rejection, dead)
            return []
        stored: list[QueuedRecord] = []
        middle = len(records) // 2
        for half in (records[:middle], records[middle:]):
            try:
                self.store.write_batch(half)
            except RecordRejected as exc:
                stored.extend(self._store_apart(half, dead, exc))
                continue
            stored.extend(half)
        return stored

    def _rejected(self, record: QueuedRecord, rejection: RecordRejected, dead: list[QueuedRecord]) -> None:
        """A record the store rejects alone: left pending for its next delivery, or, after
        ``max_deliveries``, dead-lettered (into ``dead``)."""
        reason = f"{type(rejection.__cause__ or rejection).__name__}: {rejection}"
        if record.deliveries < self.settings.max_deliveries:
            log.warning("record %s rejected (delivery %d of %d): %s",
                        record.qid, record.deliveries, self.settings.max_deliveries, reason)
            return
        try:
            self.consumer.dead_letter(record, reason)
        except (*REDIS_DOWN, *REDIS_REFUSING) as error:
            log.warning("record %s not dead-lettered now (%s): it stays pending", record.qid, error)
            return
        log.error("record %s dead-lettered after %d deliveries: %s",
                  record.qid, record.deliveries, reason)
        self.dead_lettered += 1
        dead.append(record)


def write_fatal_error(settings: Settings, exc: BaseException) -> None:
    """Append a fatal-error record, as the original's ``device/fatal_error`` channel did."""
    now = int(time.time() * 1000)
    directory = settings.fatal_error_dir
    directory.mkdir(parents=True, exist_ok=True)
    line = orjson.dumps(
        {
            "time": iso_ms(now),
            "process": "worker",
            "pid": os.getpid(),
            "error": f"{type(exc).__name__}: {exc}",
            "stack_trace": "".join(traceback.format_exception(exc)),
        }
    )
    with (directory / f"{utc_day(now)}.log").open("ab") as handle:
        handle.write(line + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_worker(settings: Settings, redis_url: str) -> int:
    """Entry point of ``fleetlog worker``: returns the process exit code.

    The worker runs in a thread of its own so that the main thread is always
    free to take signals: the first SIGINT or SIGTERM finishes the batch in
    hand, a second SIGINT exits at once even while the worker waits inside
    SQLite or Redis.  Exiting then is safe: a record is acknowledged only
    after it is stored, so whatever is in hand stays pending and comes back.
    """

    def force() -> None:
        log.warning("second interrupt: exiting now; the batch in hand stays pending")
        os._exit(EXIT_FORCED)

    # First thing: a SIGTERM during start-up is a planned stop too.  Only a second
    # SIGINT forces (a supervisor's SIGTERM after a Ctrl-C must not cut the batch short).
    stopping = Shutdown(
        force_on={signal.SIGINT}, on_force=force,
        on_stop=lambda: log.info("stopping after this batch (interrupt again to exit at once)"),
    ).install().should_exit
    exit_code = [EXIT_FATAL]

    def work() -> None:
        exit_code[0] = _drain(settings, redis_url, stopping)

    thread = threading.Thread(target=work, name="fleetlog-worker")
    thread.start()
    while thread.is_alive():
        thread.join(_JOIN_INTERVAL)  # a timed wait, so signal handlers run promptly
    return exit_code[0]


def _drain(settings: Settings, redis_url: str, stopping: threading.Event) -> int:
    """Connect, open the store, run the :class:`Worker`; the exit code.

    The worker drains only the queues it holds a lease on (:mod:`fleetlog.queue.lease`):
    the stream's shards (:class:`ShardedConsumer`; the default ``--shards 1`` is the one
    stream ``fleetlog:records``, leased as a whole) or the legacy list
    (:class:`LeasedListConsumer`).  One worker at a time per queue is what keeps each
    device's records in the order sent, in the store and every reader after it; a worker
    holding nothing is a hot standby, taking a queue over within one ``shard_lease``
    of its holder dying (claiming what it left pending first).  Parallelism comes from
    ``--shards``.  The leases are given back on the way out.
    """
    deadline = _deadline(settings)  # --max-runtime counts the wait for Redis and the store too
    try:
        client = connect(redis_url, timeout=max(settings.redis_timeout,
                                                  settings.block_ms / 1000 + _BLOCK_TIMEOUT_MARGIN))
        # Every queue is drained by one worker at a time, the holder of its lease (one per
        # shard; the legacy list has one): a device's records are never split between
        # workers, so they are stored in the order sent.  Other workers are standbys.
        name = settings.consumer or f"{socket.gethostname()}-{os.getpid()}"
        consumer: Consumer
        sharded: ShardedConsumer | LeasedListConsumer
        if settings.queue == "list":
            consumer = sharded = LeasedListConsumer(
                client, ListConsumer(client, dead_letter_stream=settings.dead_letter_stream,
                                     claim_idle=settings.claim_idle),
                holder=name, lease=settings.shard_lease,
            )
        else:
            if settings.shards == 1 and not _ensure_group(StreamConsumer(
                    client, stream=settings.stream, group=settings.group, consumer=name,
                    dead_letter_stream=settings.dead_letter_stream,
                    claim_idle=settings.claim_idle), stopping, deadline):
                return EXIT_PLANNED
            consumer = sharded = ShardedConsumer(
                client, stream=settings.stream, shards=settings.shards, group=settings.group,
                consumer=name, dead_letter_stream=settings.dead_letter_stream,
                claim_idle=settings.claim_idle, lease=settings.shard_lease,
                multi_stream_reads=not is_cluster(client),
            )
        if settings.queue == "stream" and not is_cluster(client):
            _warn_of_other_shards(client, settings)
        opened = _open_store(settings.store_url, stopping, deadline)
        if opened is None:
            return EXIT_PLANNED
        store = opened
        files = FilesSink(settings.files) if settings.files is not None else None
        worker = Worker(settings, consumer, store, files, stopping, CommitAnnouncer(client))
        metrics = _serve_metrics(settings, worker, client)
        freeze_start_up_objects()
        log.info("worker draining %s into %s%s", settings.queue, mask_url(settings.store_url),
                 f" and {settings.files}" if files else "")
        try:
            return worker.run(deadline)
        finally:
            _release_shards(sharded)
            if metrics is not None:
                metrics.shutdown()
            store.close()
            client.close()
    except Exception as exc:
        log.exception("fatal error")
        write_fatal_error(settings, exc)
        return EXIT_FATAL


def _release_shards(sharded: ShardedConsumer | LeasedListConsumer) -> None:
    """Give the leases back on the way out, so other workers take the shards at once."""
    try:
        sharded.close()
    except (*REDIS_DOWN, *REDIS_REFUSING) as exc:
        log.warning("could not give the shard leases back (%s); they expire on their own", exc)


def _serve_metrics(settings: Settings, worker: Worker, client: Any) -> WSGIServer | None:
    """Serve ``/metrics`` on ``settings.metrics_port`` (0: off) in a thread of its own.

    Counters are the worker's plain attributes; the queue's numbers are read
    from Redis once per scrape (:class:`~fleetlog.queue.stats.QueueCollector`).
    """
    if not settings.metrics_port:
        return None

    registry = CollectorRegistry(auto_describe=False)
    registry.register(TallyCollector([
        ("counter", "fleetlog_worker_records_stored_total", "Records committed to the store.",
         lambda: worker.stored),
        ("counter", "fleetlog_worker_dead_letters_total", "Records this worker dead-lettered.",
         lambda: worker.dead_lettered),
        ("histogram", "fleetlog_worker_batch_size_records", "Records per store write.",
         lambda: worker.batch_sizes),
        ("histogram", "fleetlog_worker_store_write_seconds", "Duration of one store write.",
         lambda: worker.write_latency),
    ]))
    registry.register(QueueCollector(lambda: queue_stats_for(client, settings)))
    try:
        server, _thread = start_http_server(settings.metrics_port, settings.host, registry)
    except OSError as exc:  # a taken port costs the metrics, never the draining
        log.error("worker metrics not served on port %d: %s", settings.metrics_port, exc)
        return None
    log.info("worker metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    return server


#: Shard streams looked for at start that this worker's ``--shards`` does not read.
_SHARDS_LOOKED_AT = 256


def _warn_of_other_shards(client: Any, settings: Settings) -> None:
    """Say so when records wait in streams of another ``--shards`` (a gateway started with
    another count): no worker of this count will ever read them."""
    ours = {keys.shard_stream(settings.stream, shard, settings.shards)
            for shard in range(settings.shards)}
    candidates = [settings.stream, *(keys.shard_stream(settings.stream, shard, _SHARDS_LOOKED_AT)
                                     for shard in range(_SHARDS_LOOKED_AT))]
    candidates = [stream for stream in candidates if stream not in ours]
    try:
        with client.pipeline(transaction=False) as pipe:
            for stream in candidates:
                pipe.xlen(stream)  # not EXISTS: a drained stream with its group is no news
            found = [stream for stream, length in zip(candidates, pipe.execute(raise_on_error=False),
                                                      strict=True) if isinstance(length, int) and length]
    except (*REDIS_DOWN, *REDIS_REFUSING):
        return  # the drain's own retries say what is wrong with Redis
    if found:
        log.warning("records wait in %s, which a worker with --shards %d does not read: gateways "
                    "and workers must be given the same --shards", ", ".join(found[:4])
                    + (f" and {len(found) - 4} more" if len(found) > 4 else ""), settings.shards)


def _deadline(settings: Settings) -> float:
    """When ``--max-runtime`` ends (``time.monotonic()``), counted from now."""
    runtime = settings.max_runtime
    return time.monotonic() + runtime if runtime is not None else math.inf


def _open_store(url: str, stopping: threading.Event, deadline: float = math.inf) -> Store | None:
    """Open the store, waiting while it is unavailable (locked); None if told to stop or
    past ``deadline``."""
    if stopping.is_set():
        return None
    return retry(lambda: open_store(url), (StoreUnavailable,), Backoff(*_STORE_START_BACKOFF), stopping,
                 lambda exc, delay: log.error("store unavailable at start (%s); retrying in %.1fs",
                                              exc, delay), deadline=deadline)


def _ensure_group(consumer: StreamConsumer, stopping: threading.Event,
                  deadline: float = math.inf) -> bool:
    """Create the consumer group, waiting out a Redis outage; False if told to stop or past
    ``deadline``.

    A group that exists needs no write, so a Redis that refuses writes (out of
    memory) does not keep the worker that would free it from starting.
    """
    if stopping.is_set():
        return False

    def ensure() -> bool:
        consumer.ensure_group()
        return True

    def trouble(exc: BaseException, delay: float) -> None:
        if isinstance(exc, REDIS_DOWN):
            log.warning("Redis unavailable at start (%s); retrying in %.1fs", exc, delay)
        else:
            log.warning("Redis refuses writes (%s) and group %s of %s does not exist yet; "
                        "retrying in %.1fs", exc, consumer.group, consumer.stream, delay)

    return retry(ensure, _REDIS_ERRORS, Backoff(*_REDIS_START_BACKOFF), stopping, trouble,
                 deadline=deadline) is not None
