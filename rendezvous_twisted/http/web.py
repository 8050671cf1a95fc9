"""
The HTTP face of the store: a Klein app, the request class that enforces the
body limit as bytes arrive, and the one place where headers are applied and
domain errors become status codes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from io import BytesIO
from typing import Any, cast

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
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
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request, Site
from werkzeug.exceptions import HTTPException as WerkzeugHTTPException

from rendezvous_twisted.core import conditions
from rendezvous_twisted.core.conditions import ANY
from rendezvous_twisted.core.config import MSC4108_MAX_BYTES, Config
from rendezvous_twisted.core.metrics import Metrics
from rendezvous_twisted.core.ratelimit import RateLimiter
from rendezvous_twisted.core.store import (
    Full,
    NotFound,
    PreconditionFailed,
    RendezvousError,
    RendezvousStore,
    StoreUnavailable,
    TooLarge,
    Version,
    Wakeup,
)
from rendezvous_twisted.http import access, http1, wire

# Named here too (they were defined here before answers.py held them).
from rendezvous_twisted.http.answers import EVERY_RESPONSE as EVERY_RESPONSE
from rendezvous_twisted.http.answers import JSON as JSON
from rendezvous_twisted.http.answers import PREFLIGHT as PREFLIGHT
from rendezvous_twisted.http.answers import Refusal, phrase
from rendezvous_twisted.http.answers import closing_answer as _closing_answer
from rendezvous_twisted.http.answers import error_body as error_body
from rendezvous_twisted.http.clients import Client, ClientResolver, peer_host
from rendezvous_twisted.protocols import msc4108
from rendezvous_twisted.words import quantity

OCTET_STREAM = b"application/octet-stream"
#: Statuses whose answer has no body and so no Content-Length (RFC 9110 8.6).
NO_BODY = frozenset((204, 304))

ALLOW_ROOT = b"POST, OPTIONS"
ALLOW_RENDEZVOUS = b"GET, PUT, DELETE, OPTIONS"
#: What OPTIONS * (about the server as a whole) answers it allows.
ALLOW_SERVER = b"GET, PUT, POST, DELETE, OPTIONS"

# Ids are minted by secrets.token_urlsafe(16): 22 URL-safe characters.  A
# little slack costs nothing; anything else can never name a rendezvous.
_ID = re.compile(r"[A-Za-z0-9_-]{16,64}\Z")
# The control characters (RFC 5234 CTL) but horizontal tab.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A Host header fit to build a URL from: a name or IPv4 address, or an IPv6
# literal, and an optional port.  Anything else falls back to our own address.
_HOST = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")


def redact(rendezvous_id: str) -> str:
    """
    A short, stable stand-in for an id in logs.  Ids are bearer secrets and
    never appear in full outside a client's own requests.
    """
    return hashlib.blake2b(rendezvous_id.encode("utf-8", "replace"), digest_size=4).hexdigest()


def prefer_wait(values: Sequence[bytes] | None) -> float | None:
    """
    The C{wait} preference of RFC 7240 (C{Prefer: wait=10}), in seconds, or
    None.  Only the first C{wait} counts, and one whose value is not a
    plain number of seconds is ignored, as any preference may be.
    """
    for preference in b",".join(values or ()).split(b","):
        name, _, value = preference.partition(b";")[0].partition(b"=")
        if name.strip(b" \t").lower() == b"wait":
            seconds = value.strip(b" \t")
            if seconds[:1] == b'"' == seconds[-1:]:
                seconds = seconds[1:-1]
            return float(seconds) if seconds.isdigit() and len(seconds) <= 10 else None
    return None


def client_address(request: IRequest) -> str | None:
    """
    The client's address as the logs show it: the client a trusted proxy
    named, once the API has resolved it, else the peer's IP address; None
    on a transport without one (a UNIX socket).  The one place that decides
    it for logs.
    """
    resolved = getattr(request, "client", None)
    if isinstance(resolved, Client) and resolved.address is not None:
        return str(resolved.address)
    return peer_host(request.getClientAddress())


@lru_cache(maxsize=1024)
def _date_of_second(second: int) -> bytes:
    date: bytes = http.datetimeToString(second)
    return date


def _http_date(seconds: float) -> bytes:
    # An HTTP-date names a whole second, and the few seconds that answers
    # name (now, and the expiry and last write of live rendezvous) repeat
    # across many requests: format each once.
    return _date_of_second(int(seconds))



class HTTPError(Exception):
    """
    A refusal that belongs to HTTP rather than to the store.
    """

    code = 400
    errcode = "M_BAD_REQUEST"
    headers: tuple[tuple[bytes, bytes], ...] = ()


class BadRequestError(HTTPError):
    def __init__(self, errcode: str, message: str) -> None:
        super().__init__(message)
        self.errcode = errcode


class ForbiddenError(HTTPError):
    code = 403
    errcode = "M_FORBIDDEN"


class UnknownPathError(HTTPError):
    code = 404
    errcode = "M_UNRECOGNIZED"

    def __init__(self) -> None:
        super().__init__("no such endpoint")


class PayloadTooLargeError(HTTPError):
    code = 413
    errcode = "M_TOO_LARGE"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the payload is over {max_bytes} bytes")


class RateLimitedError(HTTPError):
    code = 429
    errcode = "M_LIMIT_EXCEEDED"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.headers = ((b"Retry-After", b"%d" % retry_after_seconds),)


class MethodNotAllowedError(HTTPError):
    code = 405
    errcode = "M_UNRECOGNIZED"

    def __init__(self, allow: bytes, message: str = "method not allowed here") -> None:
        super().__init__(message)
        self.headers = ((b"Allow", allow),)


class RendezvousRequest(Request):
    """
    A request that enforces the payload limit before and while its body is
    read (C{twisted.web} reads a whole body before any resource runs, so no
    route could), and that never spools a body to disk.
    """

    # A slot, not one more name in the instance dict: with it a request
    # would outgrow the key table its class shares (see RendezvousChannel).
    # Unset until the headers are in.
    __slots__ = ("_in_flight",)
    #: The site that counts this request in flight, until it ends.
    _in_flight: RendezvousSite | None

    _refused = False
    #: When the request's headers were in, on the site's reactor.
    started: float | None = None
    #: Who sent it, once L{RendezvousAPI} has resolved it (for limits, the
    #: access log and the Location scheme).
    client: Client | None = None
    #: Why its line or headers break RFC 9112's rules (L{http1.check_request}),
    #: for the 400 that answers it before any route; None for most.
    problem: str | None = None

    @property
    def _max_bytes(self) -> int:
        site: RendezvousSite = cast(Any, self.channel).site
        return site.max_body_bytes

    def gotLength(self, length: int | None) -> None:
        # The headers are in: from now until it is answered (or its
        # connection is lost) this request is in flight, and a graceful stop
        # waits for it, its body upload included.
        site: RendezvousSite = cast(Any, self.channel).site
        self.started = site.reactor.seconds()
        site.request_started()
        # Until _cleanup or connectionLost, whichever comes first (where
        # notifyFinish() would fire): a flag, not a Deferred and a closure
        # per request, which a parked request would hold all the while.
        self._in_flight = site
        # Twisted spools bodies of unknown or large length to a temporary
        # file; ours are small and must never touch a disk.
        self.content = BytesIO()
        if length is not None and length > self._max_bytes:
            self._refuse_oversize()

    def _cleanup(self) -> None:
        super()._cleanup()  # type: ignore[no-untyped-call]
        self._ended()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        self._ended()

    def _ended(self) -> None:
        # Answered or abandoned: no longer in flight, once.
        site = getattr(self, "_in_flight", None)
        if site is not None:
            self._in_flight = None
            site.request_ended()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        content = self.content
        assert content is not None, "gotLength() comes first"
        if content.tell() + len(data) > self._max_bytes:
            self._refuse_oversize()
            return
        content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # Called for HTTP/1.x and HTTP/2 alike, once the body is in.  Route
        # an absolute-form target on its path, with its authority as the
        # Host (RFC 9112 3.2.2); a target or Host that breaks the rules is
        # answered 400 by the resource, before any route.
        try:
            target = http1.check_request(command, path, version, self.requestHeaders)
        except http1.TargetError as problem:
            self.problem = str(problem)
        else:
            path = target.path
            if target.authority is not None:
                self.requestHeaders.setRawHeaders(b"Host", [target.authority])
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def process(self) -> None:
        if self._refused:
            return
        if self.path != http1.ASTERISK:
            super().process()  # type: ignore[no-untyped-call]
            return
        # Twisted answers "OPTIONS *" (and refuses any other method with a
        # "*" target) itself, in its own words and without the headers of
        # every answer: send it to the resource like any other request.
        self.site = cast(Any, self.channel).site
        self.prepath, self.postpath = [], []
        self.setHeader(b"Date", http.datetimeToString())  # type: ignore[no-untyped-call]
        try:
            self.render(self.site.resource)  # type: ignore[no-untyped-call]
        except Exception:
            self.processingFailed(Failure())  # type: ignore[no-untyped-call]

    def _refuse_oversize(self) -> None:
        """
        Answer 413 now, before the rest of the body, and close the
        connection: its remaining bytes can no longer be framed.
        """
        self._refused = True
        self.content = BytesIO()
        # The access log never sees this request (it never finishes).
        self._log.info(
            "refused a body over {max_bytes} bytes from {client}",
            max_bytes=self._max_bytes,
            client=client_address(self) or "-",
        )
        site: RendezvousSite = cast(Any, self.channel).site
        site.metrics.refused("too_large")
        # Twisted would otherwise invite the body with "100 Continue".
        self.requestHeaders.removeHeader(b"Expect")
        if not isinstance(self.channel, http.HTTPChannel):
            # HTTP/2: answer on this stream alone, once the connection has
            # registered it (this runs while the stream is being made); the
            # connection and its other streams go on.
            site.reactor.callLater(
                0,
                self.refuse_on_stream,
                413,
                "M_TOO_LARGE",
                f"the payload is over {self._max_bytes} bytes",
            )
            return
        # The method is only set once the whole body is in; the channel has
        # already parsed it from the request line.
        method = getattr(self.channel, "_command", None) or self.method
        site.metrics.request_done(method, 413, site.reactor.seconds() - (self.started or 0))
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            _closing_answer(
                413,
                "M_TOO_LARGE",
                f"the payload is over {self._max_bytes} bytes",
            )
        )
        transport.loseConnection()

    def refuse_on_stream(self, code: int, errcode: str, message: str) -> None:
        """
        Answer an HTTP/2 request refused before its body was all in (413
        oversize, 408 too slow) through this request, as any other answer
        (so the access log and metrics see it).  Its stream alone ends; the
        connection goes on.
        """
        if self.finished or self._disconnected:
            return
        self._refused = True
        stream = cast(Any, self.channel)
        # Set here if the request line's fields have not come in yet (they
        # come with the whole body).
        if getattr(self, "path", None) is None:
            self.method = stream.command or self.method
            self.uri = self.path = stream.path or b"/"
            self.clientproto = b"HTTP/2"
        answer = Refusal(code, errcode, message)
        self.setResponseCode(code)
        for name, value in answer.response_headers():
            self.responseHeaders.setRawHeaders(name, [value])
        self.write(answer.body())  # type: ignore[no-untyped-call]
        self.finish()  # type: ignore[no-untyped-call]


class RendezvousChannel(http.HTTPChannel):
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
        "_refusal",
        "_transport_full",
        "_unread",
        "maxHeaders",
        "site",
        "totalHeadersSize",
    )

    site: RendezvousSite
    _deadline: IDelayedCall | None
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
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._deadline = None
        self._chunks = None
        self._refusal = None
        self._transport_full = False
        self._unread = None
        # A slot hides its bases' class default: start from that default.
        self.totalHeadersSize = http.HTTPChannel.totalHeadersSize
        self.maxHeaders = http.HTTPChannel.maxHeaders
        self.MAX_LENGTH = http.HTTPChannel.MAX_LENGTH

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
        self.setTimeout(None)  # type: ignore[no-untyped-call]
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
        if self._deadline is None and not self._handlingRequest:
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
        self._disarm()
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
        self._log.info(
            "closing a connection from {client}: its answers not read in {seconds}s",
            client=peer_host(self.transport.getPeer()) or "-",
            seconds=seconds,
        )
        self.site.metrics.refused("slow")
        # Close once what it holds is written, and abort a peer that still
        # does not read; the requests it pipelined are not answered.
        self.timeoutConnection()  # type: ignore[no-untyped-call]

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        # The site's reactor: the one Twisted gives this channel's timeouts.
        reactor: IReactorTime = self.site.reactor
        self._deadline = reactor.callLater(seconds, self._too_slow, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, what: str, seconds: float) -> None:
        self._deadline = None
        assert self.transport is not None
        if getattr(self.transport, "disconnecting", False):
            return  # already refused (400, 413) and closing
        if self._refusal is not None:
            # Refused, and its request never came whole: answer anyway.
            self.answer_refusal()
            return
        self._log.info(
            "closing a connection from {client}: request {what} not complete in {seconds}s",
            client=peer_host(self.transport.getPeer()) or "-",
            what=what,
            seconds=seconds,
        )
        self.site.metrics.refused("slow")
        unit = "second" if seconds == 1 else "seconds"
        self.transport.write(
            _closing_answer(
                408,
                "M_REQUEST_TIMEOUT",
                f"the request {what} did not arrive within {seconds:g} {unit}",
            )
        )
        # As Twisted's own idle timeout: close, and abort a peer that does
        # not read its answer; that idle timeout, still armed, must not do
        # it again (its second abort of a TLS transport raised).
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        self.timeoutConnection()  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._disarm()
        assert self.transport is not None
        self._log.info(
            "answering an unparseable request from {client} with 400",
            client=peer_host(self.transport.getPeer()) or "-",
        )
        self.site.metrics.refused("malformed")
        self.transport.write(
            _closing_answer(400, "M_BAD_REQUEST", "malformed HTTP request")
        )
        self.loseConnection()  # type: ignore[no-untyped-call]


class _TrackedChannelProtocol(wire.SwitchingProtocol):
    """
    One connection: HTTP/1.1 through L{RendezvousChannel}, or HTTP/2 (when
    TLS negotiated "h2") through L{http2.LimitedH2Connection}, which bounds
    its streams, header blocks, bodies and deadlines.  It lives as long as
    its connection, across the switch, so it is what the site counts
    against the connection caps (admitted when made, released when lost)
    and what tells the site when its connection is gone, so that a graceful
    stop knows what is still open.

    A connection refused at the caps is answered with its L{Refusal} once
    it has asked: over HTTP/1.1 by its channel, after the request's head;
    over HTTP/2 on its first stream, then GOAWAY, within the header
    deadline.
    """

    #: Whether this connection was admitted and is counted by the site.
    _admitted = False
    #: The key it is counted under per address; None for trusted proxies
    #: and peers without an IP address.
    _connection_key: str | None = None
    #: Whether it was refused and counted among those waiting for their
    #: request (L{http1.Admission.wait}) until it is lost.
    _waiting = False
    #: A refused TLS connection's refusal, for its first HTTP/2 stream should
    #: it speak HTTP/2.
    _refusal: Refusal | None = None

    http11: RendezvousChannel
    site: RendezvousSite

    def makeConnection(self, transport: Any) -> None:
        site = self.site
        refusal = site.admit(self, transport.getPeer())
        super().makeConnection(transport)
        if refusal is not None:
            self._waiting = site.admission.wait()
            if self._waiting and wire.H2_AVAILABLE and hasattr(transport, "negotiatedProtocol"):
                # TLS: which protocol it speaks is known with its first
                # bytes.  Until then the HTTP/1.1 channel waits, within its
                # header deadline.
                self._refusal = refusal
            self.http11.refuse(refusal, self._waiting)

    def dataReceived(self, data: bytes) -> None:
        if not self._admitted and self.http2 is None:
            waiting = self.http11._refusal
            pending = waiting is not None and not waiting.answered
            if self._refusal is not None and pending and self.negotiated() == b"h2":
                # Its first stream gets the refusal (see make_h2).
                super().dataReceived(data)
                return
            # The HTTP/1.1 channel waits for the request's head and answers;
            # nothing it sends is ever served.
            self._refusal = None
            self.http11.dataReceived(data)
            return
        super().dataReceived(data)

    def switching(self) -> None:
        # The HTTP/1.1 channel is put away, never to see connectionLost:
        # its deadline would write an HTTP/1.1 408 into HTTP/2.
        self.http11._disarm()

    def make_h2(self) -> Any:
        refusal, self._refusal = self._refusal, None
        return self.site.make_h2(refusal)

    def close_idle(self) -> None:
        waiting = self.http11._refusal if self.http2 is None else None
        if waiting is not None and not waiting.answered:
            # Refused, and still waiting for its request: answered, not dropped.
            self.http11.answer_refusal()
            return
        super().close_idle()

    def connectionLost(self, reason: Failure = wire.connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            site = self.site
            if self._admitted:
                self._admitted = False
                site.release(self._connection_key)
            if self._waiting:
                self._waiting = False
                site.admission.done_waiting()
            site.connection_lost(self)


class RendezvousSite(Site):
    """
    The C{Site} for L{RendezvousAPI}: its requests enforce the body limit,
    and its access log shows ids only as short hashes.  It keeps count of
    its open connections and of the requests being answered, so that
    L{drain} can stop gracefully.
    """

    requestFactory = RendezvousRequest
    # No "Starting factory <...RendezvousSite object at 0x...>" lines: the
    # listeners say where they serve (ListenerService).
    noisy = False
    # Not "log": Site.log is the access log's method.
    _logger = Logger()

    def protocol(self) -> _TrackedChannelProtocol:  # type: ignore[override]
        # Our channel for HTTP/1.x; the protocol switches to HTTP/2 when TLS
        # negotiates it.
        channel = RendezvousChannel()
        channel.totalHeadersSize = self.config.max_header_bytes
        channel.maxHeaders = self.config.max_headers
        # One header line can never be longer than all of them.
        channel.MAX_LENGTH = self.config.max_header_bytes
        return _TrackedChannelProtocol(channel)

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        reactor: Any = None,
        config: Config | None = None,
        clients: ClientResolver | None = None,
        metrics: Metrics | None = None,
        access_log: bool = True,
    ) -> None:
        config = config if config is not None else Config()
        super().__init__(  # type: ignore[no-untyped-call]
            resource,
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
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics or Metrics()
        self.access_log = access_log
        #: Requests whose answer is not finished yet (parked ones included).
        self.in_flight = 0
        self._connections: set[_TrackedChannelProtocol] = set()
        self._closing: set[_TrackedChannelProtocol] = set()
        self._watched: set[_TrackedChannelProtocol] = set()
        self._draining: Deferred[None] | None = None
        self.config = config
        self.clients = clients if clients is not None else ClientResolver(self.config)
        #: The connection caps and counts.
        self.admission = http1.Admission(
            config.max_connections,
            config.max_connections_per_address,
            config.max_waiting_refusals,
        )

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

    def admit(self, connection: _TrackedChannelProtocol, peer: IAddress) -> Refusal | None:
        """
        Count a new connection from C{peer}, or refuse it: None when
        admitted (L{release} must follow when it is lost), else the
        L{Refusal} to answer its first request with before closing it.
        Past the global cap it is 503 (the server is busy: no fault of this
        client); past the per-address cap it is 429 (this client holds too
        many).  Connections from trusted proxies and from peers without an
        IP address count only against the global cap: each carries many
        clients.
        """
        client = self.clients.peer(peer_host(peer))
        key = None
        if client.address is not None and not self.clients.trusted(client.address):
            key = client.key
        refusal = self.admission.admit(key)
        if refusal is not None:
            # Answered below the resource, so neither the access log nor the
            # error mapping sees it: count and log it here.
            self.metrics.refused("connections")
            self._logger.info(
                "refusing a connection from {client}: {why}",
                client=peer_host(peer) or "-",
                why=refusal.message,
            )
            return refusal
        connection._admitted = True
        connection._connection_key = key
        return None

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
        self.admission.release(key)

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
        path = request.path.decode("ascii", "backslashreplace")
        # Every path but the fixed create ones may hold an id.
        if path != "/" and path not in msc4108.CREATE_PATHS:
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

    def connection_lost(self, protocol: _TrackedChannelProtocol) -> None:
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

    def _recheck_after_streams(self, protocol: _TrackedChannelProtocol) -> None:
        # An HTTP/2 stream outlives its request: the connection sends its end
        # a reactor turn later, then forgets it.  Look again once it has
        # forgotten them all.  (HTTP/1.1 requests are forgotten before their
        # request_ended, which looks again by itself.)
        if protocol not in self._watched:
            self._watched.add(protocol)
            protocol.when_idle(lambda: self._recheck(protocol))

    def _recheck(self, protocol: _TrackedChannelProtocol) -> None:
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


def _written(request: IRequest, body: bytes) -> object:
    """
    Write and finish an answer as Klein does, rather than returning bytes
    to Twisted, which would add a Content-Length even to a 204.
    """
    request.write(body)
    request.finish()
    return NOT_DONE_YET


@lru_cache(maxsize=256)
def _check_host(hostname: bytes) -> None:
    """
    Raise UnicodeError for a Host that Klein (not UTF-8) or werkzeug (not
    IDNA-encodable, as C{Map.bind} checks it) would refuse.  The few Hosts
    a server sees are checked once each.
    """
    hostname.decode("utf-8").lower().partition(":")[0].encode("idna")


class _Routes:
    """
    The Klein app's routes for C{/} and C{/<name>}, found without werkzeug:
    what C{Map.match} would answer for a root path or a one-segment path, or
    None to let werkzeug match.  Built from the app's own URL map, so a
    route added there is routed right whether or not it is recognised here.
    """

    _ONE_SEGMENT = re.compile(r"/<([A-Za-z_][A-Za-z0-9_]*)>\Z")

    def __init__(self, app: Klein) -> None:
        self.root: tuple[str, int, dict[str, str]] | None = None
        self.one_segment: tuple[str, int, str] | None = None
        #: Segments that a static one-segment route matches first.
        self.static: set[bytes] = set()
        for rule in app.url_map.iter_rules():
            segment_count = cast(Any, app.endpoints[rule.endpoint]).segment_count
            one = self._ONE_SEGMENT.match(rule.rule)
            if rule.methods is not None or rule.host is not None or rule.subdomain:
                # A rule werkzeug may refuse by method or host: leave all
                # routing to it rather than reason about precedence.
                self.root = self.one_segment = None
                break
            if rule.rule == "/":
                self.root = (rule.endpoint, segment_count, {})
            elif one is not None and self.one_segment is None:
                self.one_segment = (rule.endpoint, segment_count, one.group(1))
            elif rule.rule.count("/") == 1 and "<" not in rule.rule:
                self.static.add(rule.rule[1:].encode("utf-8"))

    def lookup(self, segments: Sequence[bytes]) -> tuple[str, int, dict[str, str]] | None:
        """
        C{(endpoint, segment_count, arguments)} for the route werkzeug would
        match to C{segments} (the unquoted path segments), or None.
        """
        if segments == [b""]:
            return self.root
        if len(segments) != 1 or self.one_segment is None:
            return None
        segment = segments[0]
        # A "%2F" unquoted into the segment makes it two segments to werkzeug.
        if b"/" in segment or segment in self.static:
            return None
        endpoint, segment_count, name = self.one_segment
        return endpoint, segment_count, {name: segment.decode("utf-8")}


class _GuardedResource(KleinResource):
    """
    Klein's resource, behind the one place that answers every CORS
    preflight, and with JSON answers for requests Klein cannot route:
    a path with an empty segment (Klein reads "//" as "/"), a path or Host
    that is not UTF-8 (Klein answers those in plain text and logs an error)
    and a Host werkzeug refuses (which would escape as a 500).
    """

    log = Logger()

    def __init__(self, app: Klein, api: RendezvousAPI) -> None:
        super().__init__(app)
        self._api = api
        self._routes = _Routes(app)
        # Klein keeps its error handlers, in registration order, here; its
        # own render reads them from the same attribute.
        self._error_handlers = app._error_handlers


    def render(self, request: IRequest) -> Any:
        # Policy and rate limits come first: a preflight is a request too.
        try:
            self._api.admit(request)
        except HTTPError as refusal:
            return _written(request, self._api.refuse(request, refusal))
        problem = request.problem if isinstance(request, RendezvousRequest) else None
        if problem is not None:
            error = BadRequestError("M_BAD_REQUEST", problem)
            return _written(request, self._api.refuse(request, error))
        # A preflight succeeds whatever the path, known or not: a failed one
        # is a broken browser client, and it reveals nothing.  Decided here,
        # once, before any routing.
        if request.method == b"OPTIONS":
            if request.path == http1.ASTERISK:
                # About the server as a whole (RFC 9110 9.3.7): what it allows
                # anywhere, besides the preflight's answer.
                request.responseHeaders.setRawHeaders(b"Allow", [ALLOW_SERVER])
            return _written(request, self._api.preflight(request))
        segments = request.postpath or [b""]
        # Klein would read "//" as "/" and "/<id>/" as "/<id>": an empty
        # segment anywhere but in "/" itself names nothing we serve.
        if b"" in segments and segments != [b""]:
            return _written(request, self._api.refuse(request, UnknownPathError()))
        try:
            b"/".join(segments).decode("utf-8")
        except UnicodeDecodeError:
            return _written(request, self._api.refuse(request, UnknownPathError()))
        try:
            _check_host(request.getRequestHostname())
            route = self._routes.lookup(segments)
            if route is None:
                return super().render(request)
        except (UnicodeError, WerkzeugHTTPException):
            error = BadRequestError("M_BAD_REQUEST", "unusable Host header")
            return _written(request, self._api.refuse(request, error))
        return self._execute(request, *route)

    # What follows is KleinResource.render for the routes _Routes knows, with
    # the per-request work that changes nothing for them left out: no
    # werkzeug MapAdapter bound and matched, no IKleinRequest (nothing here
    # builds URLs from it), and one callback pair on the route's Deferred,
    # instead of five and two notifyFinish() Deferreds.  Klein's own render
    # still serves every other request, and the same endpoints and error
    # handlers (app.handle_errors) answer both ways.

    def _execute(
        self, request: IRequest, endpoint: str, segment_count: int, kwargs: dict[str, str]
    ) -> object:
        postpath = request.postpath or []
        request.prepath.extend(postpath[:segment_count])
        request.postpath = postpath[segment_count:]
        try:
            result = self._app.execute_endpoint(endpoint, request, **kwargs)
        except Exception:
            self._failed(Failure(), request, self._error_handlers)
            return NOT_DONE_YET
        if not isinstance(result, Deferred):
            self._write(result, request)
            return NOT_DONE_YET
        if not result.called:
            # A parked read: a client that hangs up cancels it (the store's
            # canceller frees its slot), as Klein does.
            cast(Any, request).notifyFinish().addErrback(lambda _: result.cancel())
        result.addCallbacks(
            self._write,
            self._failed,
            callbackArgs=(request,),
            errbackArgs=(request, self._error_handlers),
        )
        return NOT_DONE_YET

    @staticmethod
    def _gone(request: IRequest) -> bool:
        """
        Finished, or its client hung up: Klein's "request_finished".
        """
        return bool(cast(Any, request).finished or getattr(request, "_disconnected", False))

    def _write(self, body: object, request: IRequest) -> None:
        if self._gone(request):
            return
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, bytes):
            raise TypeError(f"a route answered {type(body).__name__}, not bytes")
        request.write(body)
        request.finish()

    def _failed(
        self,
        failure: Failure,
        request: IRequest,
        handlers: Sequence[tuple[Sequence[type[Exception]], Callable[..., Any]]],
    ) -> None:
        """
        Klein's processing_failed: the first error handler registered for
        the failure's type answers; one that fails passes its own failure
        to the handlers after it.
        """
        if self._gone(request):
            if not failure.check(CancelledError):
                self.log.failure("unhandled error processing a request", failure)
            return
        for index, (types, handler) in enumerate(handlers):
            if failure.check(*types):
                try:
                    body = self._app.execute_error_handler(handler, request, failure)
                    if isinstance(body, Deferred):
                        raise TypeError("an error handler answered a Deferred")
                    self._write(body, request)
                except Exception:
                    self._failed(Failure(), request, handlers[index + 1 :])
                return
        cast(Any, request).processingFailed(failure)


def _refusal_reason(error: BaseException, code: int) -> str | None:
    """
    The metrics' name for a refusal by a limit, or None for other answers.
    Any 429 that is not the store being full is a rate limit, whatever
    refuses it.
    """
    if code == 413:
        return "too_large"
    if code == 429:
        return "full" if isinstance(error, Full) else "rate_limited"
    return None


class RendezvousAPI:
    """
    The routes of SPEC.md over a L{RendezvousStore}.

    Each handler returns the response body (bytes, or a Deferred of it); the
    status and headers are set through L{_respond}, and every refusal is a
    L{RendezvousError} (or one of the errors below) mapped in one place,
    L{_domain_error}.
    """

    app = Klein()
    # Werkzeug would answer "//x" with a 308 to "/x"; a path with an empty
    # segment is a 404 here instead (see _GuardedResource).
    app.url_map.merge_slashes = False
    log = Logger()

    def __init__(
        self,
        store: RendezvousStore,
        config: Config,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        access_log: bool = True,
    ) -> None:
        """
        @param clock: keeps time for the rate limits and times wake latency
            for L{metrics}.
        """
        self._store = store
        self._config = config
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._access_log = access_log
        self._clients = ClientResolver(config)
        self._request_limit = RateLimiter(
            config.request_burst, config.request_per_second, config.max_rate_buckets, clock
        )
        self._create_limit = RateLimiter(
            config.create_burst, config.create_per_second, config.max_rate_buckets, clock
        )
        self._root_methods: dict[bytes, Callable[[IRequest], Any]] = {
            b"POST": self.create,
        }
        self._rendezvous_methods: dict[bytes, Callable[[IRequest, str], Any]] = {
            b"GET": self.read,
            b"PUT": self.write,
            b"DELETE": self.delete,
        }
        self._msc4108_methods: dict[bytes, Callable[[IRequest, str], Any]] = {
            b"GET": lambda request, session_id: self.read(request, session_id, msc4108.TEXT_PLAIN),
            b"PUT": self.msc4108_write,
            b"DELETE": self.delete,
        }

    def resource(self) -> IResource:
        """
        The C{twisted.web} resource that serves this API.
        """
        return _GuardedResource(self.app, self)

    def site(self, reactor: Any = None) -> RendezvousSite:
        """
        A C{Site} serving this API, its requests bounded by C{max_bytes}.
        """
        return RendezvousSite(
            self.resource(),
            self._config.max_bytes,
            reactor,
            self._config,
            self._clients,
            self.metrics,
            self._access_log,
        )

    def admit(self, request: IRequest) -> None:
        """
        Resolve the client of C{request} and apply the policy and the
        request rate limit to it; raise the L{HTTPError} to answer with.
        Creating has its own policy and limit, applied in L{create}.
        """
        client = self.client(request)
        if self._clients.denied(client):
            raise ForbiddenError("this network may not use this server")
        retry_after = self._request_limit.take(client.key)
        if retry_after is not None:
            raise RateLimitedError("too many requests from this address", retry_after)

    # Routing.  Methods are dispatched here rather than by werkzeug, so that
    # a wrong method is a JSON 405 with Allow, and HEAD is not silently GET.

    @app.route("/")
    def _root(self, request: IRequest) -> Any:
        handler = self._root_methods.get(request.method)
        if handler is None:
            # Often a newcomer's first probe (curl http://host/): say what
            # the root is for.
            raise MethodNotAllowedError(
                ALLOW_ROOT, "no page here: POST / creates a rendezvous (see docs/protocol.md)"
            )
        return handler(request)

    @app.route("/<rendezvous_id>")
    def _rendezvous(self, request: IRequest, rendezvous_id: str) -> Any:
        handler = self._rendezvous_methods.get(request.method)
        if handler is None:
            raise MethodNotAllowedError(ALLOW_RENDEZVOUS)
        if _ID.match(rendezvous_id) is None:
            raise NotFound()  # as unknown as any other id
        return handler(request, rendezvous_id)

    @app.route("/<path:rest>")
    def _elsewhere(self, request: IRequest, rest: str) -> Any:
        # MSC4108's paths: fixed ones for create, and a configurable prefix
        # for sessions, which no route declared on the class could follow.
        path = "/" + rest
        if path in msc4108.CREATE_PATHS:
            if request.method != b"POST":
                raise MethodNotAllowedError(ALLOW_ROOT)
            return self.msc4108_create(request)
        session_id = msc4108.session_id(path, self._config.msc4108_session_prefix)
        if session_id is None:
            raise UnknownPathError()
        handler = self._msc4108_methods.get(request.method)
        if handler is None:
            raise MethodNotAllowedError(ALLOW_RENDEZVOUS)
        if _ID.match(session_id) is None:
            raise NotFound()
        return handler(request, session_id)

    # The protocol.

    def create(self, request: IRequest) -> Deferred[bytes]:
        body = self._body(request)
        content_type = self._content_type(request)
        d = self._store.create(body, content_type, self._creator(request))

        def created(version: Version) -> bytes:
            location = self._base_url(request) + version.rendezvous_id
            request.responseHeaders.setRawHeaders(b"Location", [location.encode("ascii")])
            request.responseHeaders.setRawHeaders(b"X-Max-Bytes", [b"%d" % self._store.max_bytes])
            payload = json.dumps(
                {"id": version.rendezvous_id, "max_bytes": self._store.max_bytes}
            ).encode("ascii")
            return self._respond(request, 200, payload, JSON, version)

        return d.addCallback(created)

    def write(self, request: IRequest, rendezvous_id: str) -> Deferred[bytes]:
        body = self._body(request)
        content_type = self._content_type(request)
        if_match = conditions.parse(request.requestHeaders.getRawHeaders(b"If-Match"))
        if if_match is None:
            if_match = ANY  # SPEC.md: an absent If-Match is "*"
        d = self._store.write(rendezvous_id, body, content_type, if_match)
        return d.addCallback(lambda version: self._respond(request, 202, b"", JSON, version))

    def read(
        self, request: IRequest, rendezvous_id: str, content_type: bytes | None = None
    ) -> Deferred[bytes]:
        """
        GET, long-polling on a matching If-None-Match.  A 200 carries the
        stored Content-Type, or C{content_type} when given.
        """
        headers = request.requestHeaders
        # A browser opening the URL itself (not a page's fetch()): refuse,
        # so that nobody can host pages or files here for people to open.
        mode = headers.getRawHeaders(b"Sec-Fetch-Mode")
        destination = headers.getRawHeaders(b"Sec-Fetch-Dest")
        if mode == [b"navigate"] or destination == [b"document"]:
            raise ForbiddenError("payloads cannot be opened as pages")
        if_none_match = conditions.parse(headers.getRawHeaders(b"If-None-Match"))
        if if_none_match is None:
            d = self._store.read(rendezvous_id)
            return d.addCallback(self._payload, request, content_type)
        timeout = self._config.poll_timeout_seconds
        wait = prefer_wait(headers.getRawHeaders(b"Prefer"))
        if wait is not None:
            timeout = min(timeout, wait)

        parked = False
        asked = self._clock.seconds()

        def dated(result: Any) -> Any:
            # Twisted dates every answer when its request arrived; a parked
            # one (200, 304 or 404) comes up to a poll timeout later.
            if parked:
                request.responseHeaders.setRawHeaders(
                    b"Date", [_http_date(self._clock.seconds())]
                )
            return result

        def answer(wakeup: Wakeup) -> bytes:
            version = wakeup.version
            if wakeup.changed:
                # A wake is a write made while the reader waited: a store
                # that answers later (Redis) answers an older payload late
                # too, and that reader never waited for it.
                if parked and version.last_modified >= asked:
                    self.metrics.woke(self._clock.seconds() - version.last_modified)
                return self._payload(version, request, content_type)
            return self._respond(request, 304, b"", version.content_type, version)

        waiting = self._store.wait_for_change(rendezvous_id, if_none_match, timeout)
        answered = waiting.addBoth(dated).addCallback(answer)
        # Had the store answered at once, answer() has run by now; if it runs
        # later, the reader was parked and a write woke it.
        parked = True
        return answered

    def delete(self, request: IRequest, rendezvous_id: str) -> Deferred[bytes]:
        d = self._store.delete(rendezvous_id)
        return d.addCallback(lambda _: self._respond(request, 204, b"", JSON))

    # MSC4108: the same store and answers, with that proposal's rules.

    def msc4108_create(self, request: IRequest) -> Deferred[bytes]:
        """
        POST to a create path: 201 with JSON C{{"url": ...}}, the absolute
        session URL, and no Location.
        """
        body = self._msc4108_body(request)
        d = self._store.create(body, msc4108.TEXT_PLAIN, self._creator(request))

        def created(version: Version) -> bytes:
            prefix = self._config.msc4108_session_prefix.lstrip("/")
            url = self._base_url(request) + prefix + version.rendezvous_id
            return self._respond(
                request, 201, json.dumps({"url": url}).encode("ascii"), JSON, version
            )

        return d.addCallback(created)

    def msc4108_write(self, request: IRequest, session_id: str) -> Deferred[bytes]:
        """
        PUT on a session: If-Match with exactly one strong ETag is required.
        """
        values = request.requestHeaders.getRawHeaders(b"If-Match")
        if not values:
            raise BadRequestError("M_MISSING_PARAM", "If-Match is required")
        if_match = conditions.parse(values)
        if if_match is None or not msc4108.is_single_strong(if_match):
            raise BadRequestError("M_INVALID_PARAM", "If-Match must be one strong ETag")
        body = self._msc4108_body(request)
        d = self._store.write(session_id, body, msc4108.TEXT_PLAIN, if_match)

        def stale(failure: Failure) -> None:
            failure.trap(PreconditionFailed)
            assert isinstance(failure.value, PreconditionFailed)
            raise msc4108.ConcurrentWrite(failure.value)

        d.addErrback(stale)
        return d.addCallback(lambda version: self._respond(request, 202, b"", JSON, version))

    def _msc4108_body(self, request: IRequest) -> bytes:
        """
        The body of an MSC4108 POST or PUT: text/plain, within the limit.
        """
        values = request.requestHeaders.getRawHeaders(b"Content-Type")
        if not values or values == [b""]:
            raise BadRequestError("M_MISSING_PARAM", "Content-Type is required: text/plain")
        if len(values) > 1 or not msc4108.is_text_plain(values[0]):
            raise BadRequestError("M_INVALID_PARAM", "Content-Type must be text/plain")
        body = self._body(request)
        limit = min(MSC4108_MAX_BYTES, self._store.max_bytes)
        if len(body) > limit:
            raise PayloadTooLargeError(limit)
        return body

    def preflight(self, request: IRequest) -> bytes:
        for name, value in PREFLIGHT:
            request.responseHeaders.setRawHeaders(name, [value])
        return self._respond(request, 204, b"", JSON)

    # Errors: the one place where a refusal becomes a status and a body.

    @app.handle_errors(RendezvousError, HTTPError)
    def _domain_error(self, request: IRequest, failure: Failure) -> bytes:
        assert failure.value is not None
        return self.refuse(request, failure.value)

    def refuse(self, request: IRequest, error: BaseException) -> bytes:
        """
        Answer a refusal: status, JSON error body and any headers it needs.
        """
        version: Version | None = None
        extra: Mapping[str, str] | None = None
        if isinstance(error, msc4108.ConcurrentWrite):
            code, errcode, message = 412, "M_UNKNOWN", "If-Match matches no current ETag"
            extra = msc4108.CONCURRENT_WRITE_FIELDS
            version = error.current
        elif isinstance(error, NotFound):
            code, errcode, message = 404, "M_NOT_FOUND", "no such rendezvous"
        elif isinstance(error, PreconditionFailed):
            code, errcode, message = 412, "M_CONCURRENT_WRITE", "If-Match matches no current ETag"
            version = error.current
        elif isinstance(error, TooLarge):
            code, errcode = 413, "M_TOO_LARGE"
            message = f"the payload is over {self._store.max_bytes} bytes"
        elif isinstance(error, Full):
            code, errcode, message = 429, "M_LIMIT_EXCEEDED", str(error)
            request.responseHeaders.setRawHeaders(
                b"Retry-After", [b"%d" % error.retry_after_seconds]
            )
        elif isinstance(error, StoreUnavailable):
            # The client may try again at once: another node or a Redis
            # that is back may answer.
            code, errcode = 503, "M_UNKNOWN"
            message = "the rendezvous store is unavailable; try again shortly"
            request.responseHeaders.setRawHeaders(b"Retry-After", [b"1"])
        elif isinstance(error, HTTPError):
            code, errcode, message = error.code, error.errcode, str(error)
            for name, value in error.headers:
                request.responseHeaders.setRawHeaders(name, [value])
        else:  # pragma: no cover - a RendezvousError this map forgot
            return self._internal_error(request, Failure(error))
        reason = _refusal_reason(error, code)
        if reason is not None:
            self.metrics.refused(reason)
        return self._respond(request, code, error_body(errcode, message, extra), JSON, version)

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        return self._internal_error(request, failure)

    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("unexpected error answering {method}", failure, method=request.method)
        return self._respond(
            request, 500, error_body("M_UNKNOWN", "internal error; it has been logged"), JSON
        )

    # Helpers.

    def _respond(
        self,
        request: IRequest,
        code: int,
        body: bytes,
        content_type: bytes,
        version: Version | None = None,
    ) -> bytes:
        """
        Set the status and every header SPEC.md asks of this answer; return
        the body for Klein to write.  The one header helper.
        """
        # Twisted knows no phrase for 429 ("Unknown Status") and an older
        # one for 413.
        request.setResponseCode(code, phrase(code))
        headers = request.responseHeaders
        for name, value in EVERY_RESPONSE:
            headers.setRawHeaders(name, [value])
        # Set explicitly: Twisted and Klein would otherwise send text/html.
        headers.setRawHeaders(b"Content-Type", [content_type])
        if code in NO_BODY:
            headers.removeHeader(b"Content-Length")
        else:
            # An explicit length: Twisted would otherwise frame HTTP/1.1
            # answers as chunked.
            headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        if version is not None:
            headers.setRawHeaders(b"ETag", [version.etag])
            headers.setRawHeaders(b"Expires", [_http_date(version.expires)])
            headers.setRawHeaders(b"Last-Modified", [_http_date(version.last_modified)])
        return body

    def _payload(
        self, version: Version, request: IRequest, content_type: bytes | None = None
    ) -> bytes:
        return self._respond(
            request, 200, version.body, content_type or version.content_type, version
        )

    def _body(self, request: IRequest) -> bytes:
        # Its size is the store's to judge (and RendezvousRequest's, before
        # it was read); this only reads it.
        content = request.content
        assert content is not None
        content.seek(0)
        body: bytes = content.read()
        return body

    def _content_type(self, request: IRequest) -> bytes:
        values = request.requestHeaders.getRawHeaders(b"Content-Type")
        if not values or values == [b""]:
            return OCTET_STREAM
        if len(values) > 1:
            raise BadRequestError("M_INVALID_PARAM", "more than one Content-Type")
        if len(values[0]) > self._config.max_content_type_bytes:
            raise BadRequestError(
                "M_INVALID_PARAM",
                f"Content-Type is over {self._config.max_content_type_bytes} bytes",
            )
        if _CONTROL.search(values[0]) is not None:
            # Stored and sent back byte for byte to every reader, where a
            # control character is not a field value (RFC 9110 5.5) and some
            # parsers read \x0b or \x0c as a line break.  obs-text (bytes
            # 0x80-0xff) is a field value, and is kept as it came.
            raise BadRequestError("M_INVALID_PARAM", "Content-Type holds a control character")
        content_type: bytes = values[0]
        return content_type

    def _creator(self, request: IRequest) -> str:
        """
        Apply the create policy and the create rate limit to the client of
        C{request}, and return the key the store counts its rendezvous
        under: the same key as the limits, so that the per-address cap and
        the limits agree on who a client is.
        """
        client = self.client(request)
        if not self._clients.may_create(client):
            raise ForbiddenError("this network may not create rendezvous")
        retry_after = self._create_limit.take(client.key)
        if retry_after is not None:
            raise RateLimitedError("too many rendezvous created from this address", retry_after)
        return client.key

    def client(self, request: IRequest) -> Client:
        """
        Who sent C{request}: the peer, or the client a trusted proxy names.
        Resolved once per request.
        """
        known = getattr(request, "client", None)
        if isinstance(known, Client):
            return known
        headers = request.requestHeaders
        client = self._clients.resolve(
            peer_host(request.getClientAddress()),
            headers.getRawHeaders(self._config.proxy_header.encode("ascii")),
            headers.getRawHeaders(b"X-Forwarded-Proto"),
        )
        if isinstance(request, RendezvousRequest):
            request.client = client
        return client

    def _base_url(self, request: IRequest) -> str:
        base = self._config.base_url
        if base is not None:
            return base
        secure = self.client(request).secure
        if secure is None:
            secure = request.isSecure()
        scheme = "https" if secure else "http"
        host = request.getHeader(b"Host")
        if host is None or _HOST.match(host) is None:
            own = request.getHost()
            if isinstance(own, IPv6Address):
                host = b"[%s]:%d" % (own.host.encode("ascii"), own.port)
            elif isinstance(own, IPv4Address):
                host = b"%s:%d" % (own.host.encode("ascii"), own.port)
            else:
                host = b"localhost"
        return f"{scheme}://{host.decode('ascii')}/"
