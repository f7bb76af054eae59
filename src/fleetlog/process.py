"""Child-process hygiene shared by everything that starts processes.

:class:`Child` and :func:`tend` are the restart policy, :class:`Supervisor` the core of
both supervisors: ``fleetlog up`` (embedded Redis, gateway, worker, API, alerter) and
``fleetlog gateway --processes N`` (N gateway processes on one port).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from fleetlog.backoff import Backoff
from fleetlog.lifecycle import SIGNALS, Shutdown

__all__ = [
    "Child",
    "Supervisor",
    "big_buffers_outside_the_heap",
    "freeze_start_up_objects",
    "give_memory_back",
    "parent_death_hook",
    "raise_descriptor_limit",
    "stop_children",
    "tend",
]

log = logging.getLogger("fleetlog.process")

_PR_SET_PDEATHSIG = 1

#: A child that exits 0 after running this long exited on purpose (``--max-runtime``):
#: start it again at once.  Shorter, even exit 0 counts as a crash loop.
PLANNED_EXIT_MIN_RUN = 5.0
#: A child that ran this long before exiting was healthy: its next restart
#: starts from the shortest delay again.
HEALTHY_RUN = 60.0


def _die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies, however it dies.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere it does nothing and the
    parent's own shutdown path is the only guarantee.  Given through
    :func:`parent_death_hook` only: the signal follows the *thread* that forked.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def parent_death_hook() -> Callable[[], None] | None:
    """:func:`_die_with_parent` when called on the main thread, else ``None``.

    Linux sends the parent-death signal when the thread that forked the child
    ends, not the process: a Redis restarted from a pool thread
    (``asyncio.to_thread``) was sent SIGTERM 0.1 s later, when ``asyncio.run``
    shut its executor down.  A child started elsewhere than the main thread is
    stopped by its owner's shutdown path alone.
    """
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


def give_memory_back() -> bool:
    """Return freed heap memory to the system (glibc ``malloc_trim(0)``); ``False`` where unsupported.

    glibc keeps what a process freed in its arenas for reuse: after a burst of
    big buffers (an attack's unfinished messages, large frames) the RSS stays
    at its peak for good.  Trimming walks the heap once (milliseconds for
    hundreds of MB), so callers do it after a large release, not per event.
    """
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def freeze_start_up_objects() -> None:
    """Keep what start-up made out of every later garbage collection (``gc.freeze``).

    Imports, settings and the clients a process opens make 50,000-100,000 objects
    (modules, functions, pydantic's schemas, redis-py's command tables) that live
    as long as the process and are never garbage, yet every full collection walks
    all of them again, and so does the one at exit: a worker that drained 20,000
    records spent 25-30 ms of its exit on it (a tenth of its run).  Frozen, they
    are skipped (and, in a forked child, not written to, so their pages stay
    shared).  Called once, when start-up is over; what is made later is collected
    as before.
    """
    gc.collect()
    gc.freeze()


def raise_descriptor_limit() -> int:
    """Raise this process' soft ``RLIMIT_NOFILE`` to its hard limit; the soft limit now.

    Every device connection holds a descriptor: the usual soft default (1,024)
    caps a gateway far below what it can hold.  ``RLIM_INFINITY`` hard limits
    are left as they are.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


#: glibc's ``mallopt`` parameter for the mmap threshold.
_M_MMAP_THRESHOLD = -3


def big_buffers_outside_the_heap(threshold: int = 64 * 1024) -> bool:
    """Have glibc ``mmap`` every block of ``threshold`` bytes or more, and unmap it when freed.

    By default glibc raises its mmap threshold each time such a block is freed
    (up to 32 MiB), so a burst of large frames ends up in the heap, which
    fragments and does not shrink: 2,000 connections holding 60 KiB frames
    left the gateway at several hundred MB.  A fixed threshold keeps big
    buffers out of the heap and gives them back at once.  ``False`` where
    unsupported (not glibc).
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


@dataclass
class Child:
    """One supervised child process: how to start it and when it may start again."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    #: Restart delays: a crash loop must not spin (0.5 s, doubling, at most 30 s).
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, cap=30.0))
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    env: dict[str, str] = field(default_factory=dict)
    #: Given how many times the child started before, what to add to ``env`` for this start.
    env_for_start: Callable[[int], dict[str, str]] | None = None
    starts: int = 0
    #: How to start it when that is more than running ``argv`` (``up``'s embedded Redis:
    #: :meth:`fleetlog.embedded.RedisServer.spawn`, which its ``stop`` then knows);
    #: the restart policy of :func:`tend` stays the same.
    spawn: Callable[[], subprocess.Popen[bytes]] | None = None

    def start(self) -> None:
        if self.spawn is not None:
            self.process = self.spawn()
        else:
            env = self.env if self.env_for_start is None else {**self.env, **self.env_for_start(self.starts)}
            # A group of its own: only the supervisor decides when and in which order its
            # children stop (a terminal's Ctrl-C reaches the supervisor alone).
            self.process = subprocess.Popen(self.argv, env=env, preexec_fn=parent_death_hook(),
                                            process_group=0)
        self.starts += 1
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def tend(child: Child, now: float) -> None:
    """Restart ``child`` if it exited: first schedule the restart (backoff), then start it.

    Called in a supervisor's watch loop.  A crash loop backs off (bounded by
    the child's :class:`Backoff` cap); a planned exit after a long run does not.
    """
    if child.alive() or now < child.next_start:
        return
    if child.process is not None and child.next_start <= child.started_at:
        code = child.process.returncode
        ran = now - child.started_at
        if ran > HEALTHY_RUN:
            child.backoff.reset()
        delay = 0.0 if code == 0 and ran > PLANNED_EXIT_MIN_RUN else child.backoff.next_delay()
        log.warning("%s exited with %s after %.0fs; restarting in %.1fs", child.name, code, ran,
                    delay)
        child.next_start = now + delay
        return
    child.start()


def stop_children(children: list[Child], timeout: float, *, in_order: bool = False,
                  logger: logging.Logger = log) -> None:
    """SIGTERM the live children, wait, SIGKILL those that do not stop in time.

    At once (the default): every child gets SIGTERM together, and ``timeout``
    in all.  ``in_order``: each gets SIGTERM once the one before it has
    stopped, and ``timeout`` of its own (``up``: the gateway's last replies and
    the worker's last ack need Redis, stopped after them).
    """
    if not in_order:
        for child in children:
            if child.alive():
                assert child.process is not None
                child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.process is None:
            continue
        if in_order:
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs; killing it", child.name, timeout)
            child.process.kill()
            child.process.wait()
        logger.info("stopped: %s (exit %s)", child.name, child.process.returncode)


class Supervisor:
    """Children started, restarted when they exit (:func:`tend`), stopped on a signal.

    The core of both supervisors, ``fleetlog up`` and ``fleetlog gateway
    --processes N``.  :meth:`install` takes SIGINT and SIGTERM
    (:class:`~fleetlog.lifecycle.Shutdown`): the first sets :attr:`stopping`,
    which ends :meth:`watch`, and the caller then runs :meth:`stop`; a second
    (of ``force_on``) logs ``forcing`` and SIGKILLs every live child, so
    whatever :meth:`stop` waits for ends at once.
    """

    def __init__(
        self,
        children: list[Child],
        *,
        logger: logging.Logger,
        forcing: str,
        force_on: Collection[int] = SIGNALS,
        on_stop: Callable[[], object] | None = None,
        watch_interval: float = 0.2,
    ) -> None:
        self.children = children
        self.log = logger
        self.forcing = forcing
        self.watch_interval = watch_interval
        self.shutdown = Shutdown(force_on=force_on, on_stop=on_stop, on_force=self.kill)

    @property
    def stopping(self) -> threading.Event:
        """Set at the first signal (or by :meth:`request_stop`)."""
        return self.shutdown.should_exit

    @property
    def forced(self) -> bool:
        """Whether a second signal killed the children."""
        return self.shutdown.force_exit

    def install(self) -> None:
        """Take SIGINT and SIGTERM (main thread only)."""
        self.shutdown.install()

    def request_stop(self) -> None:
        """What a signal does, without one."""
        self.stopping.set()

    def start(self) -> None:
        for child in self.children:
            child.start()

    def watch(self) -> None:
        """Until told to stop: every ``watch_interval``, :meth:`tend` the children."""
        while not self.stopping.wait(self.watch_interval):
            self.tend(time.monotonic())

    def tend(self, now: float) -> None:
        """Restart the children that exited (a subclass adds what it watches besides)."""
        for child in self.children:
            tend(child, now)

    def kill(self) -> None:
        """The forced stop: SIGKILL every live child now (runs in the signal handler)."""
        self.log.warning(self.forcing)
        for child in self.children:
            if child.alive():
                assert child.process is not None
                child.process.kill()

    def stop(self, timeout: float, *, in_order: bool = False) -> None:
        """Stop the children (:func:`stop_children`), logging on this supervisor's logger."""
        stop_children(self.children, timeout, in_order=in_order, logger=self.log)
