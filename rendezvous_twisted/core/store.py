"""
The store contract: what every store of rendezvous does and tells
(L{RendezvousStore}), its domain errors, and what the stores share (ETags,
L{Version}, the parking rule).

Nothing here knows of HTTP.  Operations return Deferreds and fail with the
domain errors below, so that a store kept elsewhere (Redis,
L{rendezvous_twisted.redis.store}) stands in for the one in this process'
memory (L{rendezvous_twisted.core.memory}) behind the same contract; only
L{rendezvous_twisted.ops.stores.open_store} knows which one it made.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from twisted.application.service import IService
from twisted.internet.defer import Deferred

from rendezvous_twisted.core.budget import MemoryBudget
from rendezvous_twisted.core.conditions import Condition
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.metrics import Reading


class RandomTags:
    """
    Opaque, strong ETags (also fit for any other per-write token): each one
    C{"<24 hex digits>"}, 96 bits from the operating system's CSPRNG, so
    that nothing links two of them, across writes or rendezvous: a holder
    of one URL learns nothing of the others, nor how many writes the server
    does.  A repeat is as likely as guessing 96 random bits (never, in
    practice), so they are unique per write and per rendezvous, whatever
    the bytes written.

    The random bytes are drawn in batches: one C{os.urandom} call per
    write cost about four times what the whole tag now does (see the
    commit that made this).  A child process forked after a draw starts a
    batch of its own, so that two processes never hand out the same tags.
    """

    __slots__ = ("_batch", "_hex", "_position")

    #: Random bytes per tag.
    TAG_BYTES = 12

    def __init__(self, batch: int = 512) -> None:
        self._batch = batch
        self._hex = b""
        self._position = 0
        os.register_at_fork(after_in_child=self._forget)

    def __call__(self) -> bytes:
        position = self._position
        if position >= len(self._hex):
            self._hex = os.urandom(self.TAG_BYTES * self._batch).hex().encode("ascii")
            position = 0
        end = position + 2 * self.TAG_BYTES
        self._position = end
        return b'"%s"' % self._hex[position:end]

    def _forget(self) -> None:
        self._hex = b""
        self._position = 0


#: The one source of ETags of every store (the memory store's, and the
#: Redis store's).
new_etag = RandomTags()


class RendezvousError(Exception):
    """
    A request the store refuses; the web layer maps each kind to a status.
    """


class NotFound(RendezvousError):
    """
    No such rendezvous: never created, deleted, or expired.
    """


class PreconditionFailed(RendezvousError):
    """
    C{If-Match} matched nothing current.  C{current} is what is stored, so
    that the writer can be told its ETag and re-read.
    """

    def __init__(self, current: Version) -> None:
        super().__init__("If-Match matches no current ETag")
        self.current = current


class TooLarge(RendezvousError):
    """
    The payload is over C{max_bytes}.
    """


class Full(RendezvousError):
    """
    A capacity limit is reached; nothing was evicted to make room.
    C{retry_after_seconds} is when room is expected to free up.
    """

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class TooManyTransactions(RendezvousError):
    """
    The rendezvous already records as many transactions as it may
    (L{Config.max_transactions_per_rendezvous}); a new one is refused, and
    not recorded.
    """


class StoreUnavailable(RendezvousError):
    """
    The store cannot answer now (its Redis is down, unreachable or slow);
    the client should try again shortly.
    """


@dataclass(frozen=True, slots=True)
class Version:
    """
    One payload of one rendezvous, as a write left it.  Immutable: a write
    makes a new Version, so a reader holding one never sees it change.

    Times are seconds since the epoch, on the store's clock.
    """

    rendezvous_id: str
    body: bytes
    content_type: bytes
    #: Quoted, strong, unique to this rendezvous and this write.
    etag: bytes
    last_modified: float
    expires: float


@dataclass(frozen=True, slots=True)
class Sent:
    """
    The answer a write by transaction (L{RendezvousStore.send}) recorded:
    the ETag its write made, or None when its condition matched nothing
    current (a conflict, which is recorded too).  C{replayed} when an
    earlier call with the same transaction recorded it, and this one
    evaluated nothing.
    """

    etag: bytes | None
    replayed: bool = False


class Wakeup(NamedTuple):
    """
    How a wait ended: with the current version, and whether it is a change
    the reader has not seen (200) or the payload it already has (304).
    """

    version: Version
    changed: bool


class RendezvousStore(Protocol):
    """
    Everything the server needs of a store: the operations the protocols
    call, and what the graceful stop, metrics, the health check and the
    start's log need to know, so that nothing asks which store it holds.
    Every operation returns a Deferred; the failures are the
    L{RendezvousError} subclasses named.
    """

    #: Largest payload, in bytes (the config's C{max_bytes}).
    max_bytes: int
    #: Rendezvous created, deleted by a client and expired since start, by
    #: this process.
    created_total: int
    deleted_total: int
    expired_total: int
    #: The store's lifecycle: started before the server serves (a Redis
    #: store connects, and keeps reconnecting), stopped only once the
    #: requests in flight were answered (a Redis store disconnects).  A
    #: store with nothing to start has a service that does nothing.
    service: IService

    @property
    def available(self) -> bool:
        """
        Whether the store can answer now (a Redis store: its connections
        are up; the memory store: always).
        """

    @property
    def rendezvous_count(self) -> int:
        """
        How many rendezvous are held, as far as this process knows.
        """

    @property
    def parked_count(self) -> int:
        """
        How many readers are parked in this process.
        """

    def readings(self) -> Sequence[Reading]:
        """
        The store's metrics, read at scrape time: what every store counts
        (L{store_readings}), and what only this kind of store can tell.
        """

    def memory_elsewhere(self) -> tuple[str, MemoryBudget] | None:
        """
        Where the rendezvous live when not in this process (e.g. C{"in
        Redis, for all processes together"}) and the most memory they may
        take there; None when they live in this process, whose own budget
        (L{rendezvous_twisted.core.budget.worst_case_memory}) counts them.
        """

    def create(
        self, body: bytes, content_type: bytes, owner: str, ttl_seconds: float | None = None
    ) -> Deferred[Version]:
        """
        Create a rendezvous holding C{body}, on behalf of client address
        C{owner}, to live C{ttl_seconds} (the config's C{ttl_seconds} when
        None).  Fails with L{TooLarge} or L{Full}.
        """

    def read(self, rendezvous_id: str) -> Deferred[Version]:
        """
        The current payload.  Fails with L{NotFound}.
        """

    def write(
        self, rendezvous_id: str, body: bytes, content_type: bytes, if_match: Condition
    ) -> Deferred[Version]:
        """
        Replace the payload if C{if_match} holds (strong comparison), as one
        atomic step: of two writers racing with the same condition exactly
        one wins.  Fails with L{NotFound}, L{PreconditionFailed} or
        L{TooLarge}.
        """

    def send(
        self,
        rendezvous_id: str,
        body: bytes,
        content_type: bytes,
        if_match: Condition,
        transaction: str,
    ) -> Deferred[Sent]:
        """
        L{write}, recorded under C{transaction} for the rendezvous'
        lifetime, as one atomic step with the write: a transaction seen
        before on this rendezvous evaluates nothing and answers what was
        recorded (L{Sent.replayed}).  A condition that matches nothing
        current is a recorded conflict (L{Sent.etag} None), not a failure.
        Fails, recording nothing, with L{NotFound}, L{TooLarge} or
        L{TooManyTransactions}.
        """

    def delete(self, rendezvous_id: str) -> Deferred[None]:
        """
        Forget a rendezvous and answer its parked readers with L{NotFound}.
        Fails with L{NotFound}.
        """

    def wait_for_change(
        self, rendezvous_id: str, if_none_match: Condition, timeout_seconds: float
    ) -> Deferred[Wakeup]:
        """
        Wait for a payload the reader has not seen.  If C{if_none_match}
        (weak comparison) does not match the current payload, it is
        returned at once as changed; otherwise the caller is parked until a
        write (the new Version, changed), a delete or expiry (L{NotFound}),
        or C{timeout_seconds} or shutdown (the current Version, unchanged).
        A timeout of 0 never parks.  Cancelling the Deferred drops the
        parked reader at once.  Fails at once with L{NotFound}, or with
        L{Full} when too many readers are parked.
        """

    def shutdown(self) -> None:
        """
        Answer every parked reader with its unchanged Version, so that
        clients poll again elsewhere, and park no one from then on.  Other
        operations keep working until the process exits.
        """


def retry_after(seconds: float) -> int:
    """
    A Retry-After value: whole seconds, rounded up, at least one.
    """
    return max(1, math.ceil(seconds))


class _Parked(Protocol):
    #: When the reader will be answered at the latest.
    deadline: float


def parking_refusal(
    config: Config, waiting: Collection[_Parked], parked: int, now: float
) -> Full | None:
    """
    Why one more reader may not park beside the C{waiting} ones on its
    rendezvous, with C{parked} on the server: L{Full}, or None if it may.
    """
    if len(waiting) >= config.max_parked_per_rendezvous:
        soonest = min(waiter.deadline for waiter in waiting)
        return Full("too many readers wait on this rendezvous", retry_after(soonest - now))
    if parked >= config.max_parked:
        return Full("too many readers wait on this server", 1)
    return None


def store_readings(store: RendezvousStore) -> list[Reading]:
    """
    The metrics every store exports: its counters and what it holds now.
    """
    return [
        Reading(
            "rendezvous_created", "Rendezvous created.", "counter", lambda: store.created_total
        ),
        Reading(
            "rendezvous_deleted",
            "Rendezvous deleted by a client.",
            "counter",
            lambda: store.deleted_total,
        ),
        Reading(
            "rendezvous_expired",
            "Rendezvous that reached their expiry.",
            "counter",
            lambda: store.expired_total,
        ),
        Reading(
            "rendezvous_live",
            "Rendezvous held now (expired ones not reclaimed yet included).",
            "gauge",
            lambda: store.rendezvous_count,
        ),
        Reading(
            "rendezvous_parked_readers",
            "Long-poll GETs parked now.",
            "gauge",
            lambda: store.parked_count,
        ),
    ]
