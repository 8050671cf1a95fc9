"""
The request of every connection, HTTP/1.1 and HTTP/2 alike: it enforces the
payload limit before and while its body is read (C{twisted.web} reads a whole
body before any resource runs, so no route could), never spools a body to
disk, tells its site when it is in flight, and holds what the guard learnt
of its client (L{RendezvousRequest.sender}) for the access log.

It reaches its site through L{RequestSite}, a typed interface.  Where
twisted.web has no public way it uses three private names, pinned by
tests/test_http1_fence.py: it overrides C{Request._cleanup} (where a request
ends once answered), reads C{Request._disconnected} (whether its client hung
up) and the channel's C{_command} (the method, before the body is in).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request

from rendezvous_twisted.core.config import Config
from rendezvous_twisted.http import http1
from rendezvous_twisted.http.answers import Refusal, ResponseHeaders, closing_answer, http_date
from rendezvous_twisted.http.clients import Client, peer_host

#: The private Twisted names this module uses, each where twisted.web has no
#: public way (pinned by tests/test_http1_fence.py): (owner, name).
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    # Overridden: where an answered request ends (connectionLost where its
    # connection is lost first), for the in-flight count of a graceful stop.
    ("twisted.web.http.Request", "_cleanup"),
    # Read: whether the client hung up (an HTTP/2 refusal must not answer).
    ("twisted.web.http.Request", "_disconnected"),
    # Read: the method of a request refused 413 before its body (and so
    # its method) is in.
    ("twisted.web.http.HTTPChannel", "_command"),
)


class RequestSite(Protocol):
    """
    What a request and its HTTP/1.1 channel need of their site.
    """

    @property
    def reactor(self) -> IReactorTime: ...

    @property
    def config(self) -> Config: ...

    @property
    def max_body_bytes(self) -> int: ...

    @property
    def resource(self) -> IResource: ...

    def request_started(self) -> None:
        """
        A request's headers are in: it is in flight until L{request_ended}.
        """

    def request_ended(self) -> None:
        """
        A request was answered, or its connection lost.
        """

    def refused(self, reason: str) -> None:
        """
        Count a refusal made below the resource, by metrics reason.
        """

    def answered_below(self, method: bytes, status: int, started: float | None) -> None:
        """
        Count a request answered below the resource (the access log never
        sees it), from C{started} on the site's reactor.
        """


def site_of(channel: Any) -> RequestSite:
    """
    The site of a request's channel (Twisted's HTTP/1.1 channel and HTTP/2
    stream both hold it as C{site}), as the interface it is used through.
    """
    site: RequestSite = channel.site
    return site


def client_address(request: IRequest) -> str | None:
    """
    The client's address as the logs show it: the client a trusted proxy
    named, once the guard has resolved it, else the peer's IP address; None
    on a transport without one (a UNIX socket).  The one place that decides
    it for logs.
    """
    resolved = request.sender if isinstance(request, RendezvousRequest) else None
    if resolved is not None and resolved.text is not None:
        return resolved.text
    return peer_host(request.getClientAddress())


class RendezvousRequest(Request):
    """
    A request that enforces the payload limit before and while its body is
    read, and that never spools a body to disk.
    """

    # Slots, not more names in the instance dict: with them a request
    # would outgrow the key table its class shares (see RendezvousChannel).
    # _in_flight is unset until the headers are in.
    __slots__ = ("_hostname", "_in_flight")
    #: The site that counts this request in flight, until it ends.
    _in_flight: RequestSite | None
    #: What getRequestHostname() answered, once asked.
    _hostname: bytes | None

    _logger = Logger()
    #: Who sent it, once the guard has resolved it (for limits, the access
    #: log and the Location scheme).  (Not Twisted's C{client}, its peer's
    #: address.)
    sender: Client | None = None
    _refused = False
    #: When the request's headers were in, on the site's reactor.
    started: float | None = None
    #: Why its line or headers break RFC 9112's rules (L{http1.check_request}),
    #: for the 400 that answers it before any route; None for most.
    problem: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._hostname = None
        # Its answer's headers: those of every answer as one prepared batch.
        self.responseHeaders = ResponseHeaders()

    @property
    def _max_bytes(self) -> int:
        return site_of(self.channel).max_body_bytes

    def gotLength(self, length: int | None) -> None:
        # The headers are in: from now until it is answered (or its
        # connection is lost) this request is in flight, and a graceful stop
        # waits for it, its body upload included.
        site = site_of(self.channel)
        self.started = site.reactor.seconds()
        site.request_started()
        # Until _cleanup or connectionLost, whichever comes first (where
        # notifyFinish() would fire): a flag, not a Deferred and a closure
        # per request, which a parked request would hold all the while.
        self._in_flight = site
        # Twisted spools bodies of unknown or large length to a temporary
        # file; ours are small and must never touch a disk.
        self.content = BytesIO()
        if length is not None and length > site.max_body_bytes:
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

    def getRequestHostname(self) -> bytes:
        # Asked by the guard, then by Klein's render (and werkzeug's bind
        # gets Klein's answer): Twisted parses the Host header each time.
        # The Host is final by then (requestReceived sets an absolute-form
        # target's authority first); the first answer stands.
        hostname = self._hostname
        if hostname is None:
            hostname = self._hostname = super().getRequestHostname()  # type: ignore[no-untyped-call]
        return hostname

    def process(self) -> None:
        # Twisted's server.Request.process, but for what changes nothing
        # here, once per request: its Server header (every answer sets its
        # own), the look-up of a resource (the site's is a leaf) and of an
        # encoder (it has none).  Its Date is the site's reactor's time, each
        # second formatted once (Twisted formats the wall clock anew).  And
        # "OPTIONS *", which Twisted answers itself (and any other method
        # with a "*" target), in its own words and without the headers of
        # every answer, goes to the resource like any other request.
        if self._refused:
            return
        channel: Any = self.channel
        site = site_of(channel)
        self.site = channel.site
        self.responseHeaders.setRawHeaders(b"Date", [http_date(site.reactor.seconds())])
        self.prepath = []
        self.sitepath: list[bytes] = []
        if self.path == http1.ASTERISK:
            self.postpath = []
        else:
            self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        try:
            self.render(site.resource)  # type: ignore[no-untyped-call]
        except BaseException:
            self.processingFailed(Failure())  # type: ignore[no-untyped-call]

    def _refuse_oversize(self) -> None:
        """
        Answer 413 now, before the rest of the body, and close the
        connection: its remaining bytes can no longer be framed.
        """
        self._refused = True
        self.content = BytesIO()
        site = site_of(self.channel)
        # The access log never sees this request (it never finishes).
        self._logger.info(
            "refused a body over {max_bytes} bytes from {client}",
            max_bytes=self._max_bytes,
            client=client_address(self) or "-",
        )
        site.refused("too_large")
        # Twisted would otherwise invite the body with "100 Continue".
        self.requestHeaders.removeHeader(b"Expect")
        message = f"the payload is over {self._max_bytes} bytes"
        if not isinstance(self.channel, HTTPChannel):
            # HTTP/2: answer on this stream alone, once the connection has
            # registered it (this runs while the stream is being made); the
            # connection and its other streams go on.
            site.reactor.callLater(0, self.refuse_on_stream, 413, "M_TOO_LARGE", message)
            return
        # The method is only set once the whole body is in; the channel has
        # already parsed it from the request line.
        method = getattr(self.channel, "_command", None) or self.method
        site.answered_below(method, 413, self.started)
        transport = self.channel.transport
        assert transport is not None
        transport.write(closing_answer(413, "M_TOO_LARGE", message))
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
        stream: Any = self.channel
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
