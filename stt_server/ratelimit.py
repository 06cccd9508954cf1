"""Rate limits, sans-IO: token buckets on an injected clock.

A bucket holds up to ``capacity`` tokens and refills ``rate`` per second; a request takes some
tokens or, when there are too few, is told how long to wait. Used for new connections per client
IP, messages per second per session, and seconds of audio per second per session (a real-time
ratio with a burst allowance). Per-key bucket tables are bounded: the least recently used
bucket goes first, so a flood of distinct addresses cannot grow memory without limit.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable

import attrs


@attrs.define
class TokenBucket:
    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate, capacity, capacity, now)

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount``; returns 0.0 when allowed, else seconds until it would be."""
        self._refill(now)
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate if self.rate > 0 else float("inf")


class KeyedLimiter:
    """One bucket per key (a client IP), at most ``max_keys`` of them."""

    def __init__(
        self, *, rate: float, capacity: float, clock: Callable[[], float], max_keys: int = 100_000
    ) -> None:
        self._rate = rate
        self._capacity = capacity
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: collections.OrderedDict[Hashable, TokenBucket] = collections.OrderedDict()

    def take(self, key: Hashable, amount: float = 1.0) -> float:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = TokenBucket.full(self._rate, self._capacity, now)
        self._buckets.move_to_end(key)
        return bucket.take(amount, now)

    def _make_room(self, now: float) -> None:
        # Least recently used first, one at a time: scanning the whole table for full buckets
        # on every new key would cost O(keys) per connection once a flood has filled it.
        while len(self._buckets) >= self._max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
