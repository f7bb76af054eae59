"""fleetlog.backoff: the one retry policy (capped exponential, full jitter)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable

import pytest

from fleetlog.backoff import Backoff, retry


def test_the_ceiling_doubles_up_to_the_cap_and_every_delay_is_within_it() -> None:
    random.seed(7)
    backoff = Backoff(initial=0.1, cap=1.0)
    ceilings = []
    for _ in range(8):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])
    assert backoff.attempts == 8


def test_full_jitter_spreads_delays_over_the_whole_range() -> None:
    """Clients retrying after one outage must not come back together."""
    random.seed(11)
    delays = [Backoff(initial=4.0, cap=4.0).next_delay() for _ in range(2000)]
    assert min(delays) < 0.4 and max(delays) > 3.6  # not "equal jitter" (ceiling/2 .. ceiling)


def test_reset_starts_over_from_initial() -> None:
    backoff = Backoff(initial=0.5, cap=30.0)
    for _ in range(10):
        backoff.next_delay()
    assert backoff.ceiling() == 30.0
    backoff.reset()
    assert backoff.ceiling() == 0.5 and backoff.attempts == 0


def test_a_long_failure_does_not_overflow() -> None:
    backoff = Backoff(initial=0.1, cap=2.0)
    for _ in range(5000):
        assert backoff.next_delay() <= 2.0


@pytest.mark.parametrize(("initial", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_nonsense_bounds_are_refused(initial: float, cap: float) -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=initial, cap=cap)


def test_sleep_waits_the_delay_it_returns() -> None:
    backoff = Backoff(initial=0.01, cap=0.01)

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        slept = await backoff.sleep()
        return slept, loop.time() - started

    slept, elapsed = asyncio.run(run())
    assert 0.0 <= slept <= 0.01 and elapsed >= slept * 0.9 and backoff.attempts == 1


def _failing(times: int, log: list[str]) -> Callable[[], str]:
    """An operation that raises OSError ``times`` times, then returns "done"."""
    def operation() -> str:
        log.append("try")
        if log.count("try") <= times:
            raise OSError("down")
        return "done"
    return operation


def test_retry_says_each_failure_waits_and_resets_the_backoff_after_a_success() -> None:
    log: list[str] = []
    backoff = Backoff(initial=0.01, cap=0.02)
    result = retry(_failing(3, log), (OSError,), backoff, threading.Event(),
                   lambda exc, delay: log.append(f"{exc}; retrying in {delay:.2f}"))
    assert result == "done"
    assert [line.split(";")[0] for line in log] == ["try", "down", "try", "down", "try", "down", "try"]
    assert backoff.attempts == 0


def test_retry_lets_other_errors_escape() -> None:
    def broken() -> None:
        raise TypeError("a bug")
    with pytest.raises(TypeError):
        retry(broken, (OSError,), Backoff(), threading.Event(), lambda exc, delay: None)


def test_retry_gives_up_when_told_to_stop_during_a_wait_or_at_the_deadline() -> None:
    stopping = threading.Event()
    log: list[str] = []
    timer = threading.Timer(0.2, stopping.set)
    timer.start()
    began = time.monotonic()
    assert retry(_failing(1000, log), (OSError,), Backoff(initial=5.0, cap=5.0), stopping,
                 lambda exc, delay: log.append("failed")) is None
    assert time.monotonic() - began < 3, "the wait was cut short"
    assert log == ["try", "failed"]
    began = time.monotonic()
    assert retry(_failing(1000, []), (OSError,), Backoff(initial=5.0, cap=5.0), threading.Event(),
                 lambda exc, delay: None, deadline=time.monotonic() + 0.2) is None
    assert time.monotonic() - began < 3


def test_finish_when_stopping_tries_once_more_and_gives_up_silently_once_stopping() -> None:
    stopping = threading.Event()
    log: list[str] = []
    timer = threading.Timer(0.2, stopping.set)
    timer.start()
    assert retry(_failing(1, log), (OSError,), Backoff(initial=5.0, cap=5.0), stopping,
                 lambda exc, delay: log.append("failed"), finish_when_stopping=True) == "done"
    assert log == ["try", "failed", "try"], "stopped during the wait: tried once more"
    log.clear()
    assert retry(_failing(1000, log), (OSError,), Backoff(), stopping,
                 lambda exc, delay: log.append("failed"), finish_when_stopping=True) is None
    assert log == ["try"], "a failure once stopping gives up at once, without a word"
