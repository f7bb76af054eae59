"""Per-device rate limits, with no I/O: token buckets that slow before they refuse.

Each device has two buckets, records/s and bytes/s, each holding ``burst``
seconds' worth.  A frame that fits goes through.  A frame that does not fit
but would within ``max_delay`` is *slowed*: its cost is taken as debt and the
gateway waits that long before handling it (and stops reading from the
device meanwhile).  That is the catch-up allowance: a device flushing its
backlog after a reconnect is paced at its rate instead of being refused.
Only a frame that would wait longer is refused with ``rate_limited`` and a
``retry_after_ms`` after which the same frame is admitted (even one bigger than a full
bucket: it goes into debt).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AuthFailures", "Decision", "DeviceLimiter", "DeviceLimiters", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` saved up; may go into debt."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        """Add what the time since the last refill earned, up to ``capacity``."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` tokens are available (0 if they are now)."""
        self.refill(now)
        return 0.0 if self.tokens >= cost else (cost - self.tokens) / self.rate

    def take(self, cost: float) -> None:
        self.tokens -= cost

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.capacity


@dataclass(frozen=True, slots=True)
class Decision:
    """``delay`` seconds to wait before handling the frame, or a refusal."""

    delay: float = 0.0
    refused: bool = False
    retry_after: float = 0.0


_GO = Decision()


class DeviceLimiter:
    """Both buckets of one device; :meth:`admit` decides for each frame."""

    __slots__ = ("bytes", "max_delay", "records")

    def __init__(
        self, *, records_per_s: float, bytes_per_s: float, burst: float, max_delay: float,
        now: float,
    ) -> None:
        self.records = TokenBucket(records_per_s, records_per_s * burst, now)
        self.bytes = TokenBucket(bytes_per_s, bytes_per_s * burst, now)
        self.max_delay = max_delay

    def admit(self, records: int, size: int, now: float) -> Decision:
        counts, volume = self.records, self.bytes
        counts.refill(now)
        volume.refill(now)
        if counts.tokens >= records and volume.tokens >= size:  # the usual frame: it fits
            counts.tokens -= records
            volume.tokens -= size
            return _GO
        # A frame bigger than a full bucket plus the delay allowance could never be
        # admitted, and its retry_after would be a lie: it goes through once the bucket
        # is that full, and its whole cost is taken as debt that slows what follows.
        ceiling = self.max_delay
        wait = max(
            self.records.wait_for(min(records, self.records.capacity + self.records.rate * ceiling), now),
            self.bytes.wait_for(min(size, self.bytes.capacity + self.bytes.rate * ceiling), now),
        )
        if wait > self.max_delay:
            return Decision(refused=True, retry_after=wait)
        self.records.take(records)
        self.bytes.take(size)
        return _GO if wait == 0.0 else Decision(delay=wait)

    def idle(self, now: float) -> bool:
        """True when both buckets are full: forgetting this limiter changes nothing."""
        return self.records.full(now) and self.bytes.full(now)


class DeviceLimiters:
    """Every device's :class:`DeviceLimiter`, shared by its connections on this node.

    A device that reconnects keeps its debt: limits are per device, not per
    connection.  :meth:`forget_idle` drops the limiters whose buckets are full
    again, which changes nothing for their devices and bounds the table.
    """

    __slots__ = ("_burst", "_bytes_per_s", "_limiters", "_max_delay", "_records_per_s")

    def __init__(self, *, records_per_s: float, bytes_per_s: float, burst: float,
                 max_delay: float) -> None:
        self._records_per_s = records_per_s
        self._bytes_per_s = bytes_per_s
        self._burst = burst
        self._max_delay = max_delay
        self._limiters: dict[str, DeviceLimiter] = {}

    def __len__(self) -> int:
        return len(self._limiters)

    def get(self, device_id: str, now: float) -> DeviceLimiter:
        """``device_id``'s limiter; a new one starts with full buckets at ``now``."""
        limiter = self._limiters.get(device_id)
        if limiter is None:
            limiter = self._limiters[device_id] = DeviceLimiter(
                records_per_s=self._records_per_s, bytes_per_s=self._bytes_per_s,
                burst=self._burst, max_delay=self._max_delay, now=now,
            )
        return limiter

    def forget_idle(self, now: float) -> None:
        """Drop the limiters with nothing to remember (both buckets full)."""
        for device_id in [d for d, limiter in self._limiters.items() if limiter.idle(now)]:
            del self._limiters[device_id]


class AuthFailures:
    """Failed token lookups per source address: a token bucket each, in a bounded table.

    A handshake whose token the gateway's cache does not hold costs a Redis
    lookup; a flood of distinct bad tokens would turn into a flood of lookups.
    Each address may fail ``per_s`` lookups a second (``burst`` saved up);
    past that its uncached tokens are refused with 429 and ``Retry-After``
    before any lookup, while tokens already cached (every connected device's)
    cost nothing and still pass.  The table keeps at most ``most`` addresses
    (the oldest is forgotten first, which can only let an address fail again).
    """

    __slots__ = ("_buckets", "_burst", "_most", "_per_s")

    def __init__(self, *, per_s: float, burst: float, most: int = 100_000) -> None:
        self._per_s = per_s
        self._burst = burst
        self._most = most
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, address: str | None, now: float) -> float:
        """Seconds until ``address`` may look a token up again (0.0: now)."""
        bucket = self._buckets.get(address or "")
        return 0.0 if bucket is None else bucket.wait_for(1.0, now)

    def failed(self, address: str | None, now: float) -> None:
        """A lookup from ``address`` found no such token."""
        key = address or ""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._most:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = TokenBucket(self._per_s, self._burst, now)
        bucket.refill(now)
        bucket.take(1.0)

    def forget_idle(self, now: float) -> None:
        """Drop the addresses whose buckets are full again (nothing to remember)."""
        for address in [a for a, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[address]
