"""Retention: forget records past their age (``--retention 30d``) or size cap.

Pruning runs inside the worker between ingest batches, in transactions of at
most ``batch`` records, so the store's write lock is never held long; by age
one batch per step, by size (once the age is caught up) until the store is
under its cap, which on SQLite first merges the full-text index (its cost
grows with the index: the worker's ingest into the store waits that long, the
queue holds what arrives meanwhile).  ``fleetlog prune`` runs it to completion
once.  Daily files go by
whole days, only once every record of the day is past retention.
"""

from __future__ import annotations

import logging
import time

from fleetlog.errors import StoreUnavailable
from fleetlog.store import Store
from fleetlog.store.files import FilesSink

__all__ = ["Pruner"]

log = logging.getLogger("fleetlog.retention")


class Pruner:
    def __init__(
        self,
        store: Store,
        files: FilesSink | None,
        *,
        retention_ms: int | None,
        max_bytes: int | None,
        batch: int = 5000,
        interval: float = 60.0,
    ) -> None:
        self.store = store
        self.files = files
        self.retention_ms = retention_ms
        self.max_bytes = max_bytes
        self.batch = batch
        self.interval = interval
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.retention_ms is not None or self.max_bytes is not None

    def _cutoff(self) -> int | None:
        if self.retention_ms is None:
            return None
        return int(time.time() * 1000) - self.retention_ms

    def step(self) -> int:
        """One batch of pruning by age (at most ``batch`` records) if it is due, then, once the
        age is caught up, the size cap (until the store is under it); how many records went."""
        now = time.monotonic()
        if not self.enabled or now < self._next:
            return 0
        cutoff = self._cutoff()
        try:
            deleted = self.store.prune(before=cutoff, max_bytes=None, limit=self.batch)
            if deleted < self.batch:  # caught up by age: then the size cap, in the same step
                deleted += self.store.prune(before=None, max_bytes=self.max_bytes, limit=self.batch)
        except StoreUnavailable:
            # A lock it could not get in time (pg_dump holds one for its whole run), a store
            # down: tried again after the interval, not after every batch (each try waited).
            self._next = now + self.interval
            raise
        if deleted < self.batch:  # caught up: look again after a pause
            self._next = now + self.interval
            if cutoff is not None and self.files is not None:
                for path in self.files.prune(cutoff):
                    log.info("retention: removed %s", path)
        if deleted:
            log.info("retention: pruned %d records", deleted)
        return deleted

    def run_all(self) -> int:
        """Prune until nothing is past retention (``fleetlog prune``)."""
        total = 0
        while True:
            self._next = 0.0
            deleted = self.step()
            total += deleted
            if deleted < self.batch:
                return total
