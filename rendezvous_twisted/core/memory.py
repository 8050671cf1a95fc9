"""
Rendezvous held in this process' memory: the default store.

It follows the contract of L{rendezvous_twisted.core.store.RendezvousStore};
the Redis store (L{rendezvous_twisted.redis.store}) follows the same one
across processes.
"""

from __future__ import annotations

import secrets

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from rendezvous_twisted.core.budget import MemoryBudget
from rendezvous_twisted.core.conditions import ANY, Condition
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.metrics import Reading
from rendezvous_twisted.core.store import (
    Full,
    NotFound,
    PreconditionFailed,
    Sent,
    TooLarge,
    TooManyTransactions,
    Version,
    Wakeup,
    new_etag,
    parking_refusal,
    retry_after,
    store_readings,
)


class _Waiter:
    """
    One parked reader: its Deferred and its poll timer.
    """

    __slots__ = ("deadline", "deferred", "timer")

    def __init__(self, deferred: Deferred[Wakeup], deadline: float) -> None:
        self.deferred = deferred
        self.deadline = deadline
        self.timer: IDelayedCall | None = None


class _Record:
    """
    A live rendezvous: its current Version, owner and timers.
    """

    __slots__ = ("born", "expiry", "owner", "transactions", "version", "waiters")

    def __init__(self, version: Version, owner: str, expiry: IDelayedCall) -> None:
        self.born = version.last_modified
        self.version = version
        self.owner = owner
        self.expiry = expiry
        # Insertion-ordered, so a wake answers readers in the order they came.
        self.waiters: dict[_Waiter, None] = {}
        # What each transaction's send answered (its ETag, or None for a
        # conflict); made on the first one, as most rendezvous have none.
        self.transactions: dict[str, bytes | None] | None = None


class MemoryStore:
    """
    Rendezvous held in this process' memory: the default store.

    All bookkeeping happens synchronously inside each call, so every
    operation is atomic with respect to every other.  Memory is bounded by
    the L{Config} caps; nothing is ever evicted to make room.
    """

    log = Logger()
    #: Always: nothing stands between it and its data.
    available = True

    def __init__(self, config: Config, clock: IReactorTime) -> None:
        self._config = config
        self._clock = clock
        self.max_bytes = config.max_bytes
        # Insertion order is creation order.  Lifetimes differ (MSC4388's is
        # its own), so the first record is the next to expire only among
        # those of one lifetime: L{_reclaim_expired} looks further.
        self._records: dict[str, _Record] = {}
        # owner -> ids it created, oldest first.
        self._by_owner: dict[str, dict[str, None]] = {}
        self._parked = 0
        self._stopped = False
        # The shortest lifetime given to any rendezvous yet.
        self._shortest_ttl = config.ttl_seconds
        #: Rendezvous created, deleted and expired since start, for metrics.
        self.created_total = 0
        self.deleted_total = 0
        self.expired_total = 0
        #: Nothing to connect to: its lifecycle does nothing.
        self.service: IService = Service()

    # Introspection, for tests, metrics and logs.

    def readings(self) -> list[Reading]:
        """
        The metrics every store exports; always available, it exports no
        availability.
        """
        return store_readings(self)

    def memory_elsewhere(self) -> tuple[str, MemoryBudget] | None:
        """
        None: the rendezvous live in this process.
        """
        return None

    @property
    def rendezvous_count(self) -> int:
        """
        How many rendezvous are held, expired ones not yet reclaimed included.
        """
        return len(self._records)

    @property
    def parked_count(self) -> int:
        """
        How many readers are parked.
        """
        return self._parked

    # The operations.

    def create(
        self, body: bytes, content_type: bytes, owner: str, ttl_seconds: float | None = None
    ) -> Deferred[Version]:
        if len(body) > self.max_bytes:
            return fail(TooLarge())
        now = self._clock.seconds()
        mine = self._by_owner.get(owner)
        if mine is not None and len(mine) >= self._config.max_rendezvous_per_address:
            # Refuse on live rendezvous only: one whose timer is due but has
            # not run yet must not count.  Only checked when at the cap.
            for rendezvous_id in list(mine):
                self._live(rendezvous_id)
            mine = self._by_owner.get(owner)
            if mine is not None and len(mine) >= self._config.max_rendezvous_per_address:
                soonest = min(self._records[one].version.expires for one in mine)
                return fail(
                    Full("too many rendezvous from this address", retry_after(soonest - now))
                )
        if len(self._records) >= self._config.max_rendezvous:
            self._reclaim_expired(now)
            if len(self._records) >= self._config.max_rendezvous:
                soonest = min(record.version.expires for record in self._records.values())
                return fail(Full("the server is full", retry_after(soonest - now)))
        rendezvous_id = secrets.token_urlsafe(16)
        while rendezvous_id in self._records:  # pragma: no cover - 2**-128
            rendezvous_id = secrets.token_urlsafe(16)
        ttl = self._config.ttl_seconds if ttl_seconds is None else ttl_seconds
        self._shortest_ttl = min(self._shortest_ttl, ttl)
        version = Version(rendezvous_id, body, content_type, new_etag(), now, now + ttl)
        expiry = self._clock.callLater(ttl, self._expire, rendezvous_id)
        self._records[rendezvous_id] = _Record(version, owner, expiry)
        self._by_owner.setdefault(owner, {})[rendezvous_id] = None
        self.created_total += 1
        return succeed(version)

    def read(self, rendezvous_id: str) -> Deferred[Version]:
        record = self._live(rendezvous_id)
        if record is None:
            return fail(NotFound())
        return succeed(record.version)

    def write(
        self, rendezvous_id: str, body: bytes, content_type: bytes, if_match: Condition = ANY
    ) -> Deferred[Version]:
        record = self._live(rendezvous_id)
        if record is None:
            return fail(NotFound())
        current = record.version
        if not if_match.matches_strong(current.etag):
            return fail(PreconditionFailed(current))
        if len(body) > self.max_bytes:
            return fail(TooLarge())
        version = Version(
            rendezvous_id,
            body,
            content_type,
            new_etag(),
            self._clock.seconds(),
            current.expires,
        )
        record.version = version
        self._answer(record, Wakeup(version, changed=True))
        return succeed(version)

    def send(
        self,
        rendezvous_id: str,
        body: bytes,
        content_type: bytes,
        if_match: Condition,
        transaction: str,
    ) -> Deferred[Sent]:
        record = self._live(rendezvous_id)
        if record is None:
            return fail(NotFound())
        recorded = record.transactions
        if recorded is None:
            recorded = record.transactions = {}
        elif transaction in recorded:
            return succeed(Sent(recorded[transaction], replayed=True))
        if len(recorded) >= self._config.max_transactions_per_rendezvous:
            return fail(TooManyTransactions())
        if not if_match.matches_strong(record.version.etag):
            recorded[transaction] = None
            return succeed(Sent(None))
        if len(body) > self.max_bytes:
            return fail(TooLarge())
        self.write(rendezvous_id, body, content_type, if_match)
        recorded[transaction] = etag = record.version.etag
        return succeed(Sent(etag))

    def delete(self, rendezvous_id: str) -> Deferred[None]:
        record = self._live(rendezvous_id)
        if record is None:
            return fail(NotFound())
        self._forget(rendezvous_id, record)
        self.deleted_total += 1
        return succeed(None)

    def wait_for_change(
        self, rendezvous_id: str, if_none_match: Condition, timeout_seconds: float
    ) -> Deferred[Wakeup]:
        record = self._live(rendezvous_id)
        if record is None:
            return fail(NotFound())
        current = record.version
        if not if_none_match.matches_weak(current.etag):
            return succeed(Wakeup(current, changed=True))
        if timeout_seconds <= 0 or self._stopped:
            return succeed(Wakeup(current, changed=False))
        refusal = parking_refusal(self._config, record.waiters, self._parked, self._clock.seconds())
        if refusal is not None:
            return fail(refusal)
        return self._park(record, timeout_seconds)

    def shutdown(self) -> None:
        # Payloads stay readable until the process exits; only parking ends.
        self._stopped = True
        for record in self._records.values():
            if record.expiry.active():
                record.expiry.cancel()
            self._answer(record, Wakeup(record.version, changed=False))

    # Parking.

    def _park(self, record: _Record, timeout_seconds: float) -> Deferred[Wakeup]:
        now = self._clock.seconds()
        remaining = record.version.expires - now

        def cancel(deferred: Deferred[Wakeup]) -> None:
            # The client hung up: forget it now, not when its timer is due.
            self._unpark(record, waiter)

        deferred: Deferred[Wakeup] = Deferred(cancel)
        waiter = _Waiter(deferred, now + min(timeout_seconds, remaining))
        if timeout_seconds < remaining:
            waiter.timer = self._clock.callLater(timeout_seconds, self._timed_out, record, waiter)
        # Otherwise the rendezvous expires first, and its expiry answers
        # the reader with 404: a wait never outlives its rendezvous.
        record.waiters[waiter] = None
        self._parked += 1
        return deferred

    def _unpark(self, record: _Record, waiter: _Waiter) -> None:
        if waiter in record.waiters:
            del record.waiters[waiter]
            self._parked -= 1
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()

    def _timed_out(self, record: _Record, waiter: _Waiter) -> None:
        waiter.timer = None
        self._unpark(record, waiter)
        waiter.deferred.callback(Wakeup(record.version, changed=False))

    def _answer(self, record: _Record, wakeup: Wakeup | None) -> None:
        """
        Answer every reader parked on C{record}: with C{wakeup}, or with
        L{NotFound} when it is None.  The waiters are detached first, so a
        callback that parks again joins the next round, not this one.
        """
        waiters, record.waiters = record.waiters, {}
        self._parked -= len(waiters)
        for waiter in waiters:
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            if wakeup is None:
                waiter.deferred.errback(NotFound())
            else:
                waiter.deferred.callback(wakeup)

    # Lifetime.

    def _live(self, rendezvous_id: str) -> _Record | None:
        """
        The record for an id, if it exists and has not expired.  Expiry is
        judged here, on every access, not left to the timer alone.
        """
        record = self._records.get(rendezvous_id)
        if record is not None and record.version.expires <= self._clock.seconds():
            self._expire(rendezvous_id)
            return None
        return record

    def _expire(self, rendezvous_id: str) -> None:
        record = self._records.get(rendezvous_id)
        if record is not None:
            self.log.debug("rendezvous expired")
            self.expired_total += 1
            self._forget(rendezvous_id, record)

    def _reclaim_expired(self, now: float) -> None:
        # Their timers reclaim them too; this only catches those whose timer
        # is due but has not run yet.  In creation order: once a record was
        # created less than the shortest lifetime ago, none after it expired.
        for rendezvous_id, record in list(self._records.items()):
            if record.born + self._shortest_ttl > now:
                return
            if record.version.expires <= now:
                self.expired_total += 1
                self._forget(rendezvous_id, record)

    def _forget(self, rendezvous_id: str, record: _Record) -> None:
        del self._records[rendezvous_id]
        mine = self._by_owner[record.owner]
        del mine[rendezvous_id]
        if not mine:
            del self._by_owner[record.owner]
        if record.expiry.active():
            record.expiry.cancel()
        self._answer(record, None)
