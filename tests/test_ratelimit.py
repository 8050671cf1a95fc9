"""
Tests for L{rendezvous_twisted.core.ratelimit}: token buckets on a Clock.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from rendezvous_twisted.core.ratelimit import RateLimiter


def limiter(
    burst: int = 3, per_second: float = 1.0, max_buckets: int = 100
) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    clock.advance(1000)
    return RateLimiter(burst, per_second, max_buckets, clock), clock


def test_burst_then_refused_with_retry_after() -> None:
    """A key gets its burst at once, then a refusal saying when the next token comes."""
    limit, _ = limiter(burst=3, per_second=0.25)
    assert [limit.take("a") for _ in range(3)] == [None, None, None]
    assert limit.take("a") == 4


def test_keys_have_separate_buckets() -> None:
    """One key spending its budget leaves another's untouched."""
    limit, _ = limiter(burst=1)
    assert limit.take("a") is None
    assert limit.take("a") is not None
    assert limit.take("b") is None


def test_refill_is_capped_at_the_burst() -> None:
    """A long quiet spell refills a bucket to its burst and no further."""
    limit, clock = limiter(burst=2, per_second=1.0)
    limit.take("a")
    clock.advance(3600)
    assert [limit.take("a") for _ in range(3)] == [None, None, 1]


def test_a_clock_stepping_back_takes_nothing_away() -> None:
    """Time going backwards neither refills nor drains a bucket."""
    limit, clock = limiter(burst=1, per_second=1.0)
    limit.take("a")
    clock.rightNow -= 100
    assert limit.take("a") == 1


@settings(max_examples=200, deadline=None)
@given(
    burst=st.integers(1, 20),
    per_second=st.floats(0.01, 100, allow_nan=False),
    gaps=st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=60),
)
def test_retry_after_tells_the_truth(burst: int, per_second: float, gaps: list[float]) -> None:
    """
    After any history, a refused key is served exactly when Retry-After says, and not a second
    earlier.
    """
    limit, clock = limiter(burst=burst, per_second=per_second)
    for gap in gaps:
        clock.advance(gap)
        retry_after = limit.take("k")
        if retry_after is None:
            continue
        assert retry_after >= 1
        if retry_after > 1:
            # A refusal takes nothing, so asking again a second early
            # is refused too.
            clock.advance(retry_after - 1)
            assert limit.take("k") is not None
            clock.advance(1)
        else:
            clock.advance(retry_after)
        assert limit.take("k") is None


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.text(max_size=6), max_size=300), max_buckets=st.integers(1, 20))
def test_buckets_are_bounded(keys: list[str], max_buckets: int) -> None:
    """However many keys come, at most max_buckets buckets are held."""
    limit, _ = limiter(max_buckets=max_buckets)
    for key in keys:
        limit.take(key)
        assert len(limit) <= max_buckets


def test_the_least_recently_used_bucket_is_dropped() -> None:
    """At the bound, a new key drops the bucket used longest ago, never a busy one."""
    limit, _ = limiter(burst=1, max_buckets=2)
    limit.take("busy")
    limit.take("idle")
    assert limit.take("busy") is not None  # busy is now the most recent
    limit.take("new")  # drops idle
    assert len(limit) == 2
    assert limit.take("busy") is not None, "the busy key's spent bucket was dropped"
    assert limit.take("idle") is None, "the idle key was not the one dropped"
