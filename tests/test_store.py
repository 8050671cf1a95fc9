"""
The store alone: ETags, conditions, expiry, caps and parked readers.

Every behaviour test runs against both stores: L{MemoryStore}, and
C{RedisStore} on a real redis-server.  Time is a task.Clock on both (the
store's timers and its judgement of expiry); Redis connections are made on
the real reactor, so the tests are C{async} and await each operation.
Tests of MemoryStore's internals and of what only Redis holds are grouped
at the end.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import pytest
from twisted.internet import defer, reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock, deferLater

from rendezvous_twisted.core import budget, conditions
from rendezvous_twisted.core.conditions import ANY, NOTHING, Condition
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.core.store import (
    Full,
    NotFound,
    PreconditionFailed,
    RendezvousStore,
    TooLarge,
    Version,
    Wakeup,
    new_etag,
)
from rendezvous_twisted.redis.store import RedisStore
from rendezvous_twisted.redis.url import parse_store_url

from .conftest import EPOCH, answered, on_reactor, reactor_fixture

if TYPE_CHECKING:
    from .redis_server import RedisServer


OWNER = "192.0.2.1"
UNKNOWN = "nosuchrendezvous00000"
TYPE = b"text/plain"
#: How long a test waits, in real time, for something that goes through
#: Redis before it fails instead of hanging.
DEADLINE = 5.0

T = TypeVar("T")


class Store(RendezvousStore, Protocol):
    """
    A store as the tests see it: the operations and the counts.
    """

    @property
    def rendezvous_count(self) -> int: ...

    @property
    def parked_count(self) -> int: ...


# The stores under test.


@dataclass
class Stores:
    """
    Makes the stores of one kind ("memory" or "redis") for one test, and
    closes them after it.
    """

    kind: str
    redis_url: str | None = None
    made: list[RedisStore] = field(default_factory=list)

    async def __call__(
        self, clock: Clock | None = None, prefix: str | None = None, **config: Any
    ) -> tuple[Store, Clock]:
        """
        A new store with C{config}, on C{clock} or on a new Clock at EPOCH;
        a Redis one keeps its keys under C{prefix} if given.
        """
        if clock is None:
            clock = Clock()
            clock.advance(EPOCH)
        if self.kind == "memory":
            return MemoryStore(Config(**config), clock), clock
        assert self.redis_url is not None
        url = self.redis_url
        if prefix is not None:
            url += ("&" if "?" in url else "?") + "prefix=" + prefix
        store = RedisStore(Config(**config), clock, reactor, parse_store_url(url))
        self.made.append(store)
        store.connect()
        await within(store.ready())
        return store, clock

    async def nodes(self, **config: Any) -> tuple[Store, Store, Clock]:
        """
        Two nodes A and B holding the same rendezvous, on one Clock: two
        RedisStores sharing one Redis; in memory, one process is one node,
        so both are the same MemoryStore.
        """
        a, clock = await self(**config)
        if self.kind == "memory":
            return a, a, clock
        b, _ = await self(clock, **config)
        return a, b, clock

    async def close(self) -> None:
        for store in self.made:
            # Answer readers a test left parked, then hang up.
            store.shutdown()
            await within(store.close())


BACKENDS = ["memory", "redis"]
#: Runs a test against RedisStore alone.
redis_only = pytest.mark.parametrize("kind", ["redis"])


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    """
    Which store the test runs against.
    """
    name: str = request.param
    return name


@reactor_fixture
async def make(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    """
    The maker of stores under test; a Redis one gets a flushed redis-server.
    """
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    stores = Stores(kind, url)
    yield stores
    await stores.close()


# Helpers.


def within(d: Deferred[T], seconds: float = DEADLINE) -> Deferred[T]:
    """
    C{d}, failed with a TimeoutError (and cancelled) if it has no result
    within C{seconds} of real time.
    """
    return d.addTimeout(seconds, reactor)


async def until(condition: Callable[[], bool], what: str) -> None:
    """
    Wait, in real time and no longer than DEADLINE, for C{condition} to hold.
    In memory everything is synchronous and it holds at once.
    """
    deadline = reactor.seconds() + DEADLINE
    while not condition():
        assert reactor.seconds() < deadline, f"still not {what} after {DEADLINE} s"
        await deferLater(reactor, 0.001)


async def parked(store: Store, count: int) -> None:
    """
    Wait for C{count} readers to be parked on C{store}, with their timers
    running.  RedisStore counts a reader at once, reads the rendezvous and
    starts the reader's timer when that read is answered: before any later
    command of that store is (one connection, answered in order).
    """
    await until(lambda: store.parked_count == count, f"{count} parked")
    if isinstance(store, RedisStore):
        await outcome(store.read(UNKNOWN))


async def create(store: Store, body: bytes = b"hello", owner: str = OWNER) -> Version:
    return await within(store.create(body, TYPE, owner))


async def outcome(d: Deferred[T]) -> T | Exception:
    """
    What an operation gives: its result, or the exception it fails with.
    """
    try:
        return await within(d)
    except defer.TimeoutError:
        raise  # the test's deadline, not the operation's answer
    except Exception as error:
        return error


async def failure_of(d: Deferred[Any]) -> Exception:
    """
    The exception an operation fails with; fails the test if it succeeds.
    """
    result = await outcome(d)
    assert isinstance(result, Exception), f"expected a failure, got {result!r}"
    return result


def etag_is(etag: bytes) -> Condition:
    condition = conditions.parse([etag])
    assert condition is not None
    return condition


def park(
    store: Store, version: Version, timeout: float = 20.0, etag: bytes | None = None
) -> Deferred[Wakeup]:
    return store.wait_for_change(version.rendezvous_id, etag_is(etag or version.etag), timeout)


@on_reactor
async def test_store_provides_the_interface(make: Stores) -> None:
    """Each store implements every operation of the RendezvousStore protocol."""
    store, _ = await make()
    for operation in ("create", "read", "write", "send", "delete", "wait_for_change", "shutdown"):
        assert callable(getattr(store, operation))


# Creating and reading.


@on_reactor
async def test_create_stores_payload_and_type(make: Stores) -> None:
    """A created rendezvous reads back its bytes and content type unchanged."""
    store, _ = await make()
    created = await create(store, b"\x00\xffbytes")
    read = await store.read(created.rendezvous_id)
    assert (read.body, read.content_type) == (b"\x00\xffbytes", TYPE)
    assert read == created


@on_reactor
async def test_ids_are_unguessable_and_url_safe(make: Stores) -> None:
    """Ids carry at least 128 random bits in URL-safe characters, and never repeat."""
    store, _ = await make(max_rendezvous_per_address=1000, max_rendezvous=1000)
    made = await within(gatherResults([store.create(b"hello", TYPE, OWNER) for _ in range(1000)]))
    ids = {version.rendezvous_id for version in made}
    assert len(ids) == 1000
    for rendezvous_id in ids:
        assert len(rendezvous_id) >= 22  # 22 base64 characters = 132 bits
        assert set(rendezvous_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


@on_reactor
async def test_expiry_and_last_modified_are_fixed_at_creation(make: Stores) -> None:
    """A new rendezvous expires TTL seconds after creation and was last modified then."""
    store, clock = await make(ttl_seconds=45)
    created = await create(store)
    assert created.last_modified == clock.seconds()
    assert created.expires == clock.seconds() + 45


@on_reactor
async def test_create_refuses_oversize_payload(make: Stores) -> None:
    """A payload over max_bytes is refused with TooLarge and nothing is stored."""
    store, _ = await make(max_bytes=4)
    assert isinstance(await failure_of(store.create(b"12345", TYPE, OWNER)), TooLarge)
    assert store.rendezvous_count == 0
    assert (await create(store, b"1234")).body == b"1234"


@on_reactor
async def test_read_unknown_is_not_found(make: Stores) -> None:
    """Reading an id that was never created fails with NotFound."""
    store, _ = await make()
    assert isinstance(await failure_of(store.read(UNKNOWN)), NotFound)


# ETags.


@on_reactor
async def test_etags_are_quoted_strong_and_unique_per_write(make: Stores) -> None:
    """Writing identical bytes twice yields two different strong, quoted ETags."""
    store, _ = await make()
    created = await create(store, b"same")
    first = await store.write(created.rendezvous_id, b"same", TYPE, ANY)
    second = await store.write(created.rendezvous_id, b"same", TYPE, ANY)
    etags = {created.etag, first.etag, second.etag}
    assert len(etags) == 3
    for etag in etags:
        assert etag.startswith(b'"') and etag.endswith(b'"') and not etag.startswith(b"W/")


@on_reactor
async def test_two_rendezvous_never_share_an_etag(make: Stores) -> None:
    """Rendezvous created with the same bytes get different ETags."""
    store, _ = await make()
    assert (await create(store, b"x")).etag != (await create(store, b"x")).etag


@on_reactor
async def test_etags_link_nothing_across_writes_or_rendezvous(make: Stores) -> None:
    """
    Every ETag is 96 random bits in hex: no two, of one rendezvous or of several, share more of a
    prefix than chance gives, so none tells how many writes the server made or which came first.
    """
    store, _ = await make()
    etags = []
    for _ in range(10):
        created = await create(store, b"x")
        written = await store.write(created.rendezvous_id, b"x", TYPE, ANY)
        etags += [created.etag, written.etag]
    for etag in etags:
        assert re.fullmatch(rb'"[0-9a-f]{24}"', etag), etag
    # 190 pairs: sharing 8 hex digits by chance is a 1-in-20-million event.
    prefixes = {etag[1:9] for etag in etags}
    assert len(prefixes) == len(etags), etags


def test_etags_differ_in_a_forked_child() -> None:
    """A child process forked after ETags were drawn draws its own, never the parent's next ones."""
    new_etag()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, b"".join(new_etag() for _ in range(4)))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read()
    parent = b"".join(new_etag() for _ in range(4))
    assert len(child) == len(parent) == 4 * 26
    assert child != parent


@on_reactor
async def test_two_stores_never_share_an_etag(make: Stores) -> None:
    """A restarted store does not mint the ETags its predecessor did."""
    first, _ = await make()
    second, _ = await make()
    assert (await create(first)).etag != (await create(second)).etag


# Writing.


@on_reactor
async def test_write_replaces_payload_keeps_expiry_and_updates_last_modified(
    make: Stores,
) -> None:
    """A write replaces bytes and type, moves Last-Modified, and does not extend expiry."""
    store, clock = await make()
    created = await create(store)
    clock.advance(10)
    written = await store.write(created.rendezvous_id, b"new", b"x/y", ANY)
    assert (written.body, written.content_type) == (b"new", b"x/y")
    assert written.last_modified == created.last_modified + 10
    assert written.expires == created.expires
    assert await store.read(created.rendezvous_id) == written


@on_reactor
async def test_write_with_matching_if_match_succeeds(make: Stores) -> None:
    """A write whose If-Match names the current ETag succeeds."""
    store, _ = await make()
    created = await create(store)
    written = await store.write(created.rendezvous_id, b"b", TYPE, etag_is(created.etag))
    assert written.body == b"b"


@on_reactor
async def test_write_with_if_match_listing_the_current_etag_succeeds(make: Stores) -> None:
    """A write whose If-Match lists several ETags, one of them current, succeeds."""
    store, _ = await make()
    created = await create(store)
    stale = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    current = await store.write(created.rendezvous_id, b"c", TYPE, ANY)
    listed = etag_is(b", ".join([created.etag, b"W/" + stale.etag, current.etag]))
    assert (await store.write(created.rendezvous_id, b"d", TYPE, listed)).body == b"d"
    # Without the current one, the same list fails.
    unlisted = etag_is(b", ".join([created.etag, stale.etag]))
    error = await failure_of(store.write(created.rendezvous_id, b"e", TYPE, unlisted))
    assert isinstance(error, PreconditionFailed)


@on_reactor
async def test_write_with_stale_if_match_fails_with_current_version(make: Stores) -> None:
    """A write whose If-Match is stale fails, carrying the current version, and changes nothing."""
    store, _ = await make()
    created = await create(store)
    current = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    error = await failure_of(store.write(created.rendezvous_id, b"c", TYPE, etag_is(created.etag)))
    assert isinstance(error, PreconditionFailed)
    assert error.current == current
    assert await store.read(created.rendezvous_id) == current


@on_reactor
async def test_write_if_match_uses_strong_comparison(make: Stores) -> None:
    """A weak tag in If-Match never matches, even with the current opaque tag."""
    store, _ = await make()
    created = await create(store)
    weak = etag_is(b"W/" + created.etag)
    assert isinstance(
        await failure_of(store.write(created.rendezvous_id, b"b", TYPE, weak)),
        PreconditionFailed,
    )


@on_reactor
async def test_write_with_unparseable_if_match_fails(make: Stores) -> None:
    """An If-Match that matches nothing (garbage) fails the write."""
    store, _ = await make()
    created = await create(store)
    error = await failure_of(store.write(created.rendezvous_id, b"b", TYPE, NOTHING))
    assert isinstance(error, PreconditionFailed)


@on_reactor
async def test_racing_writers_with_same_if_match_have_one_winner(make: Stores) -> None:
    """Of two writes conditioned on the same ETag, exactly one succeeds."""
    store, _ = await make()
    created = await create(store)
    condition = etag_is(created.etag)
    # Both are sent before either is answered.
    first = store.write(created.rendezvous_id, b"A", TYPE, condition)
    second = store.write(created.rendezvous_id, b"B", TYPE, condition)
    winner = await within(first)
    assert winner.body == b"A"
    error = await failure_of(second)
    assert isinstance(error, PreconditionFailed)
    assert error.current == winner
    assert (await store.read(created.rendezvous_id)).body == b"A"


@on_reactor
async def test_write_oversize_fails_and_keeps_payload(make: Stores) -> None:
    """An oversize write fails with TooLarge and leaves the payload as it was."""
    store, _ = await make(max_bytes=3)
    created = await create(store, b"abc")
    error = await failure_of(store.write(created.rendezvous_id, b"abcd", TYPE, ANY))
    assert isinstance(error, TooLarge)
    assert await store.read(created.rendezvous_id) == created


@on_reactor
async def test_write_unknown_is_not_found(make: Stores) -> None:
    """Writing an unknown id fails with NotFound."""
    store, _ = await make()
    error = await failure_of(store.write(UNKNOWN, b"", TYPE, ANY))
    assert isinstance(error, NotFound)


# Deleting and expiry.


@on_reactor
async def test_delete_forgets_the_rendezvous(make: Stores) -> None:
    """After a delete, reads, writes and a second delete fail with NotFound."""
    store, _ = await make()
    rendezvous_id = (await create(store)).rendezvous_id
    deleted: Deferred[Any] = store.delete(rendezvous_id)
    assert await deleted is None
    assert isinstance(await failure_of(store.read(rendezvous_id)), NotFound)
    assert isinstance(await failure_of(store.write(rendezvous_id, b"", TYPE, ANY)), NotFound)
    assert isinstance(await failure_of(store.delete(rendezvous_id)), NotFound)


@on_reactor
async def test_a_create_or_delete_its_caller_gave_up_on_still_counts(make: Stores) -> None:
    """A create or delete cancelled by its caller (a client that hung up) is counted once done."""
    store, _ = await make()
    gave_up = store.create(b"x", TYPE, OWNER)
    gave_up.cancel()
    gave_up.addErrback(lambda _: None)
    await until(lambda: store.created_total == 1, "the create counted")
    created = await create(store)
    deleting = store.delete(created.rendezvous_id)
    deleting.cancel()
    deleting.addErrback(lambda _: None)
    await until(lambda: store.deleted_total == 1, "the delete counted")
    assert isinstance(await failure_of(store.read(created.rendezvous_id)), NotFound)
    assert store.created_total == 2


# What every store tells beside its operations (the rest of the contract).


@on_reactor
async def test_readings_export_the_counts_and_a_shared_stores_availability(
    make: Stores,
) -> None:
    """
    A store's metrics are its counts, read when scraped; a Redis store also
    exports whether it can reach Redis, the memory store (always available) does not.
    """
    store, _ = await make()
    readings = {reading.name: reading for reading in store.readings()}
    await create(store)
    gone = await create(store)
    await store.delete(gone.rendezvous_id)
    now = {name: reading.read() for name, reading in readings.items()}
    assert now == {
        "rendezvous_created": 2,
        "rendezvous_deleted": 1,
        "rendezvous_expired": 0,
        # Redis: as this process saw it at its last create.
        "rendezvous_live": 1 if make.kind == "memory" else 2,
        "rendezvous_parked_readers": 0,
        **({"rendezvous_store_available": 1} if make.kind == "redis" else {}),
    }
    assert [readings[name].kind for name in sorted(now)] == [
        "counter",
        "counter",
        "counter",
        "gauge",
        "gauge",
        *(["gauge"] if make.kind == "redis" else []),
    ]


def test_an_unreachable_redis_reads_as_unavailable() -> None:
    """A Redis store that has no connection exports rendezvous_store_available 0."""
    from twisted.internet import reactor

    store = RedisStore(Config(), Clock(), reactor, parse_store_url("redis://127.0.0.1:1/0"))
    [available] = [r for r in store.readings() if r.name == "rendezvous_store_available"]
    assert available.read() == 0


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_store_says_where_its_memory_is_budgeted(kind: str) -> None:
    """
    The memory store's rendezvous count in this process' budget; a Redis
    store names the budget of the Redis all processes share.
    """
    from twisted.internet import reactor

    config = Config(max_rendezvous=70, max_bytes=100)
    store: RendezvousStore
    if kind == "memory":
        store = MemoryStore(config, Clock())
        assert store.memory_elsewhere() is None
    else:
        store = RedisStore(config, Clock(), reactor, parse_store_url("redis://127.0.0.1:1/0"))
        assert store.memory_elsewhere() == (
            "in Redis, for all processes together",
            budget.redis_memory(config),
        )


@on_reactor
async def test_expired_rendezvous_is_not_found(make: Stores) -> None:
    """At its expiry on the store's clock a rendezvous is gone, not a moment before."""
    store, clock = await make(ttl_seconds=60)
    rendezvous_id = (await create(store)).rendezvous_id
    clock.advance(59.9)
    assert (await store.read(rendezvous_id)).body == b"hello"
    clock.advance(0.1)
    assert isinstance(await failure_of(store.read(rendezvous_id)), NotFound)


@on_reactor
async def test_expiry_is_checked_on_access_even_before_the_timer_runs(make: Stores) -> None:
    """A rendezvous past its expiry is NotFound even if its timer has not fired yet."""
    store, clock = await make(ttl_seconds=60)
    rendezvous_id = (await create(store)).rendezvous_id
    # Move time without running timers, as a busy reactor might.
    clock.rightNow += 61
    assert isinstance(await failure_of(store.read(rendezvous_id)), NotFound)
    assert isinstance(await failure_of(store.write(rendezvous_id, b"", TYPE, ANY)), NotFound)
    assert isinstance(await failure_of(store.wait_for_change(rendezvous_id, ANY, 20)), NotFound)
    assert isinstance(await failure_of(store.delete(rendezvous_id)), NotFound)


@on_reactor
async def test_writes_do_not_extend_expiry(make: Stores) -> None:
    """A rendezvous written just before its expiry still expires on time."""
    store, clock = await make(ttl_seconds=10)
    rendezvous_id = (await create(store)).rendezvous_id
    clock.advance(9)
    await store.write(rendezvous_id, b"late", TYPE, ANY)
    clock.advance(1)
    assert isinstance(await failure_of(store.read(rendezvous_id)), NotFound)


# Capacity.


@on_reactor
async def test_global_cap_refuses_without_evicting(make: Stores) -> None:
    """A full store refuses a new rendezvous with Full and keeps every live one."""
    store, clock = await make(max_rendezvous=3, max_rendezvous_per_address=3, ttl_seconds=60)
    live = [(await create(store, owner=f"10.0.0.{n}")).rendezvous_id for n in range(3)]
    clock.advance(15)
    error = await failure_of(store.create(b"x", TYPE, "10.0.0.9"))
    assert isinstance(error, Full)
    # The oldest frees up in 45 s.
    assert error.retry_after_seconds == 45
    for rendezvous_id in live:
        assert (await store.read(rendezvous_id)).body == b"hello"


@on_reactor
async def test_global_cap_frees_up_on_delete_and_on_expiry(make: Stores) -> None:
    """Deleting or expiring a rendezvous makes room under the global cap."""
    store, clock = await make(max_rendezvous=2, max_rendezvous_per_address=2, ttl_seconds=60)
    first = (await create(store, owner="a")).rendezvous_id
    await create(store, owner="b")
    await store.delete(first)
    await create(store, owner="c")
    clock.advance(60)
    await create(store, owner="d")
    await create(store, owner="e")


@on_reactor
async def test_global_cap_counts_only_live_rendezvous(make: Stores) -> None:
    """A rendezvous past expiry whose timer has not run does not hold a place."""
    store, clock = await make(max_rendezvous=1, max_rendezvous_per_address=1, ttl_seconds=60)
    await create(store, owner="a")
    clock.rightNow += 60
    await create(store, owner="b")
    assert store.rendezvous_count == 1


@on_reactor
async def test_per_address_cap_refuses_that_address_only(make: Stores) -> None:
    """One address at its cap is refused; another address still creates."""
    store, clock = await make(max_rendezvous_per_address=2, ttl_seconds=60)
    await create(store, owner="a")
    clock.advance(20)
    await create(store, owner="a")
    error = await failure_of(store.create(b"x", TYPE, "a"))
    assert isinstance(error, Full)
    assert error.retry_after_seconds == 40
    await create(store, owner="b")
    clock.advance(40)
    await create(store, owner="a")


@on_reactor
async def test_per_address_cap_counts_only_live_rendezvous(make: Stores) -> None:
    """An address' expired rendezvous whose timer has not run does not count against it."""
    store, clock = await make(max_rendezvous_per_address=1, ttl_seconds=60)
    await create(store, owner="a")
    clock.rightNow += 60
    await create(store, owner="a")


@on_reactor
async def test_retry_after_is_whole_seconds_at_least_one(make: Stores) -> None:
    """Retry-After rounds up to whole seconds and is never zero."""
    store, clock = await make(max_rendezvous=1, max_rendezvous_per_address=1, ttl_seconds=1)
    await create(store, owner="a")
    clock.rightNow += 0.9999
    error = await failure_of(store.create(b"x", TYPE, "b"))
    assert isinstance(error, Full)
    assert error.retry_after_seconds == 1


# Parked readers.


@on_reactor
async def test_changed_payload_returns_at_once(make: Stores) -> None:
    """A reader whose If-None-Match no longer matches gets the current version at once."""
    store, _ = await make()
    created = await create(store)
    written = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    assert await within(park(store, created)) == Wakeup(written, changed=True)
    assert store.parked_count == 0


@on_reactor
async def test_unparseable_if_none_match_returns_at_once(make: Stores) -> None:
    """An If-None-Match that matches nothing never parks."""
    store, _ = await make()
    created = await create(store)
    wakeup = await within(store.wait_for_change(created.rendezvous_id, NOTHING, 20))
    assert wakeup == Wakeup(created, changed=True)


@on_reactor
async def test_matching_reader_is_parked_until_a_write(make: Stores) -> None:
    """A reader whose If-None-Match matches waits, and the next write answers it."""
    store, _ = await make()
    created = await create(store)
    d = park(store, created)
    await parked(store, 1)
    assert not answered(d)
    written = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    assert await within(d) == Wakeup(written, changed=True)
    assert store.parked_count == 0


@on_reactor
async def test_weak_if_none_match_parks(make: Stores) -> None:
    """If-None-Match compares weakly: W/ and the current opaque tag match."""
    store, _ = await make()
    created = await create(store)
    d = park(store, created, etag=b"W/" + created.etag)
    await parked(store, 1)
    assert not answered(d)


@on_reactor
async def test_star_if_none_match_parks_until_a_write(make: Stores) -> None:
    """If-None-Match: * matches any current payload, so the reader waits for the next write."""
    store, _ = await make()
    created = await create(store)
    d = store.wait_for_change(created.rendezvous_id, ANY, 20)
    # A reader on the current ETag: the write that answers it answers both.
    witness = park(store, created)
    await parked(store, 2)
    assert not answered(d)
    written = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    assert await within(witness) == Wakeup(written, changed=True)
    assert answered(d)
    assert await within(d) == Wakeup(written, changed=True)


@on_reactor
async def test_every_parked_reader_gets_the_write(make: Stores) -> None:
    """A write answers every reader parked on the rendezvous, in arrival order."""
    store, _ = await make()
    created = await create(store)
    order: list[int] = []

    def note(wakeup: Wakeup, n: int) -> Wakeup:
        order.append(n)
        return wakeup

    waits = [park(store, created).addCallback(note, n) for n in range(5)]
    await parked(store, 5)
    written = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    assert await within(gatherResults(waits)) == [Wakeup(written, changed=True)] * 5
    assert order == [0, 1, 2, 3, 4]


@on_reactor
async def test_write_wakes_only_its_own_rendezvous(make: Stores) -> None:
    """A write on one rendezvous leaves readers of another parked."""
    store, _ = await make()
    one, other = await create(store), await create(store)
    d = park(store, other)
    # A reader of the written rendezvous, to know when the write has been
    # seen by everyone it concerns.
    witness = park(store, one)
    await parked(store, 2)
    await store.write(one.rendezvous_id, b"b", TYPE, ANY)
    await within(witness)
    assert not answered(d)
    # Its own rendezvous' next write is what answers it.
    written = await store.write(other.rendezvous_id, b"c", TYPE, ANY)
    assert await within(d) == Wakeup(written, changed=True)


@on_reactor
async def test_failed_write_wakes_nobody(make: Stores) -> None:
    """A write refused by its precondition leaves parked readers parked."""
    store, _ = await make()
    created = await create(store)
    d = park(store, created)
    await parked(store, 1)
    await failure_of(store.write(created.rendezvous_id, b"b", TYPE, NOTHING))
    # Then one that succeeds: the reader's first answer must be its version.
    written = await store.write(created.rendezvous_id, b"c", TYPE, ANY)
    assert await within(d) == Wakeup(written, changed=True)


@on_reactor
async def test_delete_answers_parked_readers_not_found(make: Stores) -> None:
    """Deleting a rendezvous answers its parked readers with NotFound."""
    store, _ = await make()
    created = await create(store)
    d = park(store, created)
    await parked(store, 1)
    await store.delete(created.rendezvous_id)
    assert isinstance(await failure_of(d), NotFound)
    assert store.parked_count == 0


@on_reactor
async def test_expiry_answers_parked_readers_not_found(make: Stores) -> None:
    """A rendezvous' expiry answers its parked readers with NotFound."""
    store, clock = await make(ttl_seconds=60, poll_timeout_seconds=20)
    created = await create(store)
    clock.advance(50)
    d = park(store, created, timeout=20)
    await parked(store, 1)
    clock.advance(9.9)
    assert not answered(d)
    clock.advance(0.1)
    assert isinstance(await failure_of(d), NotFound)
    assert store.parked_count == 0


@on_reactor
async def test_poll_timeout_returns_unchanged_version(make: Stores) -> None:
    """A parked reader nobody writes for gets the unchanged version at its timeout."""
    store, clock = await make()
    created = await create(store)
    d = park(store, created, timeout=20)
    await parked(store, 1)
    clock.advance(19.9)
    assert not answered(d)
    clock.advance(0.1)
    assert await within(d) == Wakeup(created, changed=False)
    assert store.parked_count == 0
    assert reader_timers(make, clock, created) == []


@on_reactor
async def test_zero_timeout_never_parks(make: Stores) -> None:
    """A wait of 0 returns the unchanged version at once."""
    store, _ = await make()
    created = await create(store)
    assert await within(park(store, created, timeout=0)) == Wakeup(created, changed=False)
    assert store.parked_count == 0


@on_reactor
async def test_wait_never_outlives_the_rendezvous(make: Stores) -> None:
    """A wait longer than the rendezvous' remaining life ends with its expiry, as NotFound."""
    store, clock = await make(ttl_seconds=60)
    created = await create(store)
    clock.advance(55)
    d = park(store, created, timeout=20)
    await parked(store, 1)
    clock.advance(5)
    assert isinstance(await failure_of(d), NotFound)
    assert not clock.getDelayedCalls()


@on_reactor
async def test_cancelled_reader_is_dropped_at_once(make: Stores) -> None:
    """Cancelling a parked reader removes it and its timer immediately."""
    store, clock = await make()
    created = await create(store)
    d = park(store, created)
    await parked(store, 1)
    d.cancel()
    assert store.parked_count == 0
    assert reader_timers(make, clock, created) == []
    assert isinstance(await failure_of(d), CancelledError)
    # A later write has no one to answer and fails nothing.
    await store.write(created.rendezvous_id, b"b", TYPE, ANY)


@on_reactor
async def test_cancelling_an_answered_reader_is_harmless(make: Stores) -> None:
    """Cancelling a reader after it was answered changes no count."""
    store, _ = await make()
    created = await create(store)
    d = park(store, created)
    await parked(store, 1)
    await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    await until(lambda: answered(d), "answered")
    d.cancel()
    assert store.parked_count == 0


@on_reactor
async def test_reader_parking_again_from_its_callback_waits_for_the_next_write(
    make: Stores,
) -> None:
    """A reader that parks again while being answered is not answered twice by one write."""
    store, _ = await make()
    created = await create(store)
    again: list[Deferred[Wakeup]] = []

    def repark(wakeup: Wakeup) -> Wakeup:
        again.append(park(store, wakeup.version))
        return wakeup

    first = park(store, created).addCallback(repark)
    await parked(store, 1)
    written = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    assert await within(first) == Wakeup(written, changed=True)
    assert len(again) == 1
    await parked(store, 1)
    assert not answered(again[0])
    # The next write, and only it, answers the reader that parked again.
    second = await store.write(created.rendezvous_id, b"c", TYPE, ANY)
    assert await within(again[0]) == Wakeup(second, changed=True)


@on_reactor
async def test_per_rendezvous_parked_cap(make: Stores) -> None:
    """Past the per-rendezvous cap a reader is refused with Full; others are unaffected."""
    store, clock = await make(max_parked_per_rendezvous=2)
    created, other = await create(store), await create(store)
    park(store, created, timeout=20)
    await parked(store, 1)
    clock.advance(5)
    park(store, created, timeout=20)
    await parked(store, 2)
    error = await failure_of(park(store, created))
    assert isinstance(error, Full)
    assert error.retry_after_seconds == 15  # when the first wait ends
    d = park(store, other)
    await parked(store, 3)
    assert not answered(d)


@on_reactor
async def test_global_parked_cap(make: Stores) -> None:
    """Past the server-wide cap a reader is refused with Full."""
    store, _ = await make(max_parked=2, max_parked_per_rendezvous=2)
    first, second, third = await create(store), await create(store), await create(store)
    park(store, first)
    park(store, second)
    await parked(store, 2)
    error = await failure_of(park(store, third))
    assert isinstance(error, Full)
    assert error.retry_after_seconds >= 1


@on_reactor
async def test_parking_caps_refuse_only_a_reader_that_would_park(make: Stores) -> None:
    """Past the parking caps a reader that would not park is answered: a change, or NotFound."""
    store, _ = await make(max_parked=1, max_parked_per_rendezvous=1)
    created, gone, other = await create(store), await create(store), await create(store)
    written = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    await store.delete(gone.rendezvous_id)
    park(store, other)
    await parked(store, 1)
    assert await within(park(store, created)) == Wakeup(written, changed=True)
    assert isinstance(await failure_of(park(store, gone)), NotFound)
    assert isinstance(await failure_of(store.wait_for_change(UNKNOWN, ANY, 20)), NotFound)
    # A reader that would park is the one refused.
    assert isinstance(await failure_of(park(store, written)), Full)
    assert store.parked_count == 1


@on_reactor
async def test_parked_places_free_up_when_readers_leave(make: Stores) -> None:
    """Timeouts, cancels and wakes all give back their parked places."""
    store, clock = await make(max_parked=1, max_parked_per_rendezvous=1)
    created = await create(store)
    timing_out = park(store, created, timeout=5)
    await parked(store, 1)
    clock.advance(5)
    await within(timing_out)
    # Cancelled at once, parked or not yet.
    cancelled = park(store, created)
    cancelled.cancel()
    assert isinstance(await failure_of(cancelled), CancelledError)
    d = park(store, created)
    await parked(store, 1)
    current = await store.write(created.rendezvous_id, b"b", TYPE, ANY)
    await within(d)
    last = park(store, current)
    await parked(store, 1)
    assert not answered(last)


@on_reactor
async def test_wait_on_unknown_is_not_found(make: Stores) -> None:
    """Waiting on an unknown rendezvous fails at once with NotFound."""
    store, _ = await make()
    d = store.wait_for_change(UNKNOWN, ANY, 20)
    assert isinstance(await failure_of(d), NotFound)


# Shutdown.


@on_reactor
async def test_shutdown_answers_parked_readers_unchanged_and_stops_parking(
    make: Stores,
) -> None:
    """Shutdown answers every parked reader with its unchanged version and parks no one after."""
    store, clock = await make()
    created = await create(store)
    waits = [park(store, created) for _ in range(3)]
    await parked(store, 3)
    store.shutdown()
    assert await within(gatherResults(waits)) == [Wakeup(created, changed=False)] * 3
    assert store.parked_count == 0
    assert not clock.getDelayedCalls()
    assert await within(park(store, created)) == Wakeup(created, changed=False)
    assert await store.read(created.rendezvous_id) == created


@on_reactor
async def test_shutdown_answers_a_wait_that_just_began(make: Stores) -> None:
    """A wait begun just before shutdown is answered with the unchanged version too."""
    store, clock = await make()
    created = await create(store)
    d = park(store, created)
    store.shutdown()
    assert await within(d) == Wakeup(created, changed=False)
    assert store.parked_count == 0
    assert reader_timers(make, clock) == []


@pytest.mark.parametrize("seconds", [0.5, 60.0])
@on_reactor
async def test_shutdown_keeps_expiry_on_access(make: Stores, seconds: float) -> None:
    """After shutdown, expiry is still judged on access."""
    store, clock = await make(ttl_seconds=60)
    created = await create(store)
    store.shutdown()
    clock.advance(seconds)
    result = store.read(created.rendezvous_id)
    if seconds < 60:
        assert await within(result) == created
    else:
        assert isinstance(await failure_of(result), NotFound)


# Two nodes sharing the state (two RedisStores on one Redis; in memory one
# store stands for both, a process being one node).


@on_reactor
async def test_global_cap_holds_across_nodes(make: Stores) -> None:
    """The global cap counts the rendezvous created on every node."""
    a, b, clock = await make.nodes(max_rendezvous=2, max_rendezvous_per_address=2, ttl_seconds=60)
    await create(a, owner="10.0.0.1")
    clock.advance(10)
    await create(b, owner="10.0.0.2")
    for node in (a, b):
        error = await failure_of(node.create(b"x", TYPE, "10.0.0.3"))
        assert isinstance(error, Full)
        assert error.retry_after_seconds == 50


@on_reactor
async def test_per_address_cap_holds_across_nodes(make: Stores) -> None:
    """The per-address cap counts an address' rendezvous on every node; others still create."""
    a, b, clock = await make.nodes(max_rendezvous_per_address=2, ttl_seconds=60)
    await create(a, owner="a")
    clock.advance(20)
    await create(b, owner="a")
    for node in (a, b):
        error = await failure_of(node.create(b"x", TYPE, "a"))
        assert isinstance(error, Full)
        assert error.retry_after_seconds == 40
    await create(b, owner="b")
    clock.advance(40)
    await create(a, owner="a")


@on_reactor
async def test_write_on_one_node_wakes_a_reader_parked_on_another(make: Stores) -> None:
    """A reader parked on node B is answered by a write on node A, with that write."""
    a, b, _ = await make.nodes()
    created = await create(a)
    d = park(b, created)
    await parked(b, 1)
    written = await a.write(created.rendezvous_id, b"from A", TYPE, ANY)
    assert await within(d) == Wakeup(written, changed=True)
    assert b.parked_count == 0


@on_reactor
async def test_write_on_one_node_as_a_reader_begins_on_another_is_not_missed(
    make: Stores,
) -> None:
    """A write on node A sent while node B's reader is still starting its wait answers it."""
    a, b, _ = await make.nodes()
    created = await create(a)
    d = park(b, created)
    written = await a.write(created.rendezvous_id, b"from A", TYPE, ANY)
    assert await within(d) == Wakeup(written, changed=True)
    assert b.parked_count == 0


@on_reactor
async def test_delete_on_one_node_answers_a_reader_parked_on_another(make: Stores) -> None:
    """A reader parked on node B is answered NotFound when node A deletes the rendezvous."""
    a, b, _ = await make.nodes()
    created = await create(a)
    d = park(b, created)
    await parked(b, 1)
    await a.delete(created.rendezvous_id)
    assert isinstance(await failure_of(d), NotFound)
    assert b.parked_count == 0


@on_reactor
async def test_expiry_answers_readers_parked_on_every_node(make: Stores) -> None:
    """At its expiry, a rendezvous created on node A answers readers parked on A and B NotFound."""
    a, b, clock = await make.nodes(ttl_seconds=60)
    created = await create(a)
    waits = [park(node, created, timeout=90) for node in (a, b)]
    # In memory both readers are parked on the one store.
    for node in (a, b):
        await parked(node, 2 if a is b else 1)
    clock.advance(59.9)
    assert not any(answered(d) for d in waits)
    clock.advance(0.1)
    for d in waits:
        assert isinstance(await failure_of(d), NotFound)


@on_reactor
async def test_racing_writers_on_two_nodes_have_one_winner(make: Stores) -> None:
    """Of two writes on two nodes conditioned on the same ETag, exactly one succeeds."""
    a, b, _ = await make.nodes()
    created = await create(a)
    condition = etag_is(created.etag)
    # Both are sent before either is answered.
    writes = [
        node.write(created.rendezvous_id, body, TYPE, condition)
        for node, body in ((a, b"A"), (b, b"B"))
    ]
    outcomes: list[Version | Exception] = []
    for d in writes:
        result = await outcome(d)
        outcomes.append(result)
    [winner] = [o for o in outcomes if isinstance(o, Version)]
    [loser] = [o for o in outcomes if not isinstance(o, Version)]
    assert isinstance(loser, PreconditionFailed)
    assert loser.current == winner
    for node in (a, b):
        assert await node.read(created.rendezvous_id) == winner


# What differs between the stores: MemoryStore keeps one timer per
# rendezvous for its expiry; RedisStore leaves expiry to Redis and to its
# judgement on access, and keeps timers only for parked readers.


def reader_timers(make: Stores, clock: Clock, *rendezvous: Version) -> list[float]:
    """
    When the timers on C{clock} are due, MemoryStore's expiry timer of each
    of C{rendezvous} aside (failing if one is missing).
    """
    times = sorted(call.getTime() for call in clock.getDelayedCalls())
    if make.kind == "memory":
        for version in rendezvous:
            times.remove(version.expires)
    return times


# MemoryStore's internals.


def memory_store(**config: Any) -> tuple[MemoryStore, Clock]:
    clock = Clock()
    clock.advance(EPOCH)
    return MemoryStore(Config(**config), clock), clock


def test_memory_store_provides_the_interface() -> None:
    """MemoryStore implements every operation of the RendezvousStore protocol."""
    store: RendezvousStore = memory_store()[0]
    assert callable(store.wait_for_change)


@on_reactor
async def test_expired_rendezvous_is_not_found_and_reclaimed() -> None:
    """At its expiry a rendezvous is gone, and its memory is reclaimed by the timer."""
    store, clock = memory_store(ttl_seconds=60)
    rendezvous_id = (await create(store)).rendezvous_id
    clock.advance(59.9)
    assert (await store.read(rendezvous_id)).body == b"hello"
    clock.advance(0.1)
    assert store.rendezvous_count == 0
    assert not clock.getDelayedCalls()
    assert isinstance(await failure_of(store.read(rendezvous_id)), NotFound)


@on_reactor
async def test_memory_store_counts_what_it_holds() -> None:
    """
    MemoryStore's rendezvous_count drops at once on a delete and on an
    expiry found on access.  (RedisStore's is the count its last create saw.)
    """
    store, clock = memory_store(ttl_seconds=60)
    deleted, expired = await create(store), await create(store)
    await store.delete(deleted.rendezvous_id)
    assert store.rendezvous_count == 1
    # Move time without running timers, as a busy reactor might.
    clock.rightNow += 61
    assert isinstance(await failure_of(store.read(expired.rendezvous_id)), NotFound)
    assert store.rendezvous_count == 0


# What only Redis holds.


def keys(redis_server: RedisServer) -> list[bytes]:
    """
    Every key in the test's Redis database.
    """
    found: list[bytes] = redis_server.command("KEYS", "*")
    return sorted(found)


async def exercise(store: Store) -> None:
    """
    Every kind of operation once: creates (one refused), a write, a parked
    reader woken, a timed-out one, a delete.
    """
    first = await create(store, owner="a")
    second = await create(store, owner="a")
    await failure_of(store.create(b"x", TYPE, "a"))
    third = await create(store, owner="b")
    await store.write(first.rendezvous_id, b"b", TYPE, ANY)
    woken = park(store, second)
    await parked(store, 1)
    await store.write(second.rendezvous_id, b"c", TYPE, ANY)
    await within(woken)
    assert await within(park(store, third, timeout=0)) == Wakeup(third, changed=False)
    await store.delete(first.rendezvous_id)


@redis_only
@on_reactor
async def test_redis_key_expiry_is_a_px_set_at_creation(
    make: Stores, redis_server: RedisServer
) -> None:
    """A rendezvous' key carries a PX of its TTL from creation, which a write never sets again."""
    store, clock = await make(ttl_seconds=60)
    created = await create(store)
    [key] = [key for key in keys(redis_server) if created.rendezvous_id.encode() in key]
    assert 59_000 < redis_server.command("PTTL", key) <= 60_000
    # As if 30 s had passed in Redis, whose clock is not the test's.
    assert redis_server.command("PEXPIRE", key, 30_000) == 1
    clock.advance(10)
    await store.write(created.rendezvous_id, b"later", TYPE, ANY)
    assert 0 < redis_server.command("PTTL", key) <= 30_000


@redis_only
@on_reactor
async def test_redis_expiry_of_the_key_is_expiry_of_the_rendezvous(
    make: Stores, redis_server: RedisServer
) -> None:
    """Once Redis has expired a rendezvous' key it is NotFound, whatever the store's clock says."""
    store, _ = await make(ttl_seconds=60)
    created = await create(store)
    d = park(store, created)
    await parked(store, 1)
    for key in keys(redis_server):
        if created.rendezvous_id.encode() in key:
            # A PX in the past: Redis drops the key at once, as its expiry would.
            redis_server.command("PEXPIRE", key, 0)
    assert isinstance(await failure_of(store.read(created.rendezvous_id)), NotFound)
    assert isinstance(
        await failure_of(store.write(created.rendezvous_id, b"", TYPE, ANY)), NotFound
    )
    d.cancel()


@redis_only
@on_reactor
async def test_redis_holds_nothing_without_an_expiry(
    make: Stores, redis_server: RedisServer
) -> None:
    """Every key the store leaves in Redis expires by itself, whatever the operations were."""
    store, _ = await make(max_rendezvous_per_address=2, ttl_seconds=60)
    await exercise(store)
    held = keys(redis_server)
    assert held
    for key in held:
        assert 0 < redis_server.command("PTTL", key) <= 60_000, key


PREFIXES = [b"rendezvous:", b"other-app:"]


@redis_only
@on_reactor
async def test_redis_keys_are_under_the_prefix(make: Stores, redis_server: RedisServer) -> None:
    """Every key and channel the store uses is under its prefix: rendezvous: or the URL's."""
    default, _ = await make(max_rendezvous_per_address=2)
    await exercise(default)
    held = keys(redis_server)
    assert held and all(key.startswith(b"rendezvous:") for key in held), held
    redis_server.flushall()
    custom, _ = await make(prefix="other-app:", max_rendezvous_per_address=2)
    await exercise(custom)
    held = keys(redis_server)
    assert held and all(key.startswith(b"other-app:") for key in held), held
    # The channels too: one per store, each under its store's prefix.
    channels: list[bytes] = redis_server.command("PUBSUB", "CHANNELS")
    under = [next((p for p in PREFIXES if c.startswith(p)), c) for c in channels]
    assert sorted(under) == sorted(PREFIXES), channels


@redis_only
@on_reactor
async def test_redis_one_subscription_per_store(make: Stores, redis_server: RedisServer) -> None:
    """Each store holds one subscription, however many readers it has parked."""
    a, b, _ = await make.nodes()
    created = await create(a)
    for node in (a, b):
        for _ in range(3):
            park(node, created)
        await parked(node, 3)
    [channel] = redis_server.command("PUBSUB", "CHANNELS")
    assert redis_server.command("PUBSUB", "NUMSUB", channel) == [channel, 2]
    assert redis_server.command("PUBSUB", "NUMPAT") == 0


@redis_only
@on_reactor
async def test_redis_close_leaves_no_connection(make: Stores, redis_server: RedisServer) -> None:
    """A store closed as soon as it is ready leaves no connection to Redis open."""
    store, _ = await make()
    await within(cast(RedisStore, store).close())

    def clients() -> int:
        # Our own CLIENT LIST connection is one.
        listed: bytes = redis_server.command("CLIENT", "LIST")
        return len(listed.splitlines()) - 1

    await until(lambda: clients() == 0, "every connection closed")


@redis_only
@on_reactor
async def test_redis_stores_on_two_prefixes_do_not_meet(make: Stores) -> None:
    """Stores on one Redis under two prefixes share neither rendezvous nor caps."""
    one, clock = await make(prefix="one:", max_rendezvous=1, max_rendezvous_per_address=1)
    other, _ = await make(clock, prefix="two:", max_rendezvous=1, max_rendezvous_per_address=1)
    created = await create(one)
    assert isinstance(await failure_of(other.read(created.rendezvous_id)), NotFound)
    assert (await create(other)).rendezvous_id != created.rendezvous_id
