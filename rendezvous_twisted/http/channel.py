"""
The HTTP/1.1 channel: Twisted's, answering what it cannot parse with a JSON
400 like every other refusal, cutting requests whose headers or body come too
slowly, refusing a chunked body as it announces too much, and holding back a
pipelining peer that reads none of its answers.

It reaches its site through L{RequestSite}.  Where twisted.web has no public
hook it uses two private names, pinned by tests/test_http1_fence.py: it
overrides C{HTTPChannel._respondToBadRequestAndDisconnect} (the one place
every parse error is answered) and reads C{HTTPChannel._handlingRequest}
(whether a request is being answered).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    INegotiated,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel

from rendezvous_twisted.http import http1
from rendezvous_twisted.http.answers import Refusal, closing_answer
from rendezvous_twisted.http.clients import peer_host
from rendezvous_twisted.http.request import RendezvousRequest, RequestSite

#: The private Twisted names this module uses, each where twisted.web has no
#: public hook (pinned by tests/test_http1_fence.py): (owner, name).
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    # Overridden: the one place every parse error is answered (bare 400).
    ("twisted.web.http.HTTPChannel", "_respondToBadRequestAndDisconnect"),
    # Read: whether a request is being answered (bytes that come meanwhile
    # are the next request's, and start no header deadline).
    ("twisted.web.http.HTTPChannel", "_handlingRequest"),
)


class RendezvousChannel(HTTPChannel):
    """
    Twisted's HTTP/1.1 channel, answering the requests it cannot parse
    (malformed request line, header or framing) with a JSON 400 like every
    other refusal, rather than a bare status line; and cut when a request's
    headers or body arrive too slowly.  (Its connection is counted against
    the connection caps by L{_TrackedChannelProtocol}, which outlives it
    when the connection switches to HTTP/2.)

    Twisted's idle timeout is reset by every byte, so a client dribbling a
    byte at a time is never idle: the deadlines here run from the start of
    a request's headers and of its body, whatever arrives meanwhile.  They
    end when the request is handed to the resource, so a parked long-poll
    is never cut by them.
    """

    # Memory per parked connection: CPython keeps an instance's attributes
    # in a key table its class shares, which holds about 30 names, fewer
    # as instances are made; an instance that sets a name the table lacks
    # copies its attributes into a dict of its own (1.6 KB, against about
    # 0.3 KB).  Twisted's channel sets about 25 names in a request's life;
    # these five more (ours, and the limits set per site) took it past the
    # table, so every parked connection held such a dict.  In slots they
    # cost 8 bytes each.
    __slots__ = (
        "MAX_LENGTH",
        "_chunks",
        "_deadline",
        "_due",
        "_host",
        "_idle_at",
        "_peer",
        "_refusal",
        "_secure",
        "_timer",
        "_timer_at",
        "_transport_full",
        "_unread",
        "maxHeaders",
        "site",
        "totalHeadersSize",
    )

    site: RequestSite
    #: The timer of a connection refused or a peer not reading (not the
    #: deadlines below).
    _deadline: IDelayedCall | None
    #: The request deadline: when, of what ("headers", "body"), and its
    #: length in seconds.
    _due: tuple[float, str, float] | None
    #: When Twisted's idle timeout (C{timeOut}) closes the connection.
    _idle_at: float | None
    #: The one timer of both, and when it fires.
    _timer: IDelayedCall | None
    _timer_at: float
    #: While a chunked body comes: what its chunks announced.
    _chunks: http1.ChunkedAnnouncements | None
    #: For a connection the site refused: its refusal, waiting for the
    #: request's head, then answered.
    _refusal: http1.WaitingRefusal | None
    #: Whether the transport told us to pause: it holds more than its
    #: buffer's worth of answers the peer has not read.
    _transport_full: bool
    #: An answered request whose end (and so the next pipelined request)
    #: waits for the transport to write what it holds.
    _unread: http.Request | None
    _logger = Logger()

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._deadline = None
        self._due = None
        self._idle_at = None
        self._timer = None
        self._timer_at = 0.0
        self._chunks = None
        self._refusal = None
        self._transport_full = False
        self._unread = None
        self._secure: bool | None = None
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        # A slot hides its bases' class default: start from that default.
        self.totalHeadersSize = HTTPChannel.totalHeadersSize
        self.maxHeaders = HTTPChannel.maxHeaders
        self.MAX_LENGTH = HTTPChannel.MAX_LENGTH

    def isSecure(self) -> bool:
        # Asked twice per request by Klein, and answered by Twisted with an
        # adapter look-up on the transport each time; the transport is the
        # connection's for its whole life.
        secure = self._secure
        if secure is None:
            secure = self._secure = bool(super().isSecure())  # type: ignore[no-untyped-call]
        return secure

    def getPeer(self) -> IAddress:
        # Asked for every request (its client), and answered by the TCP
        # transport with a new address object each time; the peer is the
        # connection's for its whole life.
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()  # type: ignore[no-untyped-call]
        return peer

    def getHost(self) -> IAddress:
        # Asked for every request (its host), and answered by the TCP
        # transport with a getsockname() call and a new address object.
        host = self._host
        if host is None:
            host = self._host = super().getHost()  # type: ignore[no-untyped-call]
        return host

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would just hang up; say why, like every refusal.
        self._respondToBadRequestAndDisconnect()

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._arm(self.site.config.header_timeout_seconds, "headers")

    def refuse(self, refusal: Refusal, wait: bool) -> None:
        """
        Answer a connection the site did not admit with C{refusal}, and
        close it.  When C{wait}, the answer comes once the request's head
        is in (or at the header deadline, or past max_header_bytes), as a
        client that sends its request before it reads expects: an answer
        written before would be followed by a close that makes its sending
        fail.  Else it is written at once.  Nothing the connection sends is
        ever parsed or served.
        """
        waiting = http1.WaitingRefusal(refusal, self.site.config.max_header_bytes)
        self._refusal = waiting
        # Our deadlines, not Twisted's idle timeout, bound it from now on.
        self.setTimeout(None)
        if wait:
            return  # the header deadline, armed at connectionMade, bounds it
        waiting.answered = True
        assert self.transport is not None
        self.transport.write(refusal.http11())
        # Not counted anywhere, so bounded in time: a TLS close waits for
        # the peer's close_notify, which a peer that neither reads nor
        # closes never sends (armed first: a close may be reported at once).
        self._disarm()
        self._deadline = self.site.reactor.callLater(http1.LINGER_SECONDS, self._linger_over)
        self.loseConnection()  # type: ignore[no-untyped-call]

    def answer_refusal(self) -> None:
        """
        Write the refusal of a refused connection that waited for its
        request, then close once its client has read the answer and closed
        its end, or after L{http1.LINGER_SECONDS}, whichever is first.
        """
        waiting = self._refusal
        assert waiting is not None
        assert not waiting.answered
        waiting.answered = True
        self._disarm()
        transport = self.transport
        assert transport is not None
        transport.write(waiting.refusal.http11())
        # Armed first: a close may be reported at once.
        self._deadline = self.site.reactor.callLater(http1.LINGER_SECONDS, self._linger_over)
        # Say at once that no more is coming.
        if INegotiated.providedBy(transport):
            # TLS: its close_notify, once what is written has gone; it then
            # reads on until the peer's.  A TLS transport provides the
            # interfaces of the TCP one below it, and hands it
            # loseWriteConnection: that half-close under TLS, which
            # Twisted's TLS does not expect, lost the answer (curl: "Empty
            # reply from server") and logged an Unhandled Error.
            self.loseConnection()  # type: ignore[no-untyped-call]
        elif ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()

    def _linger_over(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        waiting = self._refusal
        if waiting is not None:
            # Refused: only the end of the request's head matters.
            if waiting.head_complete(data):
                self.answer_refusal()
            return
        # The first byte of a request starts its headers' deadline; bytes
        # that arrive while a request is handled are the next request's,
        # buffered until that one is done.
        if self._due is None and not self._handlingRequest:
            self._arm(self.site.config.header_timeout_seconds, "headers")
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        self._disarm()
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        assert self.transport is not None
        if self.length != 0 and not getattr(self.transport, "disconnecting", False):
            self._arm(self.site.config.body_timeout_seconds, "body")
            if self.length is None:
                # Chunked: its length is only known as its chunks announce it.
                self._chunks = http1.ChunkedAnnouncements()

    def rawDataReceived(self, data: bytes) -> None:
        chunks = self._chunks
        if chunks is not None and chunks.feed(data) > self.site.max_body_bytes:
            # A chunk announced more than the limit: refuse it now, not once
            # its bytes have come (or at the body deadline, if they never do).
            self._chunks = None
            request = self.requests[-1]
            assert isinstance(request, RendezvousRequest)
            if not request._refused:
                request._refuse_oversize()
            return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        self._chunks = None
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.stop_deadlines()
        self._unread = None
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    # A peer that pipelines requests and does not read the answers.

    def pauseProducing(self) -> None:
        self._transport_full = True
        super().pauseProducing()  # type: ignore[no-untyped-call]

    def resumeProducing(self) -> None:
        self._transport_full = False
        super().resumeProducing()  # type: ignore[no-untyped-call]
        request, self._unread = self._unread, None
        if request is not None:
            self._disarm()
            super().requestDone(request)  # type: ignore[no-untyped-call]

    def requestDone(self, request: http.Request) -> None:
        # Twisted goes on to the next pipelined request at once, whatever
        # the transport holds: a peer that sent a read's worth of GETs (64
        # KiB, some 1500 of them) and read nothing had every answer held
        # (10 MB a connection at --max-bytes 10240).  While the transport
        # is full the next request waits for it to write what it holds,
        # for at most the idle timeout.
        transport: Any = self.transport
        if self._transport_full and self.persistent and not transport.disconnecting:
            self._unread = request
            self._disarm()
            self._deadline = self.site.reactor.callLater(
                self.site.config.idle_timeout_seconds, self._answers_not_read
            )
            return
        super().requestDone(request)  # type: ignore[no-untyped-call]

    def _answers_not_read(self) -> None:
        self._deadline = None
        self._unread = None
        seconds = self.site.config.idle_timeout_seconds
        assert self.transport is not None
        self._logger.info(
            "closing a connection from {client}: its answers not read in {seconds}s",
            client=peer_host(self.transport.getPeer()) or "-",
            seconds=seconds,
        )
        self.site.refused("slow")
        # Close once what it holds is written, and abort a peer that still
        # does not read; the requests it pipelined are not answered.
        self.timeoutConnection()  # type: ignore[no-untyped-call]

    # Deadlines.  The request deadline (L{_arm}) and Twisted's idle timeout
    # (TimeoutMixin's setTimeout and resetTimeout, overridden here) share
    # one timer per connection, which checks them when it fires: setting a
    # deadline stores its time, ending it forgets it.  The timer fires at
    # the first deadline or before, then is set again for what remains; it
    # never fires later than the shortest timeout after it was set, so a
    # deadline set since is never before it.  A timer set and cancelled per
    # request for each cost about 9 % of a GET's instructions.

    def setTimeout(self, period: float | None) -> float | None:
        previous: float | None = self.timeOut
        self.timeOut = period  # type: ignore[assignment]  # seconds, typed int by Twisted
        if period is None:
            self._idle_at = None
        else:
            now = self.site.reactor.seconds()
            self._idle_at = now + period
            self._wake_by(now, now + period)
        return previous

    def resetTimeout(self) -> None:
        # Every byte received puts the idle deadline back, as TimeoutMixin
        # does: later, never sooner, so the timer is left as it is.
        if self._idle_at is not None and self.timeOut is not None:
            self._idle_at = self.site.reactor.seconds() + self.timeOut

    def stop_deadlines(self) -> None:
        """
        End every deadline and timer: the connection is lost, or has
        switched to HTTP/2 and this channel never sees another byte.
        """
        self._disarm()
        self._idle_at = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        now = self.site.reactor.seconds()
        self._due = (now + seconds, what, seconds)
        self._wake_by(now, now + seconds)

    def _disarm(self) -> None:
        self._due = None
        deadline = self._deadline
        if deadline is not None:
            self._deadline = None
            if deadline.active():
                deadline.cancel()

    def _wake_by(self, now: float, at: float) -> None:
        """
        Have the timer fire at C{at} or before.
        """
        timer = self._timer
        if timer is None:
            config = self.site.config
            shortest = min(
                config.header_timeout_seconds,
                config.body_timeout_seconds,
                config.idle_timeout_seconds,
            )
            self._timer_at = fire = min(at, now + shortest)
            # The site's reactor: the one Twisted gives this channel's timeouts.
            reactor: IReactorTime = self.site.reactor
            self._timer = reactor.callLater(fire - now, self._deadlines_passed)
        elif at < self._timer_at:
            # Only for a timeout shorter than the site's.
            self._timer_at = at
            timer.reset(at - now)

    def _deadlines_passed(self) -> None:
        self._timer = None
        # The time it was set for counts as passed, should the reactor's
        # arithmetic make it fire a rounding error before.
        now = max(self.site.reactor.seconds(), self._timer_at)
        due = self._due
        if due is not None and due[0] <= now:
            self._due = None
            self._too_slow(due[1], due[2])
        idle = self._idle_at
        if idle is not None and idle <= now:
            self._idle_at = None
            self.timeoutConnection()  # type: ignore[no-untyped-call]
        due, idle = self._due, self._idle_at
        if due is not None:
            self._wake_by(now, due[0] if idle is None else min(due[0], idle))
        elif idle is not None:
            self._wake_by(now, idle)

    def _too_slow(self, what: str, seconds: float) -> None:
        assert self.transport is not None
        if getattr(self.transport, "disconnecting", False):
            return  # already refused (400, 413) and closing
        if self._refusal is not None:
            # Refused, and its request never came whole: answer anyway.
            self.answer_refusal()
            return
        self._logger.info(
            "closing a connection from {client}: request {what} not complete in {seconds}s",
            client=peer_host(self.transport.getPeer()) or "-",
            what=what,
            seconds=seconds,
        )
        self.site.refused("slow")
        unit = "second" if seconds == 1 else "seconds"
        self.transport.write(
            closing_answer(
                408,
                "M_REQUEST_TIMEOUT",
                f"the request {what} did not arrive within {seconds:g} {unit}",
            )
        )
        # As Twisted's own idle timeout: close, and abort a peer that does
        # not read its answer; that idle timeout, still armed, must not do
        # it again (its second abort of a TLS transport raised).
        self.setTimeout(None)
        self.timeoutConnection()  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._disarm()
        assert self.transport is not None
        self._logger.info(
            "answering an unparseable request from {client} with 400",
            client=peer_host(self.transport.getPeer()) or "-",
        )
        self.site.refused("malformed")
        self.transport.write(closing_answer(400, "M_BAD_REQUEST", "malformed HTTP request"))
        self.loseConnection()  # type: ignore[no-untyped-call]
