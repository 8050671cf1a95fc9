"""
Rendezvous kept in Redis, so that several processes (on one machine or
many) serve the same rendezvous without sticky routing.

The rules are the memory store's (L{rendezvous_twisted.core.memory}), made
to hold across processes:
  - create, write, send and delete are each one Lua script, so atomic: of
    two writers on two nodes racing with the same If-Match, exactly one
    wins, and a transaction sent on two nodes at once is evaluated once;
  - a rendezvous is a hash with Redis' own expiry (PX), set at creation and
    never extended; it is also judged expired on access by this node's
    clock against the Expires it was created with, so that no client is
    served past the Expires it was told;
  - the caps are counted in Redis, in sorted sets scored by expiry;
  - writes (sends too) and deletes publish the id on one channel, to which each process
    holds one subscription; a process with readers parked on that id reads
    it again and answers them.  Expiry is answered by each node's own timer,
    from the time the rendezvous has left.

Poll timeouts and expiry timers run on the injected clock; connections and
their deadlines on the injected reactor.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rendezvous_twisted.core.budget import MemoryBudget, redis_memory
from rendezvous_twisted.core.conditions import ANY, Condition
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.metrics import Reading
from rendezvous_twisted.core.store import (
    Full,
    NotFound,
    PreconditionFailed,
    RendezvousError,
    Sent,
    StoreUnavailable,
    TooLarge,
    TooManyTransactions,
    Version,
    Wakeup,
    new_etag,
    parking_refusal,
    retry_after,
    store_readings,
)
from rendezvous_twisted.redis.connections import Connections
from rendezvous_twisted.redis.resp import RedisDown, RedisReplyError, detached
from rendezvous_twisted.redis.scripts import SCRIPTS
from rendezvous_twisted.redis.url import StoreURL


class _Waiter:
    """
    One parked reader.  C{version} is None until its first read answers.
    """

    __slots__ = ("condition", "deadline", "deferred", "timer", "version")

    def __init__(self, condition: Condition, deadline: float) -> None:
        self.condition = condition
        self.deadline = deadline
        self.deferred: Deferred[Wakeup] | None = None
        self.version: Version | None = None
        self.timer: IDelayedCall | None = None


#: At most one warning per this many seconds while the store is unavailable.
_WARN_EVERY_SECONDS = 10.0


def _woken(waiter: _Waiter, version: Version) -> bool:
    """
    Whether C{version} answers a parked reader: it is another write than
    the one the reader was parked on (a write wakes every reader, those
    with C{If-None-Match: *} too), or one its condition does not match.
    """
    seen = waiter.version
    if seen is not None and version.etag != seen.etag:
        return True
    return not waiter.condition.matches_weak(version.etag)


class RedisStore:
    """
    Rendezvous kept in Redis: the store for several processes.

    Each process keeps two connections: one for commands, one subscribed
    to the store's channel.  While either is down, operations that need it
    fail at once with L{StoreUnavailable} (a 503); both come back by
    themselves.  Counters are this process' own; C{rendezvous_count} is the
    count across all processes as this one last saw it.
    """

    log = Logger()

    def __init__(self, config: Config, clock: IReactorTime, reactor: Any, url: StoreURL) -> None:
        self._config = config
        self._clock = clock
        self._url = url
        self.max_bytes = config.max_bytes
        prefix = url.prefix
        self._live_key = f"{prefix}live"
        self._owner_prefix = f"{prefix}owner:"
        self._record_prefix = f"{prefix}r:"
        # Channels span databases: name the database so two stores in one
        # Redis never hear each other.
        self._channel = f"{prefix}{url.db}:changed"
        self._waiting: dict[str, dict[_Waiter, None]] = {}
        # Ids being read again after a change, and those changed once more
        # while that read was out.
        self._refreshing: dict[str, bool] = {}
        self._parked = 0
        self._stopped = False
        self.created_total = 0
        self.deleted_total = 0
        self.expired_total = 0
        self._live_seen = 0
        self._last_warning = -math.inf
        self._connections = Connections(
            url,
            reactor,
            config.store_timeout_seconds,
            self._channel,
            on_message=self._changed,
            on_events_lost=self._events_lost,
        )
        self._commands = self._connections.commands
        self._events = self._connections.events
        #: Start it to connect (and keep reconnecting); stop it to disconnect.
        self.service: IService = self._connections

    # Connections.

    def connect(self) -> None:
        """
        Start connecting, and reconnecting whenever a connection is lost.
        """
        self.service.startService()

    def ready(self) -> Deferred[None]:
        """
        Fires once both connections are up.
        """
        return self._connections.ready()

    def close(self) -> Deferred[None]:
        """
        Disconnect, and stop reconnecting.
        """
        d: Deferred[None] = self.service.stopService()
        return d

    @property
    def available(self) -> bool:
        """
        Whether both connections are up.
        """
        return self._connections.available

    def _events_lost(self) -> None:
        # Changes published while we are not subscribed are lost to us, so
        # no parked reader can trust it will be woken: answer them all.
        for rendezvous_id in list(self._waiting):
            self._answer_all(rendezvous_id, Failure(StoreUnavailable("lost the store's events")))

    def _script(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        return self._unavailable(SCRIPTS[script].run(self._commands, keys, args))

    def _command(self, *arguments: bytes | str | int) -> Deferred[Any]:
        return self._unavailable(self._commands.execute(*arguments))

    def _unavailable(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        Turn Redis' failures into L{StoreUnavailable}.
        """

        def down(failure: Failure) -> Failure:
            if not failure.check(RedisDown, RedisReplyError):
                return failure
            # One line per outage, not one per request.
            now = self._clock.seconds()
            if now - self._last_warning >= _WARN_EVERY_SECONDS:
                self._last_warning = now
                self.log.warn("the store is unavailable: {error}", error=failure.getErrorMessage())
            return Failure(StoreUnavailable(failure.getErrorMessage()))

        return d.addErrback(down)

    # Introspection.

    def readings(self) -> list[Reading]:
        """
        The metrics every store exports, and whether Redis can be reached.
        """
        return [
            *store_readings(self),
            Reading(
                "rendezvous_store_available",
                "1 while both connections to Redis are up, else 0.",
                "gauge",
                lambda: int(self.available),
            ),
        ]

    def memory_elsewhere(self) -> tuple[str, MemoryBudget] | None:
        """
        The rendezvous live in Redis: what they may take there, for all
        processes together.
        """
        return "in Redis, for all processes together", redis_memory(self._config)

    @property
    def rendezvous_count(self) -> int:
        """
        Rendezvous alive across every process, when this one last created.
        """
        return self._live_seen

    @property
    def parked_count(self) -> int:
        """
        How many readers are parked on this process.
        """
        return self._parked

    # The operations.

    def _now_ms(self) -> int:
        # Down, not to the nearest: a rendezvous is never judged expired early.
        return math.floor(self._clock.seconds() * 1000)

    def _key(self, rendezvous_id: str) -> str:
        return self._record_prefix + rendezvous_id

    def create(
        self, body: bytes, content_type: bytes, owner: str, ttl_seconds: float | None = None
    ) -> Deferred[Version]:
        if len(body) > self.max_bytes:
            return fail(TooLarge())
        now = self._now_ms()
        # The caps' sets are scored by expiry, whatever each one's lifetime:
        # the first is the soonest to free a place, which Retry-After tells.
        ttl = round((self._config.ttl_seconds if ttl_seconds is None else ttl_seconds) * 1000)
        rendezvous_id = secrets.token_urlsafe(16)
        etag = new_etag()
        d = self._script(
            "create",
            [self._live_key, self._owner_prefix + owner, self._key(rendezvous_id)],
            [
                now,
                now + ttl,
                ttl,
                self._config.max_rendezvous,
                self._config.max_rendezvous_per_address,
                body,
                content_type,
                etag,
                owner,
                rendezvous_id,
            ],
        )

        def created(reply: list[Any]) -> Deferred[Version] | Version:
            outcome, detail, expired = reply
            self.expired_total += expired
            if outcome == b"ok":
                self.created_total += 1
                self._live_seen = detail
                return Version(
                    rendezvous_id, body, content_type, etag, now / 1000, (now + ttl) / 1000
                )
            if outcome == b"exists":  # pragma: no cover - 2**-128
                return self.create(body, content_type, owner, ttl_seconds)
            seconds = retry_after(float(detail) / 1000 - now / 1000)
            if outcome == b"owner":
                raise Full("too many rendezvous from this address", seconds)
            raise Full("the server is full", seconds)

        # Detached: Redis runs a script once sent, and what its answer
        # changes here, the counts, must change even if the client hung up.
        return detached(d.addCallback(created))

    def _version(self, rendezvous_id: str, fields: list[Any]) -> tuple[Version, float]:
        """
        A Version from a record's fields, and the seconds Redis keeps it.
        """
        body, content_type, etag, modified, expires, pttl = fields
        version = Version(
            rendezvous_id, body, content_type, etag, int(modified) / 1000, int(expires) / 1000
        )
        return version, pttl / 1000

    def _read(self, rendezvous_id: str) -> Deferred[tuple[Version, float]]:
        d = self._script("read", [self._key(rendezvous_id)], [self._now_ms()])

        def found(fields: list[Any] | None) -> tuple[Version, float]:
            if fields is None:
                raise NotFound()
            return self._version(rendezvous_id, fields)

        return d.addCallback(found)

    def read(self, rendezvous_id: str) -> Deferred[Version]:
        return self._read(rendezvous_id).addCallback(lambda found: found[0])

    def write(
        self, rendezvous_id: str, body: bytes, content_type: bytes, if_match: Condition = ANY
    ) -> Deferred[Version]:
        now = self._now_ms()
        etag = new_etag()
        arguments = self._write_arguments(now, rendezvous_id, body, content_type, etag, if_match)
        d = self._script("write", [self._key(rendezvous_id)], arguments)

        def written(reply: list[Any]) -> Version:
            outcome = reply[0]
            if outcome == b"ok":
                return Version(
                    rendezvous_id, body, content_type, etag, now / 1000, int(reply[1]) / 1000
                )
            if outcome == b"pf":
                raise PreconditionFailed(self._version(rendezvous_id, reply[1])[0])
            if outcome == b"tl":
                raise TooLarge()
            raise NotFound()

        return d.addCallback(written)

    def send(
        self,
        rendezvous_id: str,
        body: bytes,
        content_type: bytes,
        if_match: Condition,
        transaction: str,
    ) -> Deferred[Sent]:
        etag = new_etag()
        arguments = self._write_arguments(
            self._now_ms(),
            rendezvous_id,
            body,
            content_type,
            etag,
            if_match,
            # Ids are [0-9A-Za-z._~-]: none is a record's own field.
            "t:" + transaction,
            self._config.max_transactions_per_rendezvous,
        )
        d = self._script("send", [self._key(rendezvous_id)], arguments)

        def sent(reply: list[Any]) -> Sent:
            outcome = reply[0]
            if outcome == b"ok":
                return Sent(etag)
            if outcome == b"replay":
                return Sent(reply[1] or None, replayed=True)
            if outcome == b"conflict":
                return Sent(None)
            if outcome == b"many":
                raise TooManyTransactions()
            if outcome == b"tl":
                raise TooLarge()
            raise NotFound()

        return d.addCallback(sent)

    def _write_arguments(
        self,
        now: int,
        rendezvous_id: str,
        body: bytes,
        content_type: bytes,
        etag: bytes,
        if_match: Condition,
        *more: str | int,
    ) -> list[Any]:
        """
        The ARGV of the write and send scripts: the time, whether any ETag
        matches, whether the body is too large (then not sent), the body,
        its type, the new ETag, the channel and id to publish, C{more},
        then the strong ETags that match.
        """
        too_large = len(body) > self.max_bytes
        return [
            now,
            b"1" if if_match.any else b"0",
            b"1" if too_large else b"0",
            b"" if too_large else body,
            content_type,
            etag,
            self._channel,
            rendezvous_id,
            *more,
            *sorted(if_match.strong),
        ]

    def delete(self, rendezvous_id: str) -> Deferred[None]:
        d = self._script(
            "delete",
            [self._key(rendezvous_id), self._live_key],
            [self._now_ms(), self._channel, rendezvous_id, self._owner_prefix],
        )

        def deleted(existed: int) -> None:
            if not existed:
                raise NotFound()
            self.deleted_total += 1

        return detached(d.addCallback(deleted))

    def wait_for_change(
        self, rendezvous_id: str, if_none_match: Condition, timeout_seconds: float
    ) -> Deferred[Wakeup]:
        if timeout_seconds <= 0 or self._stopped:
            return self.read(rendezvous_id).addCallback(
                lambda version: Wakeup(version, not if_none_match.matches_weak(version.etag))
            )
        refusal: RendezvousError | None
        if not self._events.up:
            # Nobody could wake a parked reader.
            refusal = StoreUnavailable("not subscribed to the store's events")
        else:
            refusal = parking_refusal(
                self._config,
                self._waiting.get(rendezvous_id, {}),
                self._parked,
                self._clock.seconds(),
            )
        if refusal is not None:
            # Only a wait is refused: a reader that would not park (a change
            # it has not seen, a rendezvous gone) is answered, as in memory.
            def unparked(version: Version) -> Wakeup:
                if if_none_match.matches_weak(version.etag):
                    raise refusal
                return Wakeup(version, changed=True)

            return self.read(rendezvous_id).addCallback(unparked)
        # Parked before it reads: a change published while the read is out
        # reads again (see _changed), so that no wake-up falls in between.
        waiter = _Waiter(if_none_match, self._clock.seconds() + timeout_seconds)
        self._waiting.setdefault(rendezvous_id, {})[waiter] = None
        self._parked += 1

        def cancel(d: Deferred[Wakeup]) -> None:
            # The client hung up: forget it now, not when its timer is due.
            self._unpark(rendezvous_id, waiter)

        d: Deferred[Wakeup] = Deferred(cancel)
        waiter.deferred = d
        self._read(rendezvous_id).addBoth(self._first_read, rendezvous_id, waiter, timeout_seconds)
        return d

    def shutdown(self) -> None:
        self._stopped = True
        for rendezvous_id, waiters in list(self._waiting.items()):
            for waiter in list(waiters):
                if waiter.version is not None:
                    self._settle(rendezvous_id, waiter, Wakeup(waiter.version, changed=False))

    # Parking.

    def _first_read(
        self,
        found: tuple[Version, float] | Failure,
        rendezvous_id: str,
        waiter: _Waiter,
        timeout_seconds: float,
    ) -> None:
        if waiter not in self._waiting.get(rendezvous_id, ()):
            return  # answered (by a change or shutdown) or gone meanwhile
        if isinstance(found, Failure):
            self._settle(rendezvous_id, waiter, found)
            return
        version, kept_seconds = found
        if not waiter.condition.matches_weak(version.etag):
            self._settle(rendezvous_id, waiter, Wakeup(version, changed=True))
            return
        if self._stopped:
            self._settle(rendezvous_id, waiter, Wakeup(version, changed=False))
            return
        waiter.version = version
        now = self._clock.seconds()
        remaining = min(version.expires - now, kept_seconds)
        waiter.deadline = now + min(timeout_seconds, remaining)
        if timeout_seconds < remaining:
            waiter.timer = self._clock.callLater(
                timeout_seconds, self._settle, rendezvous_id, waiter, None
            )
        else:
            # The rendezvous expires first: answer as its expiry would.
            waiter.timer = self._clock.callLater(
                remaining, self._settle, rendezvous_id, waiter, Failure(NotFound())
            )

    def _unpark(self, rendezvous_id: str, waiter: _Waiter) -> bool:
        waiters = self._waiting.get(rendezvous_id)
        if waiters is None or waiter not in waiters:
            return False
        del waiters[waiter]
        if not waiters:
            del self._waiting[rendezvous_id]
        self._parked -= 1
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        return True

    def _settle(self, rendezvous_id: str, waiter: _Waiter, result: Wakeup | Failure | None) -> None:
        """
        Answer one parked reader, if still parked: with C{result}, or with
        its unchanged version when C{result} is None (its poll timed out).
        """
        if not self._unpark(rendezvous_id, waiter):
            return
        assert waiter.deferred is not None
        if result is None:
            assert waiter.version is not None
            result = Wakeup(waiter.version, changed=False)
        if isinstance(result, Failure):
            waiter.deferred.errback(result)
        else:
            waiter.deferred.callback(result)

    def _answer_all(self, rendezvous_id: str, result: Failure) -> None:
        for waiter in list(self._waiting.get(rendezvous_id, ())):
            self._settle(rendezvous_id, waiter, result)

    def _changed(self, channel: bytes, message: bytes) -> None:
        """
        A write or delete somewhere published an id: read it again if
        anyone here waits on it.
        """
        rendezvous_id = message.decode("ascii", "replace")
        if rendezvous_id not in self._waiting:
            return
        if rendezvous_id in self._refreshing:
            self._refreshing[rendezvous_id] = True  # read again after this one
            return
        self._refresh(rendezvous_id)

    def _refresh(self, rendezvous_id: str) -> None:
        self._refreshing[rendezvous_id] = False

        def settled(found: tuple[Version, float] | Failure) -> None:
            again = self._refreshing.pop(rendezvous_id)
            for waiter in list(self._waiting.get(rendezvous_id, ())):
                if isinstance(found, Failure):
                    self._settle(rendezvous_id, waiter, found)
                elif _woken(waiter, found[0]):
                    self._settle(rendezvous_id, waiter, Wakeup(found[0], changed=True))
            if again and rendezvous_id in self._waiting:
                self._refresh(rendezvous_id)

        self._read(rendezvous_id).addBoth(settled)
