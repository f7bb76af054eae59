"""Try a record condition on records in a child process that can be stopped.

The CEL library evaluates without a time or memory limit and holds the
interpreter lock while it runs: one comprehension that is linear in a list
inside a comprehension over the same list (``data.a.all(x, x in data.a)``)
costs the square of that list, minutes on one 1 MiB record, and a ``map``
that builds lists of lists can take gigabytes.  Refusing such conditions when
they are written cannot be exact (whether ``x in data.a`` is linear depends
on the record), so the API's live preview, which any read token may ask for,
runs the condition here: in a process forked from a ``forkserver`` (which
has imported the engine once, and never holds the API's threads or
connections), with ``seconds`` to answer and an address-space limit.  Past
either, the child is killed and the caller gets :class:`ConditionTooCostly`;
the API's threads and event loop never ran the condition at all.

At most :data:`AT_ONCE` trials run at once per API process; another waits
for one to end within its own time limit, then is refused the same way.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import resource
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from fleetlog.alerts.engine import Preview, preview
from fleetlog.errors import ConditionTooCostly, InvalidRule
from fleetlog.records import StoredRecord

__all__ = ["AT_ONCE", "MEMORY", "preview_in_child"]

#: Trials running at once in one process (each a child process).
AT_ONCE: Final = 4
#: Bytes of address space a trial may add to what its child starts with.
MEMORY: Final = 1024 * 1024 * 1024

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["fleetlog.alerts.engine"])
_SLOTS = threading.BoundedSemaphore(AT_ONCE)


@dataclass(frozen=True, slots=True)
class _Found:
    """A child's answer: the preview's counts, and the indexes of the records it matched."""

    checked: int
    indexes: list[int]
    errors: int
    first_error: str | None


@dataclass(frozen=True, slots=True)
class _Invalid:
    """A child's answer for a condition that cannot be saved (:class:`InvalidRule`'s parts)."""

    message: str
    field: str | None
    position: tuple[int, int] | None


def _address_space() -> int:
    """This process's virtual size in bytes (``/proc``: Linux; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _trial(answer: multiprocessing.connection.Connection, when: str, devices: str,
           records: Sequence[StoredRecord], memory: int) -> None:
    """The child: set its memory limit, compile and run the preview, send the answer (nothing
    when it ran out of memory)."""
    started_with = _address_space()
    if started_with:
        limit = started_with + memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        found = preview(when, devices, records)
    except InvalidRule as exc:
        answer.send(_Invalid(str(exc), exc.field, exc.position))
        return
    except MemoryError:
        return  # the parent reads the closed pipe as "past its memory"
    matched = {id(record) for record in found.matched}
    indexes = [n for n, record in enumerate(records) if id(record) in matched]
    answer.send(_Found(found.checked, indexes, found.errors, found.first_error))
    answer.close()


def preview_in_child(when: str, devices: str, records: Sequence[StoredRecord], *, seconds: float,
                     memory: int = MEMORY) -> Preview:
    """:func:`~fleetlog.alerts.engine.preview` of ``records``, run in a child process.

    Its compile too (with no records, this only checks the condition): raises
    :class:`InvalidRule` for one that cannot be saved, and
    :class:`ConditionTooCostly` when the child does not answer within
    ``seconds`` (the wait for a free slot included), or dies (past ``memory``
    bytes, or killed).  Blocking: call it off the event loop.
    """
    if not _SLOTS.acquire(timeout=seconds):
        raise ConditionTooCostly(f"when: {AT_ONCE} previews are running; none ended within "
                                 f"{seconds:g} s: try again")
    try:
        return _run(when, devices, records, seconds, memory)
    finally:
        _SLOTS.release()


def _run(when: str, devices: str, records: Sequence[StoredRecord], seconds: float, memory: int) -> Preview:
    receive, send = _CONTEXT.Pipe(duplex=False)
    child = _CONTEXT.Process(target=_trial, args=(send, when, devices, records, memory),
                             name="fleetlog-condition-trial", daemon=True)
    child.start()
    send.close()
    answer: _Found | _Invalid | None = None
    on = f"on the {len(records)} newest records" if records else "on an empty record"
    try:
        if receive.poll(seconds):
            try:
                answer = receive.recv()
            except EOFError:  # it died without answering
                answer = None
            if answer is None:
                child.join(1)
                raise ConditionTooCostly(
                    f"when: the condition used more than {memory // (1024 * 1024)} MiB {on} "
                    f"(exit {child.exitcode}); the alerter would too")
        else:
            raise ConditionTooCostly(
                f"when: the condition took longer than {seconds:g} s {on}; the alerter would take "
                "as long (a comprehension whose body walks a "
                "list again, `x in data.list` inside `data.list.all(x, ...)`, costs its square)")
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join(5)
        child.close()
    if isinstance(answer, _Invalid):
        raise InvalidRule(answer.message, answer.field, answer.position)
    assert answer is not None
    return Preview(answer.checked, [records[n] for n in answer.indexes], answer.errors,
                   answer.first_error)
