"""
The HTTP face of the store: a Klein app, the request class that enforces the
body limit as bytes arrive, and the one place where headers are applied and
domain errors become status codes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, cast

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import _GenericHTTPChannelProtocol
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request, Site
from werkzeug.exceptions import HTTPException as WerkzeugHTTPException

from rendezvous_twisted import conditions
from rendezvous_twisted.conditions import ANY
from rendezvous_twisted.config import Config
from rendezvous_twisted.metrics import Metrics
from rendezvous_twisted.store import (
    Full,
    NotFound,
    PreconditionFailed,
    RendezvousError,
    RendezvousStore,
    TooLarge,
    Version,
    Wakeup,
)

#: What SPEC.md's "Every response" and "CORS" sections put on every answer.
EVERY_RESPONSE: tuple[tuple[bytes, bytes], ...] = (
    (b"Access-Control-Allow-Origin", b"*"),
    (
        b"Access-Control-Expose-Headers",
        b"ETag, Location, X-Max-Bytes, Expires, Last-Modified, Retry-After",
    ),
    (b"Cache-Control", b"no-store, no-transform"),
    (b"Pragma", b"no-cache"),
    (b"X-Content-Type-Options", b"nosniff"),
    # Whatever a payload holds, a browser that opens it runs and loads
    # nothing.  Harmless on the other answers, so it goes on all of them.
    (b"Content-Security-Policy", b"sandbox; default-src 'none'"),
    # No version: it helps no client and tells an attacker what to try.
    (b"Server", b"rendezvous-twisted"),
)

#: Added to the every-response headers on a CORS preflight.
PREFLIGHT: tuple[tuple[bytes, bytes], ...] = (
    (b"Access-Control-Allow-Methods", b"GET, PUT, POST, DELETE"),
    (b"Access-Control-Allow-Headers", b"Content-Type, If-Match, If-None-Match, Prefer"),
    (b"Access-Control-Max-Age", b"86400"),
)

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"
#: Statuses whose answer has no body and so no Content-Length (RFC 9110 8.6).
NO_BODY = frozenset((204, 304))

ALLOW_ROOT = b"POST, OPTIONS"
ALLOW_RENDEZVOUS = b"GET, PUT, DELETE, OPTIONS"

# Ids are minted by secrets.token_urlsafe(16): 22 URL-safe characters.  A
# little slack costs nothing; anything else can never name a rendezvous.
_ID = re.compile(r"[A-Za-z0-9_-]{16,64}\Z")
# A Host header fit to build a URL from: a name or IPv4 address, or an IPv6
# literal, and an optional port.  Anything else falls back to our own address.
_HOST = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")


def error_body(errcode: str, message: str) -> bytes:
    """
    The JSON body of every error: C{{"errcode": ..., "error": ...}}.
    """
    return json.dumps({"errcode": errcode, "error": message}).encode("ascii")


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
    The client's address as the server judges it (for per-address limits
    and logs): the peer's IP address, or None on a transport without one
    (a UNIX socket).  The one place that decides it.
    """
    address = request.getClientAddress()
    if isinstance(address, (IPv4Address, IPv6Address)):
        host: str = address.host
        return host
    return None


def _http_date(seconds: float) -> bytes:
    date: bytes = http.datetimeToString(int(seconds))
    return date


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


class MethodNotAllowedError(HTTPError):
    code = 405
    errcode = "M_UNRECOGNIZED"

    def __init__(self, allow: bytes) -> None:
        super().__init__("method not allowed here")
        self.headers = ((b"Allow", allow),)


class RendezvousRequest(Request):
    """
    A request that enforces the payload limit before and while its body is
    read (C{twisted.web} reads a whole body before any resource runs, so no
    route could), and that never spools a body to disk.
    """

    _refused = False
    #: When the request's headers were in, on the site's reactor.
    started: float | None = None

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
        self.notifyFinish().addBoth(lambda _: site.request_ended())
        # Twisted spools bodies of unknown or large length to a temporary
        # file; ours are small and must never touch a disk.
        self.content = BytesIO()
        if length is not None and length > self._max_bytes:
            self._refuse_oversize()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        content = self.content
        assert content is not None, "gotLength() comes first"
        if content.tell() + len(data) > self._max_bytes:
            self._refuse_oversize()
            return
        content.write(data)

    def process(self) -> None:
        if not self._refused:
            super().process()  # type: ignore[no-untyped-call]

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
            site.reactor.callLater(0, self._refuse_stream)
            return
        # The method is only set once the whole body is in; the channel has
        # already parsed it from the request line.
        method = getattr(self.channel, "_command", None) or self.method
        site.metrics.request_done(method, 413, site.reactor.seconds() - (self.started or 0))
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            _closing_answer(
                b"413 Payload Too Large",
                "M_TOO_LARGE",
                f"the payload is over {self._max_bytes} bytes",
            )
        )
        transport.loseConnection()

    def _refuse_stream(self) -> None:
        """
        Answer an oversize HTTP/2 request 413 through this request, as any
        other answer (so the access log and metrics see it).
        """
        if self.finished or self._disconnected:
            return
        stream = cast(Any, self.channel)
        # Set here if the request line's fields have not come in yet.
        if not hasattr(self, "path"):
            self.method = stream.command or self.method
            self.uri = self.path = stream.path or b"/"
            self.clientproto = b"HTTP/2"
        body = error_body("M_TOO_LARGE", f"the payload is over {self._max_bytes} bytes")
        self.setResponseCode(413)
        for name, value in (
            *EVERY_RESPONSE,
            (b"Content-Type", JSON),
            (b"Content-Length", b"%d" % len(body)),
        ):
            self.responseHeaders.setRawHeaders(name, [value])
        self.write(body)  # type: ignore[no-untyped-call]
        self.finish()  # type: ignore[no-untyped-call]


def _closing_answer(status: bytes, errcode: str, message: str) -> bytes:
    """
    A whole HTTP/1.1 error answer as bytes, with the every-response headers
    and C{Connection: close}, for refusals made below the resource, where
    there is no Request to answer through.
    """
    body = error_body(errcode, message)
    head = [b"HTTP/1.1 " + status]
    for name, value in (
        *EVERY_RESPONSE,
        (b"Date", http.datetimeToString()),
        (b"Content-Type", JSON),
        (b"Content-Length", b"%d" % len(body)),
        (b"Connection", b"close"),
    ):
        head.append(name + b": " + value)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class RendezvousChannel(http.HTTPChannel):
    """
    Twisted's HTTP/1.1 channel, answering the requests it cannot parse
    (malformed request line, header or framing) with a JSON 400 like every
    other refusal, rather than a bare status line.
    """

    def _respondToBadRequestAndDisconnect(self) -> None:
        assert self.transport is not None
        self.transport.write(
            _closing_answer(b"400 Bad Request", "M_BAD_REQUEST", "malformed HTTP request")
        )
        self.loseConnection()  # type: ignore[no-untyped-call]


class _TrackedChannelProtocol(_GenericHTTPChannelProtocol):
    """
    Twisted's HTTP/1.x-or-2 switching protocol, telling its site when its
    connection is gone, so that a graceful stop knows what is still open.
    """

    def connectionLost(self, reason: Failure) -> None:
        try:
            super().connectionLost(reason)
        finally:
            site = self._site
            if isinstance(site, RendezvousSite):
                site.connection_lost(self)


#: The access log: one event per answered request.  A module-level logger, so
#: that its namespace stays "rendezvous_twisted.access" (a Logger class
#: attribute takes its class' name) and can be filtered on by that name.
_access_log = Logger(namespace="rendezvous_twisted.access")


def _transport_of(protocol: _GenericHTTPChannelProtocol) -> Any:
    # The proxy forwards only IProtocol's methods; the transport is its
    # channel's (the HTTP/1.1 channel, or the HTTP/2 one it switched to).
    return getattr(protocol._channel, "transport", None)


def _close(protocol: _GenericHTTPChannelProtocol) -> None:
    """
    Close an idle connection cleanly, letting its transport write what it
    holds first.
    """
    channel = protocol._channel
    if isinstance(channel, http.HTTPChannel):
        channel.loseConnection()
        return
    transport = _transport_of(protocol)
    # HTTP/2 closes with a GOAWAY frame, so the client knows no stream was
    # lost and opens a new connection for what comes next.
    h2 = getattr(channel, "conn", None)
    if h2 is not None and hasattr(h2, "close_connection"):
        h2.close_connection()
        transport.write(h2.data_to_send())
    # The channel is its transport's producer; a TLS transport would wait
    # for it to unregister before closing.
    transport.unregisterProducer()
    transport.loseConnection()


def _busy(protocol: _GenericHTTPChannelProtocol) -> bool:
    # An HTTP/1.1 channel lists its requests from their first line until
    # their answer is written; an HTTP/2 one lists its open streams.
    channel = protocol._channel
    return bool(getattr(channel, "requests", None) or getattr(channel, "streams", None))


class RendezvousSite(Site):
    """
    The C{Site} for L{RendezvousAPI}: its requests enforce the body limit,
    and its access log shows ids only as short hashes.  It keeps count of
    its open connections and of the requests being answered, so that
    L{drain} can stop gracefully.
    """

    requestFactory = RendezvousRequest
    # Not "log": Site.log is the access log's method.
    _logger = Logger()

    def protocol(self) -> _GenericHTTPChannelProtocol:
        # As Twisted's own factory, with our channel for HTTP/1.x; the proxy
        # is what switches to HTTP/2 when TLS negotiates it.
        return _TrackedChannelProtocol(RendezvousChannel())  # type: ignore[no-untyped-call]

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        reactor: Any = None,
        metrics: Metrics | None = None,
        access_log: bool = True,
    ) -> None:
        super().__init__(resource, reactor=reactor)  # type: ignore[no-untyped-call]
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics or Metrics()
        self.access_log = access_log
        #: Requests whose answer is not finished yet (parked ones included).
        self.in_flight = 0
        self._connections: set[_GenericHTTPChannelProtocol] = set()
        self._closing: set[_GenericHTTPChannelProtocol] = set()
        self._watched: set[int] = set()
        self._draining: Deferred[None] | None = None

    def buildProtocol(self, addr: Any) -> Any:
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
        if path != "/":
            path = "/~" + redact(path.removeprefix("/"))
        _access_log.info(
            '{client} "{method} {path} {protocol}" {status} {length} {duration_ms:.1f}ms',
            client=client_address(cast(IRequest, request)) or "-",
            method=request.method.decode("ascii", "backslashreplace"),
            path=path,
            protocol=request.clientproto.decode("ascii", "backslashreplace"),
            status=request.code,
            length=request.sentLength,
            duration_ms=duration * 1000,
        )

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def request_started(self) -> None:
        self.in_flight += 1

    def request_ended(self) -> None:
        self.in_flight -= 1
        self._check_drained()

    def connection_lost(self, protocol: _GenericHTTPChannelProtocol) -> None:
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
            "draining: {requests} requests in flight on {connections} connections",
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
            if _busy(protocol):
                self._recheck_after_streams(protocol)
                continue
            # Nothing is being asked or answered on it: close it, which lets
            # the transport write what it holds first.
            if _transport_of(protocol) is not None:
                self._closing.add(protocol)
                _close(protocol)
        if not self._connections:
            self._draining.callback(None)

    def _recheck_after_streams(self, protocol: _GenericHTTPChannelProtocol) -> None:
        # An HTTP/2 stream outlives its request: the connection sends its end
        # a reactor turn later, then forgets it and fires its cleanup
        # Deferred.  Look again then.  (HTTP/1.1 requests are forgotten
        # before their request_ended, which looks again by itself.)
        cleanups = getattr(protocol._channel, "_streamCleanupCallbacks", None) or {}
        for cleanup in cleanups.values():
            if id(cleanup) not in self._watched:
                self._watched.add(id(cleanup))
                cleanup.addBoth(self._recheck)

    def _recheck(self, result: object) -> object:
        self._check_drained()
        return result

    def _abort_all(self) -> None:
        self._logger.warn(
            "shutdown timeout: aborting {requests} requests on {connections} connections",
            requests=self.in_flight,
            connections=len(self._connections),
        )
        for protocol in list(self._connections):
            transport = _transport_of(protocol)
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


class _GuardedResource(KleinResource):
    """
    Klein's resource, behind the one place that answers every CORS
    preflight, and with JSON answers for requests Klein cannot route:
    a path with an empty segment (Klein reads "//" as "/"), a path or Host
    that is not UTF-8 (Klein answers those in plain text and logs an error)
    and a Host werkzeug refuses (which would escape as a 500).
    """

    def __init__(self, app: Klein, api: RendezvousAPI) -> None:
        super().__init__(app)
        self._api = api

    def render(self, request: IRequest) -> Any:
        # A preflight succeeds whatever the path, known or not: a failed one
        # is a broken browser client, and it reveals nothing.  Decided here,
        # once, before any routing.
        if request.method == b"OPTIONS":
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
            request.getRequestHostname().decode("utf-8")
            return super().render(request)
        except (UnicodeError, WerkzeugHTTPException):
            error = BadRequestError("M_BAD_REQUEST", "unusable Host header")
            return _written(request, self._api.refuse(request, error))


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
        metrics: Metrics | None = None,
        clock: IReactorTime | None = None,
        access_log: bool = True,
    ) -> None:
        """
        @param clock: times wake latency for L{metrics}; not timed if None.
        """
        self._store = store
        self._config = config
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._access_log = access_log
        self._root_methods: dict[bytes, Callable[[IRequest], Any]] = {
            b"POST": self.create,
        }
        self._rendezvous_methods: dict[bytes, Callable[[IRequest, str], Any]] = {
            b"GET": self.read,
            b"PUT": self.write,
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
            self.resource(), self._config.max_bytes, reactor, self.metrics, self._access_log
        )

    # Routing.  Methods are dispatched here rather than by werkzeug, so that
    # a wrong method is a JSON 405 with Allow, and HEAD is not silently GET.

    @app.route("/")
    def _root(self, request: IRequest) -> Any:
        handler = self._root_methods.get(request.method)
        if handler is None:
            raise MethodNotAllowedError(ALLOW_ROOT)
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
        raise UnknownPathError()

    # The protocol.

    def create(self, request: IRequest) -> Deferred[bytes]:
        body = self._body(request)
        content_type = self._content_type(request)
        d = self._store.create(body, content_type, self._client_address(request))

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

    def read(self, request: IRequest, rendezvous_id: str) -> Deferred[bytes]:
        headers = request.requestHeaders
        # A browser opening the URL itself (not a page's fetch()): refuse,
        # so that nobody can host pages or files here for people to open.
        mode = headers.getRawHeaders(b"Sec-Fetch-Mode")
        destination = headers.getRawHeaders(b"Sec-Fetch-Dest")
        if mode == [b"navigate"] or destination == [b"document"]:
            raise ForbiddenError("payloads cannot be opened as pages")
        if_none_match = conditions.parse(headers.getRawHeaders(b"If-None-Match"))
        if if_none_match is None:
            return self._store.read(rendezvous_id).addCallback(self._payload, request)
        timeout = self._config.poll_timeout_seconds
        wait = prefer_wait(headers.getRawHeaders(b"Prefer"))
        if wait is not None:
            timeout = min(timeout, wait)

        parked = False

        def answer(wakeup: Wakeup) -> bytes:
            version = wakeup.version
            if wakeup.changed:
                if parked and self._clock is not None:
                    self.metrics.woke(self._clock.seconds() - version.last_modified)
                return self._payload(version, request)
            return self._respond(request, 304, b"", version.content_type, version)

        d = self._store.wait_for_change(rendezvous_id, if_none_match, timeout).addCallback(answer)
        # Had the store answered at once, answer() has run by now; if it runs
        # later, the reader was parked and a write woke it.
        parked = True
        return d

    def delete(self, request: IRequest, rendezvous_id: str) -> Deferred[bytes]:
        d = self._store.delete(rendezvous_id)
        return d.addCallback(lambda _: self._respond(request, 204, b"", JSON))

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
        if isinstance(error, NotFound):
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
        elif isinstance(error, HTTPError):
            code, errcode, message = error.code, error.errcode, str(error)
            for name, value in error.headers:
                request.responseHeaders.setRawHeaders(name, [value])
        else:  # pragma: no cover - a RendezvousError this map forgot
            return self._internal_error(request, Failure(error))
        reason = _refusal_reason(error, code)
        if reason is not None:
            self.metrics.refused(reason)
        return self._respond(request, code, error_body(errcode, message), JSON, version)

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
        request.setResponseCode(code)
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

    def _payload(self, version: Version, request: IRequest) -> bytes:
        return self._respond(request, 200, version.body, version.content_type, version)

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
        content_type: bytes = values[0]
        return content_type

    def _client_address(self, request: IRequest) -> str:
        address = client_address(request)
        if address is not None:
            return address
        # A UNIX socket or another transport: its clients share one budget.
        return type(request.getClientAddress()).__name__

    def _base_url(self, request: IRequest) -> str:
        base = self._config.base_url
        if base is not None:
            return base
        scheme = "https" if request.isSecure() else "http"
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
