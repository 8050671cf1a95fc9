"""
Token buckets per client key, on an injected clock, bounded in number.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

_EPSILON = 1e-9


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """
    One token bucket per key: C{burst} tokens at most, refilled at
    C{per_second}; each request takes one.

    At most C{max_buckets} buckets are kept.  When a new key comes and the
    limit is reached, the least recently used bucket is dropped, so that a
    spray of addresses costs bounded memory.  A dropped key starts again
    with a full bucket: that is the price of the bound, and a key that is
    used often is never the least recently used one.
    """

    def __init__(
        self, burst: int, per_second: float, max_buckets: int, clock: IReactorTime
    ) -> None:
        self._burst = float(burst)
        self._per_second = per_second
        self._max_buckets = max_buckets
        self._clock = clock
        # Least recently used first.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """
        How many buckets are held.
        """
        return len(self._buckets)

    def take(self, key: str) -> int | None:
        """
        Take a token for C{key}.  None when there was one; otherwise the
        whole seconds, rounded up, until there will be one (a truthful
        C{Retry-After}), and nothing is taken.
        """
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_buckets:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(self._burst, now)
        else:
            self._buckets.move_to_end(key)
            # A clock that steps back never takes tokens away.
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._per_second)
            bucket.stamp = now
        # The epsilon absorbs float rounding, so that waiting exactly the
        # Retry-After we gave always finds a token.
        if bucket.tokens >= 1.0 - _EPSILON:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / self._per_second))
