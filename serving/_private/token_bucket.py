"""A token bucket: a request rate with bursts, on a clock the caller passes.

The bucket holds up to ``capacity`` tokens and gains ``rate`` per second;
each request takes one. Time comes in as an argument (monotonic seconds),
so that one clock read serves a whole request and tests need no sleeping.
Not thread-safe: each ingress uses its buckets from its own event loop.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "capacity", "_tokens", "_stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        """Full at ``now``. ``rate`` > 0 tokens/s; ``capacity`` >= 1."""
        if rate <= 0 or capacity < 1:
            raise ValueError(f"token bucket needs rate > 0 and capacity >= 1 (got {rate}, {capacity})")
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is
        there (nothing is taken then, so a refused call costs nothing)."""
        tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self.rate

    def reshape(self, rate: float, capacity: float, now: float) -> None:
        """Take a new rate and capacity (a key's limits changed), keeping
        what is left, up to the new capacity."""
        self._tokens = min(capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self.rate = rate
        self.capacity = capacity
