"""
The Redis store's two connections, as one service: one for commands, one
subscribed to the store's channel.  Each logs in (and selects its database)
whenever it connects; the commands' checks that this Redis suits the store
(its version, no persistence) are logged when it first comes up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, FirstError, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from rendezvous_twisted.redis.resp import RedisConnection, RedisProtocol
from rendezvous_twisted.redis.url import StoreURL, store_endpoint

#: Each connection is PINGed every this many store timeouts, so that one
#: that went quiet is found out within one more (6 s at the defaults).
HEARTBEAT_TIMEOUTS = 5


def _first_error(failure: Failure) -> Failure:
    """
    The failure of the command that failed a C{DeferredList}.
    """
    assert isinstance(failure.value, FirstError)
    return failure.value.subFailure


class Connections(MultiService):
    """
    The store's connections to Redis at C{url}: start the service to connect
    (and keep reconnecting whenever one is lost), stop it to disconnect.
    """

    log = Logger()

    def __init__(
        self,
        url: StoreURL,
        reactor: Any,
        timeout_seconds: float,
        channel: str,
        on_message: Callable[[bytes, bytes], None],
        on_events_lost: Callable[[], None],
    ) -> None:
        """
        @param channel: what the events connection subscribes to.
        @param on_message: called with each message published there.
        @param on_events_lost: called when the subscription is lost, and
            with it any message published until it is back.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self._url = url
        self._channel = channel
        self._ready: list[Deferred[None]] = []
        heartbeat = HEARTBEAT_TIMEOUTS * timeout_seconds
        endpoint = store_endpoint(reactor, url, timeout_seconds)
        #: For commands and scripts.
        self.commands = RedisConnection(
            endpoint,
            reactor,
            timeout_seconds,
            self._select,
            on_up=self._commands_up,
            name="commands",
            heartbeat_seconds=heartbeat,
        )
        #: Subscribed to C{channel}.
        self.events = RedisConnection(
            endpoint,
            reactor,
            timeout_seconds,
            self._subscribe,
            on_message=on_message,
            on_up=self._up,
            on_down=on_events_lost,
            name="events",
            heartbeat_seconds=heartbeat,
        )
        self.commands.service.setServiceParent(self)
        self.events.service.setServiceParent(self)

    def startService(self) -> None:
        self.log.info("rendezvous are kept in Redis at {url}", url=str(self._url))
        super().startService()  # type: ignore[no-untyped-call]

    @property
    def available(self) -> bool:
        """
        Whether both connections are up.
        """
        return self.commands.up and self.events.up

    def ready(self) -> Deferred[None]:
        """
        Fires once both connections are up.
        """
        if self.available:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready.append(d)
        return d

    def _authenticate(self, protocol: RedisProtocol) -> Deferred[Any]:
        url = self._url
        if url.password is None:
            return succeed(None)
        if url.username is None:
            return protocol.execute(b"AUTH", url.password)
        return protocol.execute(b"AUTH", url.username, url.password)

    def _select(self, protocol: RedisProtocol) -> Deferred[Any]:
        d = self._authenticate(protocol)
        if self._url.db:
            d.addCallback(lambda _: protocol.execute(b"SELECT", self._url.db))
        return d

    def _subscribe(self, protocol: RedisProtocol) -> Deferred[Any]:
        return self._authenticate(protocol).addCallback(
            lambda _: protocol.execute(b"SUBSCRIBE", self._channel)
        )

    def _commands_up(self) -> None:
        self._check_version()
        self._check_persistence()
        self._up()

    def _check_version(self) -> None:
        """
        Log an error if this Redis is older than 7.0, whose scripts
        (declared with a first line of flags) older ones cannot load.
        """

        def version(info: bytes) -> None:
            for line in info.splitlines():
                if line.startswith(b"redis_version:"):
                    found = line.partition(b":")[2].decode("ascii", "replace")
                    major = found.partition(".")[0]
                    if major.isdigit() and int(major) < 7:
                        self.log.error(
                            "Redis at {url} is version {version}: 7.0 or newer is needed, "
                            "and until then creates, writes and deletes fail (503)",
                            url=str(self._url),
                            version=found,
                        )

        # INFO may well not be granted (docs/scaling.md's ACL user): then the scripts'
        # own errors tell.
        self.commands.execute(b"INFO", b"server").addCallbacks(version, lambda _: None)

    def _check_persistence(self) -> None:
        """
        Warn if this Redis writes its data to disk: payloads must live in
        memory only (docs/scaling.md, "Redis settings").
        """

        def persists(replies: list[Any]) -> None:
            [(_, save), (_, appendonly)] = replies
            settings = dict(zip(save[::2], save[1::2], strict=True))
            settings.update(zip(appendonly[::2], appendonly[1::2], strict=True))
            if settings.get(b"save") or settings.get(b"appendonly") == b"yes":
                self.log.warn(
                    "Redis at {url} writes its data to disk (save {save!r}, appendonly "
                    '{appendonly!r}), payloads included; set save "" and appendonly no',
                    url=str(self._url),
                    save=settings.get(b"save", b"").decode("ascii", "replace"),
                    appendonly=settings.get(b"appendonly", b"").decode("ascii", "replace"),
                )

        def unknown(failure: Failure) -> None:
            self.log.info(
                "could not check whether Redis writes to disk ({error}); it must not",
                error=_first_error(failure).getErrorMessage(),
            )

        checks = [
            self.commands.execute(b"CONFIG", b"GET", b"save"),
            self.commands.execute(b"CONFIG", b"GET", b"appendonly"),
        ]
        DeferredList(checks, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
            persists, unknown
        )

    def _up(self) -> None:
        if self.available:
            ready, self._ready = self._ready, []
            for d in ready:
                d.callback(None)
