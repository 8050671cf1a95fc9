"""
A model-based test of the store: hypothesis drives a MemoryStore on a
task.Clock through random creates (some with lifetimes of their own),
reads, writes, sends by transaction, deletes, parked readers,
cancellations, clock moves and a shutdown, and after every step checks it
against a small pure-Python model of what SPEC.md promises.

The limits are tiny so that every cap is hit often.  Every time in the run
(the epoch, lifetimes, poll timeout, waits and clock moves) is a multiple of 1/8 s,
so all the arithmetic is exact and no tie is decided by a rounding error.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from rendezvous_twisted.core import conditions
from rendezvous_twisted.core.conditions import ANY, Condition
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.core.store import (
    Full,
    NotFound,
    PreconditionFailed,
    Sent,
    TooLarge,
    TooManyTransactions,
    Version,
    Wakeup,
)

from .conftest import EPOCH

TTL = 10.0
POLL = 4.0
MAX_RENDEZVOUS = 4
PER_ADDRESS = 2
MAX_PARKED = 5
PER_RENDEZVOUS = 2
MAX_BYTES = 8
MAX_TRANSACTIONS = 3
#: Lifetimes a create may ask for besides the config's (None): shorter and
#: longer, so that creation order is not expiry order.
LIFETIMES = (None, 2.5, 17.5)
LONGEST_TTL = 17.5

CONFIG = Config(
    ttl_seconds=TTL,
    poll_timeout_seconds=POLL,
    max_rendezvous=MAX_RENDEZVOUS,
    max_rendezvous_per_address=PER_ADDRESS,
    max_parked=MAX_PARKED,
    max_parked_per_rendezvous=PER_RENDEZVOUS,
    max_bytes=MAX_BYTES,
    max_transactions_per_rendezvous=MAX_TRANSACTIONS,
)

OWNERS = ("192.0.2.1", "192.0.2.2", "2001:db8::7")
TYPES = (b"application/octet-stream", b"text/plain", b"text/plain; charset=utf-8")
#: An id no store ever minted (ids are 22 URL-safe characters).
UNKNOWN_ID = "nosuchrendezvous000000"
#: Every time in the run is a multiple of this.
TICK = 1 / 8
#: How long before an event the clock stops to see that nothing came early.
EPSILON = 1 / 64

#: Transaction ids of sends: more than a rendezvous may record.
TRANSACTIONS = st.sampled_from(["a", "b", "c", "d", "T" * 255])
#: Which rendezvous a rule acts on (see L{StoreModel.pick}).
WHICH = st.integers(min_value=0, max_value=9)
#: Payloads, about one in five over the limit.
BODIES = st.binary(max_size=MAX_BYTES + 3)
CONTENT_TYPES = st.sampled_from(TYPES)
#: If-Match as the web layer would pass it; the model says which ones hold.
IF_MATCH = st.sampled_from(["absent", "current", "star", "list", "stale", "garbage", "weak"])
IF_MATCH_HOLDS = {"absent", "current", "star", "list"}
#: If-None-Match on a GET that waits; the model says which ones park.
IF_NONE_MATCH = st.sampled_from(["current", "weak", "star", "list", "stale", "garbage"])
IF_NONE_MATCH_HOLDS = {"current", "weak", "star", "list"}
#: Prefer: wait=N (None when absent), which the web layer caps at the poll
#: timeout; "expiry" waits exactly as long as the rendezvous has left and
#: "before expiry" a tick less, to probe the tie between timeout and expiry.
WAITS = st.sampled_from([None, 0.0, 0.125, 1.0, 2.5, 3.875, 6.0, "expiry", "before expiry"])
#: Clock moves: none, tiny, across poll timeouts, across expiries.
ADVANCES = st.one_of(
    st.sampled_from([0.0, 0.125, 0.5, 3.875, 4.0, 4.125, 9.875, 10.0, 10.125, 14.0]),
    st.integers(min_value=0, max_value=40).map(lambda n: n * TICK),
)

#: What a reader's Deferred ended with: the Wakeup, or the error's type.
Outcome = Wakeup | type[BaseException]


def result_of(d: Deferred[Any]) -> Any:
    """
    What a Deferred that must already have fired holds: its result, or the
    exception it failed with (consumed, so nothing is logged as unhandled).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the store left a Deferred unanswered that had to answer at once"
    result = results[0]
    if isinstance(result, Failure):
        return result.value
    return result


def retry_after(seconds: float) -> int:
    """
    The Retry-After the model expects for room that frees up in C{seconds}.
    """
    return max(1, math.ceil(seconds))


@dataclass
class Rendezvous:
    """
    A live rendezvous in the model: who created it and what it holds.
    """

    owner: str
    version: Version
    #: What each transaction sent to it answered: its ETag, or None for a
    #: conflict.
    transactions: dict[str, bytes | None] = field(default_factory=dict)


@dataclass
class Reader:
    """
    A reader the store parked, and what the model says became of it.
    """

    deferred: Deferred[Wakeup]
    rendezvous_id: str
    #: The version it waits on: what a timeout or shutdown answers.
    version: Version
    #: When it is answered, at the latest: its timeout or the expiry.
    deadline: float
    #: Whether its timeout comes strictly before the expiry (else 404).
    times_out: bool
    clock: Clock
    #: What the store answered, and when; at most one entry, ever.
    results: list[tuple[float, Outcome]] = field(default_factory=list)
    #: What the model says it should have been answered, and when.
    expected: tuple[float, Outcome] | None = None

    def __post_init__(self) -> None:
        self.deferred.addBoth(self.note)

    def note(self, result: Wakeup | Failure) -> None:
        if isinstance(result, Failure):
            error = result.value
            assert error is not None
            self.results.append((self.clock.seconds(), type(error)))
        else:
            self.results.append((self.clock.seconds(), result))

    @property
    def parked(self) -> bool:
        return self.expected is None

    def answer(self, when: float, outcome: Outcome) -> None:
        assert self.expected is None
        self.expected = (when, outcome)


class StoreModel(RuleBasedStateMachine):
    """
    A MemoryStore and the model of it, driven in lockstep.

    Where SPEC.md leaves a choice open the model accepts either answer: an
    oversize write with a failing If-Match may get 412 or 413, an oversize
    create at a cap 413 or 429, a reader over both parked caps either cap's
    Retry-After.  One tie it decides: a wait whose timeout falls exactly on
    the expiry gets 404, as the rendezvous is gone at that instant (a read
    then is 404 too).
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.store = MemoryStore(CONFIG, self.clock)
        self.now = EPOCH
        #: Live rendezvous in creation order (not expiry order: lifetimes
        #: differ).
        self.live: dict[str, Rendezvous] = {}
        #: Every id the store ever minted, in creation order.
        self.created: list[str] = []
        #: Every ETag each rendezvous ever had, oldest first.
        self.history: dict[str, list[bytes]] = {}
        #: Every ETag the store ever minted, in order.
        self.minted: list[bytes] = []
        self.deleted: set[str] = set()
        self.readers: list[Reader] = []
        self.stopped = False
        #: The ids live at shutdown: their expiry timers are gone, so once
        #: expired they may linger, uncounted as live, until touched.
        self.at_shutdown: set[str] = set()
        self.steps = 0

    # Helpers.

    def pick(self, which: int) -> str:
        """
        The rendezvous a rule acts on: mostly a live one (those with parked
        readers first, then newest first: what a failing run shrinks to),
        sometimes a dead or unknown one.
        """
        waited_on = {r.rendezvous_id for r in self.parked()}
        live = sorted(reversed(self.live), key=lambda i: i not in waited_on)
        dead = [i for i in reversed(self.created) if i not in self.live]
        if which < 7 and live:
            return live[which % len(live)]
        if which < 9 and dead:
            return dead[which % len(dead)]
        return UNKNOWN_ID

    def etags_for(self, rendezvous_id: str) -> tuple[bytes, bytes]:
        """
        The current ETag of a rendezvous (its last, if dead) and a stale one:
        its previous ETag, else another rendezvous' ETag, else one never minted.
        """
        history = self.history.get(rendezvous_id, [b'"never-minted-current"'])
        current = history[-1]
        if len(history) > 1:
            stale = history[-2]
        else:
            others = [etag for etag in self.minted if etag != current]
            stale = others[-1] if others else b'"never-minted-stale"'
        return current, stale

    def header(self, kind: str, rendezvous_id: str, *, if_none_match: bool) -> Condition:
        """
        The condition the web layer would pass for a header of this kind.
        A list names a stale tag and the current one: in If-Match as one
        field, strong; in If-None-Match as two field lines, the current weak.
        """
        current, stale = self.etags_for(rendezvous_id)
        listed = [stale, b"W/" + current] if if_none_match else [stale + b" , " + current]
        values = {
            "absent": None,
            "current": [current],
            "star": [b"*"],
            "list": listed,
            "stale": [stale],
            "garbage": [b"not-an-etag"],
            "weak": [b"W/" + current],
        }[kind]
        condition = conditions.parse(values)
        return ANY if condition is None else condition

    def mint(self, version: Version) -> None:
        etag = version.etag
        assert etag not in self.minted, f"ETag {etag!r} was minted twice"
        assert etag.startswith(b'"') and etag.endswith(b'"') and len(etag) > 2
        self.minted.append(etag)
        self.history.setdefault(version.rendezvous_id, []).append(etag)

    def parked_on(self, rendezvous_id: str) -> list[Reader]:
        return [r for r in self.readers if r.parked and r.rendezvous_id == rendezvous_id]

    def parked(self) -> list[Reader]:
        return [r for r in self.readers if r.parked]

    def forget(self, rendezvous_id: str) -> None:
        """
        The model's delete and expiry: readers parked there get 404 now.
        """
        del self.live[rendezvous_id]
        for reader in self.parked_on(rendezvous_id):
            reader.answer(self.now, NotFound)

    def move_clock_to(self, when: float) -> None:
        """
        Move the store's clock (running its timers) and the model's to C{when}.
        """
        self.clock.advance(when - self.clock.seconds())
        self.now = when
        for reader in self.parked():
            if reader.deadline <= when and reader.times_out:
                reader.answer(reader.deadline, Wakeup(reader.version, changed=False))
        for rendezvous_id, rendezvous in list(self.live.items()):
            if rendezvous.version.expires <= when:
                # The readers it still has were parked past the expiry.
                for reader in self.parked_on(rendezvous_id):
                    assert reader.deadline == rendezvous.version.expires
                    reader.answer(reader.deadline, NotFound)
                del self.live[rendezvous_id]
        self.check()

    # Rules.

    @rule(
        owner=st.sampled_from(OWNERS),
        body=BODIES,
        content_type=CONTENT_TYPES,
        lifetime=st.sampled_from(LIFETIMES),
    )
    def create(self, owner: str, body: bytes, content_type: bytes, lifetime: float | None) -> None:
        result = result_of(self.store.create(body, content_type, owner, lifetime))
        ttl = TTL if lifetime is None else lifetime
        too_large = len(body) > MAX_BYTES
        # Retry-After: when the soonest to expire of those holding the place does.
        retries: set[int] = set()
        mine = [r.version.expires for r in self.live.values() if r.owner == owner]
        if len(mine) >= PER_ADDRESS:
            retries.add(retry_after(min(mine) - self.now))
        if len(self.live) >= MAX_RENDEZVOUS:
            soonest = min(r.version.expires for r in self.live.values())
            retries.add(retry_after(soonest - self.now))
        if too_large or retries:
            assert isinstance(result, TooLarge | Full), f"create should be refused: {result!r}"
            if isinstance(result, TooLarge):
                assert too_large
            else:
                assert result.retry_after_seconds in retries, (result, retries)
            event(f"create: {type(result).__name__}")
            return
        assert isinstance(result, Version), f"create should succeed: {result!r}"
        rendezvous_id = result.rendezvous_id
        assert rendezvous_id not in self.created, "an id was minted twice"
        assert result == Version(
            rendezvous_id, body, content_type, result.etag, self.now, self.now + ttl
        )
        self.mint(result)
        self.created.append(rendezvous_id)
        self.live[rendezvous_id] = Rendezvous(owner, result)
        event(f"create: ok, lives {ttl}")

    @precondition(lambda self: bool(self.live))
    @rule(which=WHICH)
    def read(self, which: int) -> None:
        rendezvous_id = self.pick(which)
        result = result_of(self.store.read(rendezvous_id))
        rendezvous = self.live.get(rendezvous_id)
        if rendezvous is None:
            assert isinstance(result, NotFound), f"read should be 404: {result!r}"
        else:
            assert result == rendezvous.version

    @precondition(lambda self: bool(self.live))
    @rule(which=WHICH, body=BODIES, content_type=CONTENT_TYPES, if_match=IF_MATCH)
    def write(self, which: int, body: bytes, content_type: bytes, if_match: str) -> None:
        rendezvous_id = self.pick(which)
        condition = self.header(if_match, rendezvous_id, if_none_match=False)
        result = result_of(self.store.write(rendezvous_id, body, content_type, condition))
        rendezvous = self.live.get(rendezvous_id)
        if rendezvous is None:
            assert isinstance(result, NotFound), f"write should be 404: {result!r}"
            return
        holds = if_match in IF_MATCH_HOLDS
        too_large = len(body) > MAX_BYTES
        if not holds or too_large:
            # Either refusal will do when both apply; neither changes anything.
            if isinstance(result, PreconditionFailed):
                assert not holds, f"If-Match {if_match} should hold"
                assert result.current == rendezvous.version
            else:
                assert isinstance(result, TooLarge), f"write should be refused: {result!r}"
                assert too_large
            event(f"write: {type(result).__name__}")
            return
        assert isinstance(result, Version), f"write should succeed: {result!r}"
        # The expiry stays what it was at creation.
        assert result == Version(
            rendezvous_id,
            body,
            content_type,
            result.etag,
            self.now,
            rendezvous.version.expires,
        )
        self.mint(result)
        rendezvous.version = result
        woken = self.parked_on(rendezvous_id)
        for reader in woken:
            reader.answer(self.now, Wakeup(result, changed=True))
        event(f"write: ok, woke {len(woken)}")

    @precondition(lambda self: bool(self.live))
    @rule(
        which=WHICH,
        body=BODIES,
        content_type=CONTENT_TYPES,
        if_match=IF_MATCH,
        transaction=TRANSACTIONS,
    )
    def send(
        self, which: int, body: bytes, content_type: bytes, if_match: str, transaction: str
    ) -> None:
        rendezvous_id = self.pick(which)
        condition = self.header(if_match, rendezvous_id, if_none_match=False)
        result = result_of(
            self.store.send(rendezvous_id, body, content_type, condition, transaction)
        )
        rendezvous = self.live.get(rendezvous_id)
        if rendezvous is None:
            assert isinstance(result, NotFound), f"send should be 404: {result!r}"
            return
        recorded = rendezvous.transactions
        # The memory store's order: replay, too many, conflict, too large.
        if transaction in recorded:
            assert result == Sent(recorded[transaction], replayed=True)
            event("send: replayed")
            return
        if len(recorded) >= MAX_TRANSACTIONS:
            assert isinstance(result, TooManyTransactions), f"send should be refused: {result!r}"
            event("send: TooManyTransactions")
            return
        if if_match not in IF_MATCH_HOLDS:
            assert result == Sent(None)
            recorded[transaction] = None
            event("send: conflict")
            return
        if len(body) > MAX_BYTES:
            assert isinstance(result, TooLarge), f"send should be refused: {result!r}"
            event("send: TooLarge")
            return
        assert isinstance(result, Sent) and not result.replayed, f"send should write: {result!r}"
        assert result.etag is not None
        version = Version(
            rendezvous_id, body, content_type, result.etag, self.now, rendezvous.version.expires
        )
        self.mint(version)
        rendezvous.version = version
        recorded[transaction] = result.etag
        woken = self.parked_on(rendezvous_id)
        for reader in woken:
            reader.answer(self.now, Wakeup(version, changed=True))
        event(f"send: ok, woke {len(woken)}")

    @precondition(lambda self: bool(self.live))
    @rule(which=WHICH)
    def delete(self, which: int) -> None:
        rendezvous_id = self.pick(which)
        result = result_of(self.store.delete(rendezvous_id))
        if rendezvous_id not in self.live:
            assert isinstance(result, NotFound), f"delete should be 404: {result!r}"
            return
        assert result is None
        self.deleted.add(rendezvous_id)
        self.forget(rendezvous_id)
        event("delete: ok")

    @precondition(lambda self: bool(self.live))
    @rule(which=WHICH, if_none_match=IF_NONE_MATCH, wait=WAITS)
    def wait(self, which: int, if_none_match: str, wait: float | str | None) -> None:
        rendezvous_id = self.pick(which)
        rendezvous = self.live.get(rendezvous_id)
        if isinstance(wait, str):
            left = POLL if rendezvous is None else rendezvous.version.expires - self.now
            wait = left if wait == "expiry" else left - TICK
        timeout = POLL if wait is None else min(POLL, wait)
        condition = self.header(if_none_match, rendezvous_id, if_none_match=True)
        d = self.store.wait_for_change(rendezvous_id, condition, timeout)
        if rendezvous is None:
            assert isinstance(result_of(d), NotFound)
            return
        current = rendezvous.version
        if if_none_match not in IF_NONE_MATCH_HOLDS:
            assert result_of(d) == Wakeup(current, changed=True)
            event("wait: changed at once")
            return
        if timeout <= 0 or self.stopped:
            assert result_of(d) == Wakeup(current, changed=False)
            event("wait: unchanged at once")
            return
        mine = self.parked_on(rendezvous_id)
        retries: set[int] = set()
        if len(mine) >= PER_RENDEZVOUS:
            # Room frees up when the first of them is answered.
            retries.add(retry_after(min(r.deadline for r in mine) - self.now))
        if len(self.parked()) >= MAX_PARKED:
            # Some reader is answered within a poll timeout.
            retries.update(range(1, math.ceil(POLL) + 1))
        if retries:
            result = result_of(d)
            assert isinstance(result, Full), f"wait should be refused: {result!r}"
            assert result.retry_after_seconds in retries, (result, retries)
            event("wait: Full")
            return
        reader = Reader(
            d,
            rendezvous_id,
            current,
            deadline=min(self.now + timeout, current.expires),
            # A timeout that falls exactly on the expiry loses to it: the
            # rendezvous is gone at that instant.
            times_out=self.now + timeout < current.expires,
            clock=self.clock,
        )
        assert not reader.results, f"the reader should be parked: {reader.results!r}"
        self.readers.append(reader)
        event("wait: parked")

    @precondition(lambda self: bool(self.readers))
    @rule(which=WHICH)
    def cancel(self, which: int) -> None:
        # Newest first; an answered reader's cancel must change nothing.
        reader = self.readers[-1 - which % len(self.readers)]
        reader.deferred.cancel()
        if reader.parked:
            reader.answer(self.now, CancelledError)
            event("cancel: parked reader")

    @rule(seconds=ADVANCES)
    def advance(self, seconds: float) -> None:
        self.advance_by(seconds)

    def advance_by(self, seconds: float) -> None:
        """
        Move time forward, stopping just before and at every moment the
        model says something happens, so early and late answers both show.
        """
        target = self.now + seconds
        moments = {r.deadline for r in self.parked()}
        moments.update(r.version.expires for r in self.live.values())
        for moment in sorted(m for m in moments if self.now < m <= target):
            if moment - EPSILON > self.now:
                self.move_clock_to(moment - EPSILON)
            self.move_clock_to(moment)
        self.move_clock_to(target)

    @precondition(lambda self: not self.stopped and self.steps >= 30)
    @rule()
    def shutdown(self) -> None:
        self.store.shutdown()
        self.stopped = True
        self.at_shutdown = set(self.live)
        for reader in self.parked():
            reader.answer(self.now, Wakeup(reader.version, changed=False))
        event("shutdown")

    # Checks.

    @invariant()
    def agrees(self) -> None:
        """After every step, the store and the model agree."""
        self.steps += 1
        self.check()

    def check(self) -> None:
        """
        The store's observable state is the model's.
        """
        assert self.clock.seconds() == self.now
        # Counts first: reads below judge expiry on access, which could
        # otherwise cover for a timer that did not run.
        parked = self.parked()
        assert self.store.parked_count == len(parked)
        if self.stopped:
            # Shutdown dropped the expiry timers of what was then alive.
            lingering = self.at_shutdown - self.live.keys() - self.deleted
            assert len(self.live) <= self.store.rendezvous_count
            assert self.store.rendezvous_count <= len(self.live) + len(lingering)
        else:
            assert self.store.rendezvous_count == len(self.live)
        # No leaked timers: at most an expiry per rendezvous and a timeout
        # per parked reader.
        assert len(self.clock.getDelayedCalls()) <= self.store.rendezvous_count + len(parked)
        # Every reader is answered exactly once, as and when the model says.
        for reader in self.readers:
            if reader.expected is None:
                assert not reader.results, f"answered too early: {reader.results!r}"
            else:
                assert reader.results == [reader.expected]
        # Nothing live was lost (no eviction) or altered.
        for rendezvous_id, rendezvous in self.live.items():
            assert result_of(self.store.read(rendezvous_id)) == rendezvous.version

    def teardown(self) -> None:
        """At the end, every reader is answered, all expires, and no timer is left."""
        if sys.exc_info()[1] is not None:
            # A step already failed: let hypothesis report that, not this.
            return
        # Let every reader be answered and every rendezvous expire.
        self.advance_by(LONGEST_TTL + POLL)
        assert not self.parked()
        assert self.store.parked_count == 0
        if not self.stopped:
            assert self.store.rendezvous_count == 0
        assert self.clock.getDelayedCalls() == [], "timers outlived every rendezvous"
        # Everything ever created is gone, shutdown or not.
        for rendezvous_id in [*self.created, UNKNOWN_ID]:
            for d in (
                self.store.read(rendezvous_id),
                self.store.write(rendezvous_id, b"", TYPES[0], ANY),
                self.store.send(rendezvous_id, b"", TYPES[0], ANY, "a"),
                self.store.wait_for_change(rendezvous_id, ANY, POLL),
                self.store.delete(rendezvous_id),
            ):
                assert isinstance(result_of(d), NotFound)


def test_store_agrees_with_its_model() -> None:
    """Under any run of operations and clock moves the store behaves as the SPEC.md model says."""
    run_state_machine_as_test(
        StoreModel,
        settings=settings(
            max_examples=200,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
