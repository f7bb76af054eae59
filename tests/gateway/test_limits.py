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


def test_auth_failures_throttle_an_address_after_its_burst_and_recover() -> None:
    from fleetlog.gateway.limits import AuthFailures

    failures = AuthFailures(per_s=10.0, burst=5.0)
    assert failures.retry_after("10.0.0.1", 0.0) == 0.0  # never failed: no entry, no wait
    for _ in range(5):
        failures.failed("10.0.0.1", 0.0)
    assert failures.retry_after("10.0.0.1", 0.0) == pytest.approx(0.1)  # one token at 10/s
    assert failures.retry_after("10.0.0.2", 0.0) == 0.0  # another address is not touched
    assert failures.retry_after("10.0.0.1", 0.1) == 0.0
    failures.forget_idle(0.2)
    assert len(failures) == 1  # not full yet: remembered
    failures.forget_idle(1.0)
    assert len(failures) == 0


def test_auth_failures_table_is_bounded() -> None:
    from fleetlog.gateway.limits import AuthFailures

    failures = AuthFailures(per_s=1.0, burst=1.0, most=3)
    for n in range(10):
        failures.failed(f"10.0.0.{n}", 0.0)
    assert len(failures) == 3
    assert failures.retry_after("10.0.0.9", 0.0) > 0  # the newest are kept
    assert failures.retry_after("10.0.0.0", 0.0) == 0.0  # the oldest forgotten


def test_rate_limited_log_says_how_many_it_stood_for(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from fleetlog.quietlog import RateLimitedLog

    quiet = RateLimitedLog(logging.getLogger("test.quiet"), interval=10.0)
    with caplog.at_level(logging.WARNING, "test.quiet"):
        assert quiet.note("lookup failed", now=0.0)
        assert not any(quiet.note("lookup failed", now=t) for t in (1.0, 2.0, 9.9))
        assert quiet.note("lookup failed", now=10.5)
    assert [record.getMessage() for record in caplog.records] == [
        "lookup failed", "lookup failed (and 3 more like it in the last 10s)"]
    assert quiet.total == 5
