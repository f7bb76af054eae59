"""``fleetlog alerter``: follow the store, evaluate every rule, deliver the notifications.

One alerter is active at a time: the holder of ``fleetlog:{alerts}:lease``
(``SET NX PX``, renewed every third of ``alert_lease``); others are standbys
that try to take it every third of its life.  The holder:

1. on taking the lease, loads the state the last commit left (cursor, groups,
   open firings, presence) from Redis: nothing lives only in its memory;
2. reads the store after its cursor (:meth:`Store.after`, store order, 1000
   records at a time), never the queue: evaluation follows what is stored and
   costs ingest nothing but a read of the store;
3. a rule it has not seen before first catches up on its own: from the records
   received ``backfill`` before it was saved (none by default) to the cursor,
   then it joins the others.  Records received before that are never evaluated;
4. every ``alert_poll`` seconds, when a rule needs them, looks at presence,
   refusal counters and the queue (:mod:`.watch`);
5. commits each step in one script, fenced by the lease
   (:meth:`~.book.AlertBook.commit`): the cursor, the groups, the firings and
   the notifications they made.  A step whose commit fails is thrown away
   with the whole in-memory state, which is loaded again from Redis;
6. delivers: claims due notifications, sends them on ``alert_senders``
   threads, records each outcome: delivered; tried again after ``retry_delay``
   (``alert_retry_initial`` doubling to ``alert_retry_cap``) while younger
   than ``alert_give_up``; else failed.  A rule muted when its notification
   is due has it recorded as ``muted`` and not sent.

It wakes on the workers' commit announcements (``fleetlog:commits``), so a
matching record is evaluated milliseconds after its batch is stored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

import redis

from fleetlog import keys
from fleetlog.alerts.book import LEASE, AlertBook, Cursor, now_ms
from fleetlog.alerts.delivery import retry_delay, send
from fleetlog.alerts.engine import FLEET, Engine, Firing, Note
from fleetlog.alerts.rules import Rule, Selector
from fleetlog.alerts.watch import Presence, RefusalRates, online_devices, queue_facts
from fleetlog.backoff import Backoff
from fleetlog.config import Settings, mask_url
from fleetlog.errors import StoreMissing, StoreUnavailable
from fleetlog.lifecycle import EXIT_FORCED, Shutdown
from fleetlog.process import freeze_start_up_objects
from fleetlog.queue.connection import REDIS_DOWN, connect
from fleetlog.queue.lease import Lease
from fleetlog.store import Store, open_store

__all__ = ["Alerter", "run_alerter", "seq_before"]

log = logging.getLogger("fleetlog.alerter")

#: Records read from the store per step (the main cursor), and per catch-up step.
PAGE: Final = 1000
CATCH_UP_PAGE: Final = 5000
#: A record may be committed this long after its ``received_at`` (a slow batch, another shard):
#: a new rule's catch-up starts this much earlier than its ``active_from``.
LATE_MS: Final = 60_000
#: Seconds between two looks at whether the store file was replaced.
_REPLACED_EVERY: Final = 5.0
#: Seconds between two ticks (window ends, due notifications) while records keep coming.
_TICK_EVERY: Final = 0.1


def seq_before(store: Store, at: int) -> int:
    """A seq after which every record received at or after ``at`` (ms) lies.

    A binary search over ``seq`` with :meth:`Store.after`, about 2·log2(seq)
    reads: ``received_at`` grows with ``seq`` up to the few seconds a batch
    takes, which callers cover by asking for an earlier time (:data:`LATE_MS`).
    """
    low, high = 0, store.max_seq()
    found = 0
    while low < high:
        middle = (low + high) // 2
        records = store.after(middle, 1)
        if not records:
            high = middle
        elif records[0].received_at < at:
            found = low = records[0].seq
        else:
            high = middle
    return found


class Alerter:
    """One ``fleetlog alerter`` process; see the module docstring."""

    def __init__(self, settings: Settings, redis_url: str, *, holder: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.holder = holder
        self.client = connect(redis_url, timeout=settings.redis_timeout)
        self.book = AlertBook(self.client)
        self.lease = Lease(self.client, LEASE, holder, settings.alert_lease)
        self.stopping = threading.Event()
        self.held = False
        self.engine = Engine()
        self.presence = Presence()
        self.presence_changes: dict[str, bytes | None] = {}
        self.refusals = RefusalRates()
        self.cursor: Cursor | None = None
        self.store: Store | None = None
        self.caught_up = True
        self.rules_version = -1
        self.rules: dict[str, Rule] = {}
        self._selectors: dict[str, Selector] = {}
        self._next_renew = 0.0
        self._next_poll = 0.0
        self._next_tick = 0.0
        self._next_replaced = 0.0
        self._senders = ThreadPoolExecutor(max_workers=settings.alert_senders,
                                           thread_name_prefix="alert-send")
        #: Sends running on the sender threads, and the notification each sends.
        self._inflight: dict[Future[None], str] = {}
        self._pubsub: Any = None
        self._store_problem: str | None = None

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        backoff = Backoff(initial=0.2, cap=5.0)
        log.info("alerter %s on Redis %s, store %s", self.holder, mask_url(self.redis_url),
                 mask_url(self.settings.store_url))
        while not self.stopping.is_set():
            try:
                spent = time.thread_time()
                busy = self.step()
                backoff.reset()
                if busy:
                    self._yield_cpu(time.thread_time() - spent)
            except REDIS_DOWN as exc:
                log.warning("Redis unavailable (%s); retrying", exc)
                self._drop()
                self.stopping.wait(backoff.next_delay())
                continue
            except (StoreUnavailable, StoreMissing) as exc:
                if str(exc) != self._store_problem:
                    if isinstance(exc, StoreMissing):  # `up` starting: the worker creates it
                        log.info("waiting for the store: %s", exc)
                    else:
                        log.warning("store unavailable (%s); retrying", exc)
                    self._store_problem = str(exc)
                self._close_store()
                self.stopping.wait(backoff.next_delay())
                continue
            if not busy:
                self._wait()
        self._shutdown()
        return 0

    def _yield_cpu(self, spent: float) -> None:
        """While catching up with a store that workers are still writing fast (a commit announced
        in the last second: a drain, a burst), use at most ``alert_cpu_share`` of a core: ingest
        goes first.  Full speed once they are quiet, or when the alerter is more than
        ``alert_max_lag`` behind (alerts are late enough then)."""
        share = self.settings.alert_cpu_share
        if share >= 1 or self.cursor is None:
            return
        self._commit_announced(0.0)
        if time.monotonic() - self._last_commit > 1.0:
            return
        if now_ms() - self.cursor.received_at > self.settings.alert_max_lag * 1000:
            return
        self.stopping.wait(min(1.0, spent * (1 - share) / share))

    _last_commit: float = 0.0

    def _commit_announced(self, timeout: float) -> bool:
        """Whether a worker announced a commit (waiting up to ``timeout`` s for one); reads every
        announcement already there.  False at once when Redis cannot be asked (then no subscription)."""
        try:
            if self._pubsub is None:
                self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(keys.COMMITS)
            if self._pubsub.get_message(timeout=timeout) is None:
                return False
            while self._pubsub.get_message(timeout=0.0) is not None:
                pass
        except (redis.RedisError, OSError):
            self._close_pubsub()
            return False
        self._last_commit = time.monotonic()
        return True

    def step(self) -> bool:
        """One step; True when there is more to do at once (a full page, a catch-up)."""
        if not self._hold():
            return False
        self._reload_rules()
        self._open_store()
        busy = self._evaluate()
        busy = self._catch_up() or busy
        now = now_ms()
        if time.monotonic() >= self._next_poll:
            self._poll(now)
            self._next_poll = time.monotonic() + self.settings.alert_poll
        if time.monotonic() >= self._next_tick or not busy:
            self.engine.tick(now if self.caught_up else self._record_horizon())
            self._next_tick = time.monotonic() + _TICK_EVERY
        self._commit(now)
        self._deliver()
        return busy

    def _hold(self) -> bool:
        """Whether this alerter holds the lease now (taking it when free, renewing it when due)."""
        now = time.monotonic()
        if not self.held:
            if not self.lease.acquire():
                return False
            self._next_renew = now + self.settings.alert_lease / 3
            self._take_over()
        elif now >= self._next_renew:
            if not self.lease.renew():
                log.warning("lost the alerter lease; another alerter has it (standby now)")
                self._drop()
                return False
            self._next_renew = now + self.settings.alert_lease / 3
        return True

    def _take_over(self) -> None:
        cursor, groups, firings, presence = self.book.load_state()
        self.rules_version = self.book.version()
        rules = self.book.rules()
        self.rules = {rule.id: rule for rule in rules}
        self._selectors = {}
        self.engine = Engine()
        self.engine.load(rules, groups, firings)
        self.presence = Presence.load(presence)
        self.presence_changes = {}
        self.refusals = RefusalRates()
        self.cursor = cursor
        self._check_cursor = True
        self.held = True
        self._next_poll = 0.0
        log.info("took the alerter lease: this alerter evaluates %d rule(s), %d firing(s) open",
                 len(rules), len(self.engine.firings))

    def _drop(self) -> None:
        """Forget everything held in memory (it is reloaded from Redis with the lease)."""
        self.held = False
        self.engine = Engine()
        self.cursor = None
        self._committed = None
        self.presence_changes = {}

    def _reload_rules(self) -> None:
        version = self.book.version()
        if version == self.rules_version:
            return
        rules = self.book.rules()
        self.rules_version = version
        self.rules = {rule.id: rule for rule in rules}
        self._selectors = {}
        self.engine.set_rules(rules)
        log.info("alert rules: %s", ", ".join(rule.name for rule in rules) or "none")

    # -- the store --------------------------------------------------------------------

    def _open_store(self) -> None:
        if self.store is not None and time.monotonic() >= self._next_replaced:
            self._next_replaced = time.monotonic() + _REPLACED_EVERY
            if self.store.replaced():
                log.warning("the store at %s was replaced; reading the new one",
                            mask_url(self.settings.store_url))
                self._close_store()
        if self.store is None:
            self.store = open_store(self.settings.store_url, readonly=True)
            self._store_problem = None
            self._check_cursor = True
        if self._check_cursor:
            self.cursor = self._valid_cursor(self.store, self.cursor)
            self._check_cursor = False
        for rule in self.engine.new_rules():
            self._start_catch_up(rule)

    def _close_store(self) -> None:
        if self.store is not None:
            try:
                self.store.close()
            except Exception:
                pass
        self.store = None

    def _valid_cursor(self, store: Store, cursor: Cursor | None) -> Cursor:
        """``cursor`` if it points into this very store; else where to go on from."""
        store_id = store.store_id
        if cursor is not None and cursor.store == store_id and (
                cursor.seq == 0 or store.seqs_of([cursor.qid]).get(cursor.qid) == cursor.seq):
            return cursor
        if cursor is None:
            head = store.max_seq()
            log.info("alerter starts at the end of the store (seq %d)", head)
            return self._cursor_at(store, head, now_ms())
        # Another store (the file replaced, a backup restored): go on from the time reached.
        seq = seq_before(store, cursor.received_at - LATE_MS)
        log.warning("the store is not the one the alerter cursor was in; going on from seq %d "
                    "(records received since %d ms)", seq, cursor.received_at - LATE_MS)
        return self._cursor_at(store, seq, cursor.received_at)

    @staticmethod
    def _cursor_at(store: Store, seq: int, received_at: int) -> Cursor:
        if seq == 0:
            return Cursor(store.store_id, 0, "", received_at)
        records = store.after(seq - 1, 1)
        if records and records[0].seq == seq:
            return Cursor(store.store_id, seq, records[0].qid, records[0].received_at)
        return Cursor(store.store_id, 0, "", received_at)

    def _record_rules(self) -> bool:
        return any(rule.kind == "records" for rule in self.rules.values())

    def _evaluate(self) -> bool:
        """Read and evaluate the next page after the cursor; True if the page was full."""
        assert self.store is not None and self.cursor is not None
        if not self._record_rules():
            head = self.store.max_seq()
            if head != self.cursor.seq:
                self.cursor = self._cursor_at(self.store, head, now_ms())
            self.caught_up = True
            return False
        records = self.store.after(self.cursor.seq, PAGE)
        if records:
            self.engine.evaluate(records)
            last = records[-1]
            self.cursor = Cursor(self.cursor.store, last.seq, last.qid, last.received_at)
        self.caught_up = len(records) < PAGE
        return not self.caught_up

    def _record_horizon(self) -> int:
        return self.cursor.received_at if self.cursor is not None else now_ms()

    def _start_catch_up(self, rule: Rule) -> None:
        assert self.store is not None and self.cursor is not None
        start = min(seq_before(self.store, rule.active_from - LATE_MS), self.cursor.seq)
        if start >= self.cursor.seq:
            self.engine.caught_up(rule.id, None)
            return
        log.info("alert rule %r catches up from seq %d to %d", rule.name, start, self.cursor.seq)
        self.engine.start_catch_up(rule, start)

    def _catch_up(self) -> bool:
        """One page of the first rule still catching up; True if more remains."""
        pending = self.engine.catching_up
        if not pending:
            return False
        assert self.store is not None and self.cursor is not None
        rule_id, through = next(iter(pending.items()))
        end = self.cursor.seq
        records = [record for record in self.store.after(through, CATCH_UP_PAGE) if record.seq <= end]
        if records:
            self.engine.evaluate(records, only=rule_id)
            self.engine.tick(records[-1].received_at, [rule_id])
            through = records[-1].seq
        if not records or through >= end:
            self.engine.caught_up(rule_id, None)
            rule = self.rules.get(rule_id)
            log.info("alert rule %r caught up; it evaluates new records from now on",
                     rule.name if rule else rule_id)
        else:
            self.engine.caught_up(rule_id, through)
        return bool(self.engine.catching_up)

    # -- presence, refusals, the queue ----------------------------------------------------

    def _selector(self, rule: Rule) -> Selector:
        found = self._selectors.get(rule.id)
        if found is None:
            found = self._selectors[rule.id] = Selector(rule.devices)
        return found

    def _poll(self, now: int) -> None:
        by_kind: dict[str, list[Rule]] = {}
        for rule in self.rules.values():
            by_kind.setdefault(rule.kind, []).append(rule)
        if "offline" in by_kind or "reconnects" in by_kind:
            self.presence_changes.update(self.presence.update(online_devices(self.client), now))
            offline = self.presence.offline()
            for rule in by_kind.get("offline", []):
                selector = self._selector(rule)
                holding: dict[str, dict[str, Any]] = {}
                starts = {}
                for device, since in offline.items():
                    if selector(device) and now - max(since, rule.created_at) >= rule.offline_ms:
                        holding[device] = {"offline_since": since}
                        starts[device] = str(since)
                self.engine.conditions(rule, holding, now, starts)
            counts = self.presence.reconnect_counts(now)
            for rule in by_kind.get("reconnects", []):
                selector = self._selector(rule)
                threshold = rule.reconnects or 0
                self.engine.conditions(rule, {device: {"reconnects": n} for device, n in counts.items()
                                              if n > threshold and selector(device)}, now)
        if "refusals" in by_kind:
            self.refusals.update(self.client, now)
            rates = self.refusals.rates()
            for rule in by_kind["refusals"]:
                selector = self._selector(rule)
                threshold = rule.refusals or 0
                self.engine.conditions(rule, {device: {"refusals": n, "by_reason": reasons}
                                              for device, (n, reasons) in rates.items()
                                              if n > threshold and selector(device)}, now)
        if {"backlog", "dead_letters", "lag"} & by_kind.keys():
            facts = queue_facts(self.client, self.settings, now)
            for rule in by_kind.get("backlog", []):
                self.engine.conditions(rule, {FLEET: {"backlog": facts.backlog}}
                                       if facts.backlog > (rule.backlog or 0) else {}, now)
            for rule in by_kind.get("dead_letters", []):
                self.engine.conditions(rule, {FLEET: {"dead_letters": facts.dead_letters}}
                                       if facts.dead_letters > (rule.dead_letters or 0) else {}, now)
            for rule in by_kind.get("lag", []):
                self.engine.conditions(rule, {FLEET: {"lag_s": round(facts.lag_ms / 1000, 1)}}
                                       if facts.lag_ms > rule.lag_ms else {}, now)

    # -- commit and delivery ------------------------------------------------------------

    def _commit(self, now: int) -> None:
        changes = self.engine.take_changes()
        if not changes and not self.presence_changes and self.cursor == self._committed:
            return
        if not self.book.commit(self.holder, self.cursor, changes, self.presence_changes, now=now):
            log.warning("the alerter lease was lost before a commit; standby now (the step is "
                        "thrown away: the new holder evaluates it)")
            self._drop()
            return
        self._committed = self.cursor
        self.presence_changes = {}

    _committed: Cursor | None = None
    _check_cursor: bool = True

    def _deliver(self) -> None:
        self._inflight = {future: note for future, note in self._inflight.items() if not future.done()}
        free = self.settings.alert_senders - len(self._inflight)
        if free <= 0 or not self.held:
            return
        now = now_ms()
        claim_ms = int((2 * self.settings.alert_send_timeout + 5) * 1000)
        notes = self.book.claim(self.holder, now=now, claim_ms=claim_ms, limit=free)
        if notes is None:
            self._drop()
            return
        if not notes:
            return
        # A send still running past its claim (an Apprise service slower than the claim's
        # length) is claimed again: it is ours, and its outcome will be recorded; a second
        # send of it at once would be a duplicate message.
        sending = set(self._inflight.values())
        notes = [note for note in notes if note.id not in sending]
        firings = self.book.firings({note.firing for note in notes})
        for note in notes:
            rule = self.rules.get(note.rule_id)
            firing = firings.get(note.firing)
            if rule is None or firing is None:
                self._finish(note, "cancelled", "the rule was removed")
            elif rule.muted(now):
                self._finish(note, "muted", None)
            else:
                self._inflight[self._senders.submit(self._send, rule, note, firing)] = note.id

    def _send(self, rule: Rule, note: Note, firing: Firing) -> None:
        try:
            attempt = send(rule, note.dest, firing, note.id, note.event, self.settings.alert_send_timeout)
        except Exception as exc:  # a bug in a plugin: treat as a failed try
            log.exception("sending %s failed", note.id)
            attempt = None
            error = f"{type(exc).__name__}: {exc}"
        note.attempts += 1
        now = now_ms()
        if attempt is not None and attempt.ok:
            note.status, note.delivered_at, note.last_error = "delivered", now, None
            self._finish(note, "delivered", None)
            log.info("alert %s: %s delivered to destination %d (attempt %d)", rule.name, note.event,
                     note.dest, note.attempts)
            return
        if attempt is not None:
            error = attempt.error or "failed"
        note.last_error = error
        delay_ms = int(retry_delay(note.attempts, self.settings.alert_retry_initial,
                                   self.settings.alert_retry_cap) * 1000)
        give_up_at = note.created_at + int(self.settings.alert_give_up * 1000)
        if (attempt is not None and attempt.permanent) or now + delay_ms > give_up_at:
            note.status = "failed"
            log.warning("alert %s: %s to destination %d failed for good after %d attempt(s): %s",
                        rule.name, note.event, note.dest, note.attempts, error)
            self._finish(note, "failed", None)
            return
        note.next_at = now + delay_ms
        log.info("alert %s: %s to destination %d failed (%s); trying again in %.1f s", rule.name,
                 note.event, note.dest, error, delay_ms / 1000)
        self._finish(note, "retried", None)

    def _finish(self, note: Note, outcome: str, detail: str | None) -> None:
        if outcome in ("muted", "cancelled"):
            note.status = outcome
            note.last_error = detail
        try:
            self.book.finish(note, outcome, note.next_at if outcome == "retried" else None)
        except REDIS_DOWN as exc:  # the claim runs out and it is tried again
            log.warning("could not record %s of %s (%s); it is tried again later", outcome, note.id, exc)

    # -- waiting and stopping -------------------------------------------------------------

    def _wait(self) -> None:
        """Until a batch is committed, or a little while (polls, deliveries, ticks)."""
        timeout = 0.05 if self._inflight else 0.25
        if not self.held:
            self.stopping.wait(self.settings.alert_lease / 3)
            return
        if not self._commit_announced(timeout) and self._pubsub is None:
            self.stopping.wait(timeout)  # no subscription (Redis trouble): a plain wait

    def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:
                pass
            self._pubsub = None

    def stop(self) -> None:
        self.stopping.set()

    def _shutdown(self) -> None:
        self._senders.shutdown(wait=True, cancel_futures=False)
        if self.held:
            try:
                self.lease.release()
            except REDIS_DOWN:
                pass
        self._close_pubsub()
        self._close_store()
        self.client.close()
        log.info("alerter stopped")


def _lower_priority(nice: int) -> None:
    """Yield the CPU to ingest: ``nice``, and the same for this session's scheduler group when this
    process leads a session of its own (Linux autogroups: niceness counts only inside one)."""
    if nice <= 0:
        return
    try:
        os.nice(nice)
        if os.getsid(0) == os.getpid():
            with open("/proc/self/autogroup", "w") as autogroup:
                autogroup.write(str(nice))
    except OSError:
        pass


def run_alerter(settings: Settings, redis_url: str) -> int:
    """Entry point of ``fleetlog alerter``: run until SIGINT/SIGTERM."""
    holder = settings.consumer or f"alerter-{settings.node_id}"
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    _lower_priority(settings.alert_nice)
    alerter = Alerter(settings, redis_url, holder=holder)
    # A second Ctrl-C exits at once: its claims run out and are sent by the next holder.
    Shutdown(force_on={signal.SIGINT}, on_stop=alerter.stop,
             on_force=lambda: os._exit(EXIT_FORCED)).install()
    freeze_start_up_objects()
    return alerter.run()
