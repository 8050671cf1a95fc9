"""
The store alone, on a task.Clock: ETags, conditions, expiry, caps and
parked readers.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from rendezvous_twisted import conditions
from rendezvous_twisted.conditions import ANY, NOTHING, Condition
from rendezvous_twisted.config import Config
from rendezvous_twisted.store import (
    Full,
    MemoryStore,
    NotFound,
    PreconditionFailed,
    RendezvousStore,
    TooLarge,
    Version,
    Wakeup,
)

from .conftest import EPOCH, fired

OWNER = "192.0.2.1"
TYPE = b"text/plain"


def make(**config: Any) -> tuple[MemoryStore, Clock]:
    clock = Clock()
    clock.advance(EPOCH)
    return MemoryStore(Config(**config), clock), clock


def create(store: MemoryStore, body: bytes = b"hello", owner: str = OWNER) -> Version:
    version: Version = fired(store.create(body, TYPE, owner))
    return version


def failure_of(d: Deferred[Any]) -> BaseException:
    """
    The exception a fired Deferred failed with; fails the test otherwise.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), f"expected a failure, got {results[0]!r}"
    error = results[0].value
    assert error is not None
    return error


def etag_is(etag: bytes) -> Condition:
    condition = conditions.parse([etag])
    assert condition is not None
    return condition


def test_memory_store_provides_the_interface() -> None:
    """MemoryStore implements every operation of the RendezvousStore protocol."""
    store: RendezvousStore = make()[0]
    assert callable(store.wait_for_change)


# Creating and reading.


def test_create_stores_payload_and_type() -> None:
    """A created rendezvous reads back its bytes and content type unchanged."""
    store, _ = make()
    created = create(store, b"\x00\xffbytes")
    read: Version = fired(store.read(created.rendezvous_id))
    assert (read.body, read.content_type) == (b"\x00\xffbytes", TYPE)
    assert read == created


def test_ids_are_unguessable_and_url_safe() -> None:
    """Ids carry at least 128 random bits in URL-safe characters, and never repeat."""
    store, _ = make(max_rendezvous_per_address=1000, max_rendezvous=1000)
    ids = {create(store).rendezvous_id for _ in range(1000)}
    assert len(ids) == 1000
    for rendezvous_id in ids:
        assert len(rendezvous_id) >= 22  # 22 base64 characters = 132 bits
        assert set(rendezvous_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_expiry_and_last_modified_are_fixed_at_creation() -> None:
    """A new rendezvous expires TTL seconds after creation and was last modified then."""
    store, clock = make(ttl_seconds=45)
    created = create(store)
    assert created.last_modified == clock.seconds()
    assert created.expires == clock.seconds() + 45


def test_create_refuses_oversize_payload() -> None:
    """A payload over max_bytes is refused with TooLarge and nothing is stored."""
    store, _ = make(max_bytes=4)
    assert isinstance(failure_of(store.create(b"12345", TYPE, OWNER)), TooLarge)
    assert store.rendezvous_count == 0
    assert create(store, b"1234").body == b"1234"


def test_read_unknown_is_not_found() -> None:
    """Reading an id that was never created fails with NotFound."""
    store, _ = make()
    assert isinstance(failure_of(store.read("nosuchrendezvous00000")), NotFound)


# ETags.


def test_etags_are_quoted_strong_and_unique_per_write() -> None:
    """Writing identical bytes twice yields two different strong, quoted ETags."""
    store, _ = make()
    created = create(store, b"same")
    first: Version = fired(store.write(created.rendezvous_id, b"same", TYPE, ANY))
    second: Version = fired(store.write(created.rendezvous_id, b"same", TYPE, ANY))
    etags = {created.etag, first.etag, second.etag}
    assert len(etags) == 3
    for etag in etags:
        assert etag.startswith(b'"') and etag.endswith(b'"') and not etag.startswith(b"W/")


def test_two_rendezvous_never_share_an_etag() -> None:
    """Rendezvous created with the same bytes get different ETags."""
    store, _ = make()
    assert create(store, b"x").etag != create(store, b"x").etag


def test_two_stores_never_share_an_etag() -> None:
    """A restarted store does not mint the ETags its predecessor did."""
    assert create(make()[0]).etag != create(make()[0]).etag


# Writing.


def test_write_replaces_payload_keeps_expiry_and_updates_last_modified() -> None:
    """A write replaces bytes and type, moves Last-Modified, and does not extend expiry."""
    store, clock = make()
    created = create(store)
    clock.advance(10)
    written: Version = fired(store.write(created.rendezvous_id, b"new", b"x/y", ANY))
    assert (written.body, written.content_type) == (b"new", b"x/y")
    assert written.last_modified == created.last_modified + 10
    assert written.expires == created.expires
    assert fired(store.read(created.rendezvous_id)) == written


def test_write_with_matching_if_match_succeeds() -> None:
    """A write whose If-Match names the current ETag succeeds."""
    store, _ = make()
    created = create(store)
    written: Version = fired(store.write(created.rendezvous_id, b"b", TYPE, etag_is(created.etag)))
    assert written.body == b"b"


def test_write_with_stale_if_match_fails_with_current_version() -> None:
    """A write whose If-Match is stale fails, carrying the current version, and changes nothing."""
    store, _ = make()
    created = create(store)
    current: Version = fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))
    error = failure_of(store.write(created.rendezvous_id, b"c", TYPE, etag_is(created.etag)))
    assert isinstance(error, PreconditionFailed)
    assert error.current == current
    assert fired(store.read(created.rendezvous_id)) == current


def test_write_if_match_uses_strong_comparison() -> None:
    """A weak tag in If-Match never matches, even with the current opaque tag."""
    store, _ = make()
    created = create(store)
    weak = etag_is(b"W/" + created.etag)
    assert isinstance(
        failure_of(store.write(created.rendezvous_id, b"b", TYPE, weak)), PreconditionFailed
    )


def test_write_with_unparseable_if_match_fails() -> None:
    """An If-Match that matches nothing (garbage) fails the write."""
    store, _ = make()
    created = create(store)
    error = failure_of(store.write(created.rendezvous_id, b"b", TYPE, NOTHING))
    assert isinstance(error, PreconditionFailed)


def test_racing_writers_with_same_if_match_have_one_winner() -> None:
    """Of two writes conditioned on the same ETag, exactly one succeeds."""
    store, _ = make()
    created = create(store)
    condition = etag_is(created.etag)
    first = store.write(created.rendezvous_id, b"A", TYPE, condition)
    second = store.write(created.rendezvous_id, b"B", TYPE, condition)
    assert fired(first).body == b"A"
    assert isinstance(failure_of(second), PreconditionFailed)
    assert fired(store.read(created.rendezvous_id)).body == b"A"


def test_write_oversize_fails_and_keeps_payload() -> None:
    """An oversize write fails with TooLarge and leaves the payload as it was."""
    store, _ = make(max_bytes=3)
    created = create(store, b"abc")
    assert isinstance(failure_of(store.write(created.rendezvous_id, b"abcd", TYPE, ANY)), TooLarge)
    assert fired(store.read(created.rendezvous_id)) == created


def test_write_unknown_is_not_found() -> None:
    """Writing an unknown id fails with NotFound."""
    store, _ = make()
    error = failure_of(store.write("nosuchrendezvous00000", b"", TYPE, ANY))
    assert isinstance(error, NotFound)


# Deleting and expiry.


def test_delete_forgets_the_rendezvous() -> None:
    """After a delete, reads, writes and a second delete fail with NotFound."""
    store, _ = make()
    rendezvous_id = create(store).rendezvous_id
    assert fired(store.delete(rendezvous_id)) is None
    assert isinstance(failure_of(store.read(rendezvous_id)), NotFound)
    assert isinstance(failure_of(store.write(rendezvous_id, b"", TYPE, ANY)), NotFound)
    assert isinstance(failure_of(store.delete(rendezvous_id)), NotFound)
    assert store.rendezvous_count == 0


def test_expired_rendezvous_is_not_found_and_reclaimed() -> None:
    """At its expiry a rendezvous is gone, and its memory is reclaimed by the timer."""
    store, clock = make(ttl_seconds=60)
    rendezvous_id = create(store).rendezvous_id
    clock.advance(59.9)
    assert fired(store.read(rendezvous_id)).body == b"hello"
    clock.advance(0.1)
    assert store.rendezvous_count == 0
    assert not clock.getDelayedCalls()
    assert isinstance(failure_of(store.read(rendezvous_id)), NotFound)


def test_expiry_is_checked_on_access_even_before_the_timer_runs() -> None:
    """A rendezvous past its expiry is NotFound even if its timer has not fired yet."""
    store, clock = make(ttl_seconds=60)
    rendezvous_id = create(store).rendezvous_id
    # Move time without running timers, as a busy reactor might.
    clock.rightNow += 61
    assert isinstance(failure_of(store.read(rendezvous_id)), NotFound)
    assert isinstance(failure_of(store.write(rendezvous_id, b"", TYPE, ANY)), NotFound)
    assert store.rendezvous_count == 0


def test_writes_do_not_extend_expiry() -> None:
    """A rendezvous written just before its expiry still expires on time."""
    store, clock = make(ttl_seconds=10)
    rendezvous_id = create(store).rendezvous_id
    clock.advance(9)
    fired(store.write(rendezvous_id, b"late", TYPE, ANY))
    clock.advance(1)
    assert isinstance(failure_of(store.read(rendezvous_id)), NotFound)


# Capacity.


def test_global_cap_refuses_without_evicting() -> None:
    """A full store refuses a new rendezvous with Full and keeps every live one."""
    store, clock = make(max_rendezvous=3, max_rendezvous_per_address=3, ttl_seconds=60)
    live = [create(store, owner=f"10.0.0.{n}").rendezvous_id for n in range(3)]
    clock.advance(15)
    error = failure_of(store.create(b"x", TYPE, "10.0.0.9"))
    assert isinstance(error, Full)
    # The oldest frees up in 45 s.
    assert error.retry_after_seconds == 45
    for rendezvous_id in live:
        assert fired(store.read(rendezvous_id)).body == b"hello"


def test_global_cap_frees_up_on_delete_and_on_expiry() -> None:
    """Deleting or expiring a rendezvous makes room under the global cap."""
    store, clock = make(max_rendezvous=2, max_rendezvous_per_address=2, ttl_seconds=60)
    first = create(store, owner="a").rendezvous_id
    create(store, owner="b")
    fired(store.delete(first))
    create(store, owner="c")
    clock.advance(60)
    create(store, owner="d")
    create(store, owner="e")


def test_global_cap_counts_only_live_rendezvous() -> None:
    """A rendezvous past expiry whose timer has not run does not hold a place."""
    store, clock = make(max_rendezvous=1, max_rendezvous_per_address=1, ttl_seconds=60)
    create(store, owner="a")
    clock.rightNow += 60
    create(store, owner="b")
    assert store.rendezvous_count == 1


def test_per_address_cap_refuses_that_address_only() -> None:
    """One address at its cap is refused; another address still creates."""
    store, clock = make(max_rendezvous_per_address=2, ttl_seconds=60)
    create(store, owner="a")
    clock.advance(20)
    create(store, owner="a")
    error = failure_of(store.create(b"x", TYPE, "a"))
    assert isinstance(error, Full)
    assert error.retry_after_seconds == 40
    create(store, owner="b")
    clock.advance(40)
    create(store, owner="a")


def test_per_address_cap_counts_only_live_rendezvous() -> None:
    """An address' expired rendezvous whose timer has not run does not count against it."""
    store, clock = make(max_rendezvous_per_address=1, ttl_seconds=60)
    create(store, owner="a")
    clock.rightNow += 60
    create(store, owner="a")


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    """Retry-After rounds up to whole seconds and is never zero."""
    store, clock = make(max_rendezvous=1, max_rendezvous_per_address=1, ttl_seconds=1)
    create(store, owner="a")
    clock.rightNow += 0.9999
    error = failure_of(store.create(b"x", TYPE, "b"))
    assert isinstance(error, Full)
    assert error.retry_after_seconds == 1


# Parked readers.


def park(
    store: MemoryStore, version: Version, timeout: float = 20.0, etag: bytes | None = None
) -> Deferred[Wakeup]:
    return store.wait_for_change(version.rendezvous_id, etag_is(etag or version.etag), timeout)


def test_changed_payload_returns_at_once() -> None:
    """A reader whose If-None-Match no longer matches gets the current version at once."""
    store, _ = make()
    created = create(store)
    written: Version = fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))
    assert fired(park(store, created)) == Wakeup(written, changed=True)
    assert store.parked_count == 0


def test_unparseable_if_none_match_returns_at_once() -> None:
    """An If-None-Match that matches nothing never parks."""
    store, _ = make()
    created = create(store)
    wakeup = fired(store.wait_for_change(created.rendezvous_id, NOTHING, 20))
    assert wakeup == Wakeup(created, changed=True)


def test_matching_reader_is_parked_until_a_write() -> None:
    """A reader whose If-None-Match matches waits, and the next write answers it."""
    store, _ = make()
    created = create(store)
    d = park(store, created)
    assert not d.called
    assert store.parked_count == 1
    written: Version = fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))
    assert fired(d) == Wakeup(written, changed=True)
    assert store.parked_count == 0


def test_weak_if_none_match_parks() -> None:
    """If-None-Match compares weakly: W/ and the current opaque tag match."""
    store, _ = make()
    created = create(store)
    d = park(store, created, etag=b"W/" + created.etag)
    assert not d.called


def test_star_if_none_match_parks_until_a_write() -> None:
    """If-None-Match: * matches any current payload, so the reader waits for the next write."""
    store, _ = make()
    created = create(store)
    d = store.wait_for_change(created.rendezvous_id, ANY, 20)
    assert not d.called
    written: Version = fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))
    assert fired(d) == Wakeup(written, changed=True)


def test_every_parked_reader_gets_the_write() -> None:
    """A write answers every reader parked on the rendezvous, in arrival order."""
    store, _ = make()
    created = create(store)
    order: list[int] = []

    def note(wakeup: Wakeup, n: int) -> Wakeup:
        order.append(n)
        return wakeup

    waits = [park(store, created).addCallback(note, n) for n in range(5)]
    written: Version = fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))
    assert [fired(d) for d in waits] == [Wakeup(written, changed=True)] * 5
    assert order == [0, 1, 2, 3, 4]


def test_write_wakes_only_its_own_rendezvous() -> None:
    """A write on one rendezvous leaves readers of another parked."""
    store, _ = make()
    one, other = create(store), create(store)
    d = park(store, other)
    fired(store.write(one.rendezvous_id, b"b", TYPE, ANY))
    assert not d.called


def test_failed_write_wakes_nobody() -> None:
    """A write refused by its precondition leaves parked readers parked."""
    store, _ = make()
    created = create(store)
    d = park(store, created)
    failure_of(store.write(created.rendezvous_id, b"b", TYPE, NOTHING))
    assert not d.called


def test_delete_answers_parked_readers_not_found() -> None:
    """Deleting a rendezvous answers its parked readers with NotFound."""
    store, _ = make()
    created = create(store)
    d = park(store, created)
    fired(store.delete(created.rendezvous_id))
    assert isinstance(failure_of(d), NotFound)
    assert store.parked_count == 0


def test_expiry_answers_parked_readers_not_found() -> None:
    """A rendezvous' expiry answers its parked readers with NotFound."""
    store, clock = make(ttl_seconds=60, poll_timeout_seconds=20)
    created = create(store)
    clock.advance(50)
    d = park(store, created, timeout=20)
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)
    assert isinstance(failure_of(d), NotFound)
    assert store.parked_count == 0


def test_poll_timeout_returns_unchanged_version() -> None:
    """A parked reader nobody writes for gets the unchanged version at its timeout."""
    store, clock = make()
    created = create(store)
    d = park(store, created, timeout=20)
    clock.advance(19.9)
    assert not d.called
    clock.advance(0.1)
    assert fired(d) == Wakeup(created, changed=False)
    assert store.parked_count == 0
    assert [c.getTime() for c in clock.getDelayedCalls()] == [created.expires]


def test_zero_timeout_never_parks() -> None:
    """A wait of 0 returns the unchanged version at once."""
    store, _ = make()
    created = create(store)
    assert fired(park(store, created, timeout=0)) == Wakeup(created, changed=False)
    assert store.parked_count == 0


def test_wait_never_outlives_the_rendezvous() -> None:
    """A wait longer than the rendezvous' remaining life ends with its expiry, as NotFound."""
    store, clock = make(ttl_seconds=60)
    created = create(store)
    clock.advance(55)
    d = park(store, created, timeout=20)
    clock.advance(5)
    assert isinstance(failure_of(d), NotFound)
    assert not clock.getDelayedCalls()


def test_cancelled_reader_is_dropped_at_once() -> None:
    """Cancelling a parked reader removes it and its timer immediately."""
    store, clock = make()
    created = create(store)
    d = park(store, created)
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    assert store.parked_count == 0
    assert [c.getTime() for c in clock.getDelayedCalls()] == [created.expires]
    # A later write has no one to answer and fails nothing.
    fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))


def test_cancelling_an_answered_reader_is_harmless() -> None:
    """Cancelling a reader after it was answered changes no count."""
    store, _ = make()
    created = create(store)
    d = park(store, created)
    fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))
    d.cancel()
    assert store.parked_count == 0


def test_reader_parking_again_from_its_callback_waits_for_the_next_write() -> None:
    """A reader that parks again while being answered is not answered twice by one write."""
    store, _ = make()
    created = create(store)
    again: list[Deferred[Wakeup]] = []

    def repark(wakeup: Wakeup) -> Wakeup:
        again.append(park(store, wakeup.version))
        return wakeup

    park(store, created).addCallback(repark)
    fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))
    assert len(again) == 1 and not again[0].called
    assert store.parked_count == 1


def test_per_rendezvous_parked_cap() -> None:
    """Past the per-rendezvous cap a reader is refused with Full; others are unaffected."""
    store, clock = make(max_parked_per_rendezvous=2)
    created, other = create(store), create(store)
    park(store, created, timeout=20)
    clock.advance(5)
    park(store, created, timeout=20)
    error = failure_of(park(store, created))
    assert isinstance(error, Full)
    assert error.retry_after_seconds == 15  # when the first wait ends
    assert not park(store, other).called
    assert store.parked_count == 3


def test_global_parked_cap() -> None:
    """Past the server-wide cap a reader is refused with Full."""
    store, _ = make(max_parked=2, max_parked_per_rendezvous=2)
    first, second, third = create(store), create(store), create(store)
    park(store, first)
    park(store, second)
    error = failure_of(park(store, third))
    assert isinstance(error, Full)
    assert error.retry_after_seconds >= 1


def test_parked_places_free_up_when_readers_leave() -> None:
    """Timeouts, cancels and wakes all give back their parked places."""
    store, clock = make(max_parked=1, max_parked_per_rendezvous=1)
    created = create(store)
    park(store, created, timeout=5)
    clock.advance(5)
    park(store, created).cancel()
    d = park(store, created)
    current: Version = fired(store.write(created.rendezvous_id, b"b", TYPE, ANY))
    fired(d)
    assert not park(store, current).called


def test_wait_on_unknown_is_not_found() -> None:
    """Waiting on an unknown rendezvous fails at once with NotFound."""
    store, _ = make()
    d = store.wait_for_change("nosuchrendezvous00000", ANY, 20)
    assert isinstance(failure_of(d), NotFound)


# Shutdown.


def test_shutdown_answers_parked_readers_unchanged_and_stops_parking() -> None:
    """Shutdown answers every parked reader with its unchanged version and parks no one after."""
    store, clock = make()
    created = create(store)
    waits = [park(store, created) for _ in range(3)]
    store.shutdown()
    assert [fired(d) for d in waits] == [Wakeup(created, changed=False)] * 3
    assert store.parked_count == 0
    assert not clock.getDelayedCalls()
    assert fired(park(store, created)) == Wakeup(created, changed=False)
    assert fired(store.read(created.rendezvous_id)) == created


@pytest.mark.parametrize("seconds", [0.5, 60.0])
def test_shutdown_keeps_expiry_on_access(seconds: float) -> None:
    """After shutdown, expiry is still judged on access."""
    store, clock = make(ttl_seconds=60)
    created = create(store)
    store.shutdown()
    clock.advance(seconds)
    result = store.read(created.rendezvous_id)
    if seconds < 60:
        assert fired(result) == created
    else:
        assert isinstance(failure_of(result), NotFound)
