"""
The site: the routes behind their guard, the connections it admitted, the
requests in flight, the access log, and a graceful stop (L{RendezvousSite.drain}).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site

from rendezvous_twisted.http import access, http1, wire
from rendezvous_twisted.http.answers import Refusal
from rendezvous_twisted.http.channel import RendezvousChannel
from rendezvous_twisted.http.guard import Guard
from rendezvous_twisted.http.request import RendezvousRequest, client_address
from rendezvous_twisted.http.wire import Admitted, SiteConnection
from rendezvous_twisted.words import quantity


def redact(rendezvous_id: str) -> str:
    """
    A short, stable stand-in for an id in logs.  Ids are bearer secrets and
    never appear in full outside a client's own requests.
    """
    return hashlib.blake2b(rendezvous_id.encode("utf-8", "replace"), digest_size=4).hexdigest()


class RendezvousSite(Site):
    """
    The C{Site} of the routes, behind their L{Guard}: its requests enforce
    the body limit, and its access log shows ids only as short hashes.  It
    keeps count of its open connections and of the requests being answered,
    so that L{drain} can stop gracefully.  Its connections (L{SiteConnection})
    and requests reach it through the typed interfaces L{ConnectionSite} and
    L{RequestSite}.
    """

    requestFactory = RendezvousRequest
    # No "Starting factory <...RendezvousSite object at 0x...>" lines: the
    # listeners say where they serve (ListenerService).
    noisy = False
    # Not "log": Site.log is the access log's method.
    _logger = Logger()

    def protocol(self) -> SiteConnection:  # type: ignore[override]
        # Our channel for HTTP/1.x; the protocol switches to HTTP/2 when TLS
        # negotiates it.
        channel = RendezvousChannel()
        channel.totalHeadersSize = self.config.max_header_bytes
        channel.maxHeaders = self.config.max_headers
        # One header line can never be longer than all of them.
        channel.MAX_LENGTH = self.config.max_header_bytes
        return SiteConnection(channel)

    def __init__(
        self,
        routes: IResource,
        guard: Guard,
        reactor: Any = None,
        access_log: bool = True,
        public_paths: Collection[bytes] = (b"/",),
    ) -> None:
        """
        @param routes: the resource of the routes (the Klein app's), served
            behind C{guard}.
        @param public_paths: the paths the access log shows as they are,
            since they hold no secret; every other path is hashed.
        """
        config = guard.config
        super().__init__(  # type: ignore[no-untyped-call]
            guard.resource(routes),
            reactor=reactor,
            timeout=config.idle_timeout_seconds,
            # Twisted would parse a POST's body as a form when its
            # Content-Type names one, for request.args, which nothing here
            # reads: a payload is opaque bytes, whatever type it claims.
            # Its parser also raised on a Content-Type holding a character
            # that Python's email package reads as a line break (\x0b, \x0c,
            # \x1c-\x1e, \x85), so that the request was never answered.
            parsePOSTFormSubmission=False,
        )
        self.guard = guard
        self.max_body_bytes = config.max_bytes
        self.metrics = guard.metrics
        self.access_log = access_log
        self._public_paths = frozenset(public_paths)
        #: Requests whose answer is not finished yet (parked ones included).
        self.in_flight = 0
        self._connections: set[SiteConnection] = set()
        self._closing: set[SiteConnection] = set()
        self._watched: set[SiteConnection] = set()
        self._draining: Deferred[None] | None = None
        self.config = config

    @property
    def admission(self) -> http1.Admission:
        """
        The connection caps and counts (the guard's).
        """
        return self.guard.admission

    @property
    def connection_count(self) -> int:
        """
        Open connections that were admitted (refused ones are not).
        """
        return self.admission.count

    @property
    def saturated(self) -> bool:
        """
        Whether new connections are refused at the global cap (see
        L{http1.Admission}): what C{/health} tells a balancer.
        """
        return self.admission.saturated

    def admit(self, peer: IAddress) -> Admitted | Refusal:
        """
        Count a new connection from C{peer}, or refuse it (see
        L{Guard.admit_connection}).
        """
        return self.guard.admit_connection(peer)

    def wait_refused(self) -> bool:
        return self.admission.wait()

    def done_waiting(self) -> None:
        self.admission.done_waiting()

    def make_h2(self, refusal: Refusal | None) -> Any:
        """
        The HTTP/2 connection a connection switches to, with this site's
        limits; C{refusal} answers its first stream if it was refused.
        """
        assert wire.http2 is not None, "only switched to when h2 is importable"
        config = self.config
        limits = wire.http2.Limits(
            max_streams=config.max_streams_per_connection,
            max_header_bytes=config.max_header_bytes,
            max_body_bytes=self.max_body_bytes,
            header_timeout_seconds=config.header_timeout_seconds,
            body_timeout_seconds=config.body_timeout_seconds,
            idle_timeout_seconds=config.idle_timeout_seconds,
            max_headers=config.max_headers,
        )
        return wire.http2.LimitedH2Connection(self, limits, refusal)

    def refused(self, reason: str) -> None:
        """
        Count a refusal made on a connection, below the resource.
        """
        self.metrics.refused(reason)

    def error_answer(
        self, status: int, errcode: str, message: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """
        The headers (those of every answer first, and Date) and the JSON
        body of an error answered below the resource.
        """
        answer = Refusal(status, errcode, message, tuple(headers))
        fields = [*answer.response_headers(), (b"Date", http.datetimeToString())]
        return fields, answer.body()

    def release(self, key: str | None) -> None:
        """
        Forget a connection that L{admit} counted.
        """
        self.guard.release_connection(key)

    def answered_below(self, method: bytes, status: int, started: float | None) -> None:
        duration = self.reactor.seconds() - started if started is not None else 0.0
        self.metrics.request_done(method, status, duration)

    def buildProtocol(self, addr: Any) -> Any:
        if self._draining is not None:
            # Accepted as the listeners stopped: closed unanswered, since
            # nothing would close it before the drain's deadline.
            return None
        protocol = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if protocol is not None:
            self._connections.add(protocol)
        return protocol

    def log(self, request: http.Request) -> None:
        """
        Count every answered request, and log it (unless the access log is
        off) as one structured event: client, method, path with any id
        redacted, protocol, status, length and duration.  No query, no
        referrer, no agent: nothing a client could use to smuggle a secret
        or a forged line into the log.
        """
        started = getattr(request, "started", None)
        duration = self.reactor.seconds() - started if started is not None else 0.0
        self.metrics.request_done(request.method, request.code, duration)
        if not self.access_log:
            return
        raw_path = request.path
        path = raw_path.decode("ascii", "backslashreplace")
        # Every path but the public ones may hold an id.
        if raw_path not in self._public_paths:
            path = "/~" + redact(path.removeprefix("/"))
        access.emit(
            client=client_address(cast(IRequest, request)) or "-",
            method=request.method.decode("ascii", "backslashreplace"),
            path=path,
            protocol=request.clientproto.decode("ascii", "backslashreplace"),
            status=request.code,
            length=request.sentLength,
            duration_ms=duration * 1000,
        )

    def request_started(self) -> None:
        self.in_flight += 1

    def request_ended(self) -> None:
        self.in_flight -= 1
        self._check_drained()

    def connection_lost(self, protocol: SiteConnection) -> None:
        self._connections.discard(protocol)
        self._closing.discard(protocol)
        self._check_drained()

    def drain(self, clock: Any, timeout_seconds: float) -> Deferred[None]:
        """
        Stop gracefully: let every request being answered finish, then close
        every connection once its answers are written.  Fires when all are
        closed, or after C{timeout_seconds}, when the rest are aborted.
        Call it once the listeners stopped accepting.
        """
        self._draining = Deferred()
        drained = self._draining
        deadline = clock.callLater(timeout_seconds, self._abort_all)
        self._logger.info(
            "draining: {in_flight} in flight on {open}",
            in_flight=quantity(self.in_flight, "request"),
            open=quantity(len(self._connections), "connection"),
            requests=self.in_flight,
            connections=len(self._connections),
        )

        def done(result: None) -> None:
            if deadline.active():
                deadline.cancel()

        drained.addCallback(done)
        self._check_drained()
        return drained

    def _check_drained(self) -> None:
        if self._draining is None or self._draining.called:
            return
        for protocol in list(self._connections):
            if protocol in self._closing:
                continue
            if protocol.busy():
                self._recheck_after_streams(protocol)
                continue
            # Nothing is being asked or answered on it: close it, which lets
            # the transport write what it holds first.
            if protocol.transport is not None:
                self._closing.add(protocol)
                protocol.close_idle()
        # A transport may report its loss inside loseConnection (a half-
        # closed TCP one does), which looked again and may have ended it.
        if not self._connections and not self._draining.called:
            self._draining.callback(None)

    def _recheck_after_streams(self, protocol: SiteConnection) -> None:
        # An HTTP/2 stream outlives its request: the connection sends its end
        # a reactor turn later, then forgets it.  Look again once it has
        # forgotten them all.  (HTTP/1.1 requests are forgotten before their
        # request_ended, which looks again by itself.)
        if protocol not in self._watched:
            self._watched.add(protocol)
            protocol.when_idle(lambda: self._recheck(protocol))

    def _recheck(self, protocol: SiteConnection) -> None:
        self._watched.discard(protocol)
        self._check_drained()

    def _abort_all(self) -> None:
        self._logger.warn(
            "shutdown timeout: aborting {in_flight} on {open}",
            in_flight=quantity(self.in_flight, "request"),
            open=quantity(len(self._connections), "connection"),
            requests=self.in_flight,
            connections=len(self._connections),
        )
        for protocol in list(self._connections):
            transport: Any = protocol.transport
            if transport is not None:
                transport.abortConnection()
        self._connections.clear()
        if self._draining is not None and not self._draining.called:
            self._draining.callback(None)
