"""
The store's parts for MSC4388: rendezvous with a lifetime of their own, and
writes recorded by transaction (L{RendezvousStore.send}).

Each test runs against both stores, through test_store.py's harness:
L{MemoryStore}, and C{RedisStore} on a real redis-server (two of them on
one Redis where a test needs two nodes).  What only Redis holds is tested
at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from rendezvous_twisted.core.conditions import ANY
from rendezvous_twisted.core.store import (
    Full,
    NotFound,
    Sent,
    TooLarge,
    TooManyTransactions,
    Version,
    Wakeup,
)

from . import test_store as harness
from .conftest import answered, on_reactor
from .test_store import (
    OWNER,
    TYPE,
    UNKNOWN,
    Store,
    Stores,
    etag_is,
    failure_of,
    keys,
    outcome,
    park,
    parked,
    redis_only,
    within,
)

if TYPE_CHECKING:
    from .redis_server import RedisServer

# The harness' fixtures: which store, and the maker of stores.
kind = harness.kind
make = harness.make

#: A transaction id as long as MSC4388 lets one be.
LONGEST = "T" * 255


async def create(store: Store, ttl: float | None = None, owner: str = OWNER) -> Version:
    return await within(store.create(b"hello", TYPE, owner, ttl))


def sending(
    store: Store,
    created: Version,
    transaction: str,
    body: bytes = b"sent",
    etag: bytes | None = None,
) -> Deferred[Sent]:
    """
    Send C{body} to C{created}'s rendezvous under C{transaction}, on the
    condition of C{etag} (any ETag when None).
    """
    condition = ANY if etag is None else etag_is(etag)
    return store.send(created.rendezvous_id, body, TYPE, condition, transaction)


async def send(
    store: Store,
    created: Version,
    transaction: str,
    body: bytes = b"sent",
    etag: bytes | None = None,
) -> Sent:
    """
    What L{sending} answers.
    """
    return await within(sending(store, created, transaction, body, etag))


# Lifetimes of their own.


@on_reactor
async def test_a_rendezvous_with_its_own_lifetime_expires_at_its_own_time(make: Stores) -> None:
    """A rendezvous created with a lifetime expires then; one created without, at the config's."""
    store, clock = await make(ttl_seconds=60)
    own, default = await create(store, ttl=120), await create(store)
    assert (own.expires, default.expires) == (clock.seconds() + 120, clock.seconds() + 60)
    assert await store.read(own.rendezvous_id) == own
    clock.advance(60)
    assert isinstance(await failure_of(store.read(default.rendezvous_id)), NotFound)
    clock.advance(59.9)
    assert (await store.read(own.rendezvous_id)).body == b"hello"
    clock.advance(0.1)
    assert isinstance(await failure_of(store.read(own.rendezvous_id)), NotFound)


@on_reactor
async def test_a_short_lifetime_among_long_ones_expires_alone_and_frees_its_place(
    make: Stores,
) -> None:
    """
    A short-lived rendezvous created after long-lived ones expires first,
    answers its readers then, and frees its place under the caps.
    """
    store, clock = await make(max_rendezvous=3, max_rendezvous_per_address=3, ttl_seconds=300)
    long = [await create(store), await create(store)]
    short = await create(store, ttl=10)
    waiting = park(store, short, timeout=30)
    await parked(store, 1)
    assert isinstance(await failure_of(store.create(b"x", TYPE, OWNER)), Full)
    clock.advance(9.9)
    assert not answered(waiting)
    clock.advance(0.1)
    assert isinstance(await failure_of(waiting), NotFound)
    assert isinstance(await failure_of(store.read(short.rendezvous_id)), NotFound)
    for version in long:
        assert await store.read(version.rendezvous_id) == version
    await create(store)


@on_reactor
async def test_an_expired_short_lifetime_frees_its_place_before_its_timer_runs(
    make: Stores,
) -> None:
    """A short-lived rendezvous past its expiry holds no place, even behind a long-lived one."""
    store, clock = await make(max_rendezvous=2, max_rendezvous_per_address=2, ttl_seconds=300)
    long = await create(store, owner="a")
    await create(store, ttl=10, owner="b")
    # Move time without running timers, as a busy reactor might.
    clock.rightNow += 10
    await create(store, owner="c")
    assert await store.read(long.rendezvous_id) == long


@on_reactor
async def test_retry_after_when_full_is_the_soonest_expiry_whatever_the_lifetimes(
    make: Stores,
) -> None:
    """
    With lifetimes mixed, a full store's and a full address' Retry-After
    is when the soonest to expire does, not the oldest.
    """
    store, clock = await make(max_rendezvous=3, max_rendezvous_per_address=2, ttl_seconds=60)
    await create(store, ttl=300, owner="a")  # expires at 300
    clock.advance(10)
    await create(store, ttl=30, owner="a")  # expires at 40
    await create(store, owner="b")  # expires at 70
    for owner, why in (("a", "address"), ("c", "server")):
        error = await failure_of(store.create(b"x", TYPE, owner))
        assert isinstance(error, Full), why
        assert error.retry_after_seconds == 30, why
    clock.advance(30)
    await create(store, owner="a")


# Sends.


@on_reactor
async def test_a_send_writes_and_wakes_a_reader_parked_on_another_node(make: Stores) -> None:
    """
    A send whose condition holds writes a new payload with a new ETag,
    keeps the expiry, and wakes the readers parked on it, on any node.
    """
    a, b, clock = await make.nodes()
    created = await create(a)
    waiting = park(b, created)
    await parked(b, 1)
    clock.advance(5)
    sent = await send(a, created, "txn1", b"payload", created.etag)
    assert sent.etag is not None and sent.etag != created.etag
    assert not sent.replayed
    expected = Version(
        created.rendezvous_id, b"payload", TYPE, sent.etag, clock.seconds(), created.expires
    )
    assert await within(waiting) == Wakeup(expected, changed=True)
    for node in (a, b):
        assert await node.read(created.rendezvous_id) == expected


@on_reactor
async def test_a_repeated_transaction_is_replayed_and_writes_nothing(make: Stores) -> None:
    """
    A transaction sent again answers the ETag it wrote, replayed, and
    writes nothing, even once another write has replaced its payload.
    """
    a, b, _ = await make.nodes()
    created = await create(a)
    first = await send(a, created, LONGEST, b"first", created.etag)
    assert first.etag is not None
    assert await send(b, created, LONGEST, b"again", first.etag) == Sent(first.etag, True)
    assert (await a.read(created.rendezvous_id)).body == b"first"
    later = await a.write(created.rendezvous_id, b"later", TYPE, ANY)
    assert await send(a, created, LONGEST, b"again") == Sent(first.etag, True)
    assert await b.read(created.rendezvous_id) == later


@on_reactor
async def test_a_replay_wakes_nobody(make: Stores) -> None:
    """A replayed transaction wakes no parked reader: it changed nothing."""
    store, clock = await make(poll_timeout_seconds=30)
    created = await create(store)
    sent = await send(store, created, "txn1")
    current = await store.read(created.rendezvous_id)
    waiting = park(store, current, timeout=20)
    await parked(store, 1)
    assert (await send(store, created, "txn1", b"other")).replayed
    # Anything the replay set off here has been answered by now.
    await outcome(store.read(UNKNOWN))
    assert not answered(waiting)
    clock.advance(20)
    assert await within(waiting) == Wakeup(current, changed=False)
    assert current.etag == sent.etag


@on_reactor
async def test_a_conflict_is_recorded_and_replayed_even_once_the_condition_holds(
    make: Stores,
) -> None:
    """
    A send whose condition matches nothing current is a conflict, not a
    failure, and is recorded: sent again, with a condition that now holds
    or none, it is still a conflict and writes nothing.
    """
    store, _ = await make()
    created = await create(store)
    written = await store.write(created.rendezvous_id, b"written", TYPE, ANY)
    assert await send(store, created, "txn1", b"stale", created.etag) == Sent(None)
    assert await send(store, created, "txn1", b"now", written.etag) == Sent(None, True)
    assert await send(store, created, "txn1", b"any") == Sent(None, True)
    assert await store.read(created.rendezvous_id) == written
    # Another transaction on the condition that holds writes.
    assert (await send(store, created, "txn2", b"now", written.etag)).etag is not None


@on_reactor
async def test_a_sends_condition_is_compared_strongly(make: Stores) -> None:
    """A weak ETag in a send's condition matches nothing: a conflict."""
    store, _ = await make()
    created = await create(store)
    assert await send(store, created, "txn1", etag=b"W/" + created.etag) == Sent(None)
    assert await store.read(created.rendezvous_id) == created


@on_reactor
async def test_past_the_cap_a_new_transaction_is_refused_and_a_repeat_replayed(
    make: Stores,
) -> None:
    """
    A rendezvous records at most max_transactions_per_rendezvous
    transactions, conflicts included: a new one past that is refused with
    TooManyTransactions and recorded nowhere, while a repeat of a recorded
    one is still replayed.  Another rendezvous has its own count.
    """
    store, _ = await make(max_transactions_per_rendezvous=2)
    created = await create(store)
    first = await send(store, created, "txn1")
    assert await send(store, created, "txn2", etag=created.etag) == Sent(None)
    current = await store.read(created.rendezvous_id)
    for _ in range(2):
        refused = await failure_of(sending(store, created, "txn3", etag=current.etag))
        assert isinstance(refused, TooManyTransactions)
    assert await store.read(created.rendezvous_id) == current
    assert await send(store, created, "txn1") == Sent(first.etag, True)
    assert await send(store, created, "txn2") == Sent(None, True)
    other = await create(store)
    assert (await send(store, other, "txn3")).etag is not None


@on_reactor
async def test_too_large_records_nothing_and_the_transaction_may_then_succeed(
    make: Stores,
) -> None:
    """
    An oversize send is refused with TooLarge and records nothing: neither
    the transaction nor a place under the cap.
    """
    store, _ = await make(max_bytes=5, max_transactions_per_rendezvous=1)
    created = await create(store)
    assert isinstance(await failure_of(sending(store, created, "txn1", b"123456")), TooLarge)
    assert await store.read(created.rendezvous_id) == created
    sent = await send(store, created, "txn1", b"12345")
    assert sent.etag is not None and not sent.replayed
    assert (await store.read(created.rendezvous_id)).body == b"12345"


@on_reactor
async def test_an_oversize_send_whose_condition_fails_is_a_recorded_conflict(
    make: Stores,
) -> None:
    """The condition is judged before the size: an oversize stale send is a recorded conflict."""
    store, _ = await make(max_bytes=5)
    created = await create(store)
    await store.write(created.rendezvous_id, b"new", TYPE, ANY)
    assert await send(store, created, "txn1", b"123456", created.etag) == Sent(None)
    assert await send(store, created, "txn1", b"12345") == Sent(None, True)


@on_reactor
async def test_a_send_to_no_rendezvous_is_not_found_and_records_nothing(make: Stores) -> None:
    """
    A send to an id never created, deleted, or expired (its timer run or
    not) fails with NotFound; its transactions went with it.
    """
    store, clock = await make(ttl_seconds=60)
    unknown = Version(UNKNOWN, b"", TYPE, b'"x"', 0.0, 0.0)
    assert isinstance(await failure_of(sending(store, unknown, "txn1")), NotFound)
    deleted, expired = await create(store), await create(store)
    for version in (deleted, expired):
        await send(store, version, "txn1")
    await store.delete(deleted.rendezvous_id)
    clock.rightNow += 60
    for version in (deleted, expired):
        assert isinstance(await failure_of(sending(store, version, "txn1")), NotFound)
    if make.kind == "memory":
        assert store.rendezvous_count == 0


@on_reactor
async def test_a_transaction_sent_on_two_nodes_at_once_is_evaluated_once(make: Stores) -> None:
    """
    The same transaction sent on two nodes before either is answered is
    evaluated once: one writes, the other replays what it wrote.  Two
    transactions on the same condition: one writes, the other conflicts.
    """
    a, b, _ = await make.nodes()
    created = await create(a)
    racing = [
        node.send(created.rendezvous_id, body, TYPE, etag_is(created.etag), "same")
        for node, body in ((a, b"A"), (b, b"B"))
    ]
    outcomes = [await within(d) for d in racing]
    [fresh] = [sent for sent in outcomes if not sent.replayed]
    assert fresh.etag is not None
    assert sorted(outcomes, key=lambda sent: sent.replayed) == [fresh, Sent(fresh.etag, True)]
    current = await a.read(created.rendezvous_id)
    assert current.etag == fresh.etag
    assert current.body == (b"A" if outcomes[0] is fresh else b"B")
    racing = [
        node.send(created.rendezvous_id, b"C", TYPE, etag_is(current.etag), transaction)
        for node, transaction in ((a, "one"), (b, "two"))
    ]
    outcomes = [await within(d) for d in racing]
    assert sorted(sent.etag is None for sent in outcomes) == [False, True]
    assert not any(sent.replayed for sent in outcomes)


# What only Redis holds.


def published(redis_server: RedisServer) -> int:
    """
    How many PUBLISH Redis ran, scripts' included.
    """
    stats: bytes = redis_server.command("INFO", "commandstats")
    for line in stats.decode().splitlines():
        if line.startswith("cmdstat_publish:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@redis_only
@on_reactor
async def test_redis_a_send_publishes_once_and_a_refusal_or_replay_never(
    make: Stores, redis_server: RedisServer
) -> None:
    """A send that writes publishes its change once; a replay, conflict or refusal, nothing."""
    store, _ = await make(max_bytes=5, max_transactions_per_rendezvous=2)
    created = await create(store)
    before = published(redis_server)
    await send(store, created, "txn1", b"1")
    assert published(redis_server) == before + 1
    assert (await send(store, created, "txn1", b"2")).replayed
    assert await send(store, created, "txn2", b"3", created.etag) == Sent(None)
    assert isinstance(await failure_of(sending(store, created, "txn3", b"4")), TooManyTransactions)
    other = await create(store)
    assert isinstance(await failure_of(sending(store, other, "txn", b"123456")), TooLarge)
    assert published(redis_server) == before + 1


@redis_only
@on_reactor
async def test_redis_transactions_live_in_the_rendezvous_key_and_go_with_it(
    make: Stores, redis_server: RedisServer
) -> None:
    """
    Transactions are fields of their rendezvous' own key, which keeps its
    PX from creation: they need no key of their own, and its expiry or its
    delete takes them along.
    """
    store, _ = await make(ttl_seconds=60, max_rendezvous_per_address=2)
    created = await create(store)
    other = await create(store, ttl=30)
    before = keys(redis_server)
    for n in range(3):
        await send(store, created, f"txn{n}", etag=b'"stale"')
        await send(store, other, f"txn{n}")
    assert keys(redis_server) == before
    key, other_key = (
        next(k for k in before if version.rendezvous_id.encode() in k)
        for version in (created, other)
    )
    assert 59_000 < redis_server.command("PTTL", key) <= 60_000
    assert 29_000 < redis_server.command("PTTL", other_key) <= 30_000
    fields: list[bytes] = redis_server.command("HKEYS", key)
    assert sorted(f for f in fields if f.startswith(b"t:")) == [b"t:txn0", b"t:txn1", b"t:txn2"]
    await store.delete(created.rendezvous_id)
    assert redis_server.command("EXISTS", key) == 0
    redis_server.command("PEXPIRE", other_key, 0)
    assert redis_server.command("EXISTS", other_key) == 0
    assert isinstance(await failure_of(sending(store, other, "txn0")), NotFound)
    assert not any(
        version.rendezvous_id.encode() in k
        for k in keys(redis_server)
        for version in (created, other)
    )
