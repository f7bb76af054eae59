"""fleetlog.backoff: the one retry policy (capped exponential, full jitter)."""

from __future__ import annotations

import asyncio
import random

import pytest

from fleetlog.backoff import Backoff


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
