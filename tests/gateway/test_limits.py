"""fleetlog.gateway.limits: per-device token buckets that slow before they refuse."""

from __future__ import annotations

import pytest

from fleetlog.gateway.limits import DeviceLimiters


def _limiters(max_delay: float = 1.0) -> DeviceLimiters:
    return DeviceLimiters(records_per_s=10, bytes_per_s=1000, burst=1, max_delay=max_delay)


def test_a_burst_passes_then_frames_are_slowed_then_refused() -> None:
    limiter = _limiters().get("dev", 0.0)
    assert limiter.admit(10, 100, 0.0).delay == 0.0
    slowed = limiter.admit(5, 10, 0.0)
    assert not slowed.refused and slowed.delay == pytest.approx(0.5)
    refused = limiter.admit(10, 10, 0.0)  # 1.5 s away: over the 1 s allowance
    assert refused.refused and refused.retry_after == pytest.approx(1.5)
    assert limiter.admit(5, 10, 1.0).delay == 0.0, "the debt was paid back by t=1"


def test_bytes_limit_too() -> None:
    decision = _limiters().get("dev", 0.0).admit(1, 1500, 0.0)
    assert decision.delay == pytest.approx(0.5)


def test_a_device_keeps_its_limiter_until_it_is_idle() -> None:
    limiters = _limiters()
    first = limiters.get("dev", 0.0)
    first.admit(10, 100, 0.0)
    assert limiters.get("dev", 0.5) is first, "a reconnecting device keeps its debt"
    limiters.forget_idle(0.5)
    assert len(limiters) == 1, "buckets not full yet"
    limiters.forget_idle(1.0)
    assert len(limiters) == 0
    assert limiters.get("dev", 1.0).admit(10, 100, 1.0).delay == 0.0


def test_a_frame_bigger_than_a_full_bucket_is_admitted_after_its_retry_after() -> None:
    """retry_after is a promise: the same frame sent again then is admitted (taking debt)."""
    limiter = _limiters().get("dev", 0.0)
    assert limiter.admit(10, 10, 0.0).delay == 0.0  # the bucket is empty now
    refused = limiter.admit(50, 10, 0.0)  # 5 s of records: more than 1 s burst + 1 s delay
    assert refused.refused
    later = refused.retry_after
    admitted = limiter.admit(50, 10, later)
    assert not admitted.refused and admitted.delay <= 1.0
    slowed = limiter.admit(1, 1, later + admitted.delay)
    assert slowed.refused, "its debt still paces what follows"
