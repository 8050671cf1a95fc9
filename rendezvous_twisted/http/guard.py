"""
Who may use the server, decided before any route: who a client is (the peer,
or the client a trusted proxy names), the connection caps, the network
policy, the request and create rate limits; and the rules every request
meets before it is routed (L{GuardedResource}).
"""

from __future__ import annotations

from functools import lru_cache

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException as WerkzeugHTTPException

from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.metrics import Metrics
from rendezvous_twisted.core.ratelimit import RateLimiter
from rendezvous_twisted.http import http1
from rendezvous_twisted.http.answers import (
    JSON,
    PREFLIGHT,
    BadRequestError,
    ErrorAnswers,
    ForbiddenError,
    HTTPError,
    MethodNotAllowedError,
    RateLimitedError,
    Refusal,
    UnknownPathError,
    respond,
    written,
)
from rendezvous_twisted.http.clients import Client, ClientResolver, peer_host
from rendezvous_twisted.http.request import RendezvousRequest
from rendezvous_twisted.http.wire import Admitted

#: What OPTIONS * (about the server as a whole) answers it allows.
ALLOW_SERVER = b"GET, PUT, POST, DELETE, OPTIONS"


class Guard:
    """
    Connection and request admission, and the client each is counted as.
    """

    _logger = Logger()

    def __init__(self, config: Config, clock: IReactorTime, metrics: Metrics) -> None:
        """
        @param clock: keeps time for the rate limits.
        """
        self.config = config
        self.metrics = metrics
        self.clients = ClientResolver(config)
        #: The connection caps and counts.
        self.admission = http1.Admission(
            config.max_connections,
            config.max_connections_per_address,
            config.max_waiting_refusals,
        )
        self.errors = ErrorAnswers(metrics, config.max_bytes)
        self._request_limit = RateLimiter(
            config.request_burst, config.request_per_second, config.max_rate_buckets, clock
        )
        self._create_limit = RateLimiter(
            config.create_burst, config.create_per_second, config.max_rate_buckets, clock
        )
        self._proxy_header = config.proxy_header.encode("ascii")

    # Connections.

    def admit_connection(self, peer: IAddress) -> Admitted | Refusal:
        """
        Count a new connection from C{peer} (L{release_connection} must
        follow when it is lost), or refuse it.  Past the global cap it is
        503 (the server is busy: no fault of this client); past the
        per-address cap it is 429 (this client holds too many).
        Connections from trusted proxies and from peers without an IP
        address count only against the global cap: each carries many
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
        return Admitted(key)

    def release_connection(self, key: str | None) -> None:
        """
        Forget a connection that L{admit_connection} counted.
        """
        self.admission.release(key)

    # Requests.

    def client(self, request: IRequest) -> Client:
        """
        Who sent C{request}: the peer, or the client a trusted proxy names.
        Resolved once per request (kept on a L{RendezvousRequest}).
        """
        known = request.sender if isinstance(request, RendezvousRequest) else None
        if known is not None:
            return known
        peer = peer_host(request.getClientAddress())
        client = self.clients.untrusted_peer(peer) if peer is not None else None
        if client is None:
            # A trusted proxy, or a peer without an IP address: its headers
            # name the client.
            headers = request.requestHeaders
            client = self.clients.resolve(
                peer,
                headers.getRawHeaders(self._proxy_header),
                headers.getRawHeaders(b"X-Forwarded-Proto"),
            )
        if isinstance(request, RendezvousRequest):
            request.sender = client
        return client

    def admit(self, request: IRequest) -> None:
        """
        Apply the network policy and the request rate limit to the client
        of C{request}; raise the L{HTTPError} to answer with.  Creating has
        its own policy and limit (L{creator}).
        """
        client = self.client(request)
        if self.clients.denied(client):
            raise ForbiddenError("this network may not use this server")
        retry_after = self._request_limit.take(client.key)
        if retry_after is not None:
            raise RateLimitedError("too many requests from this address", retry_after)

    def creator(self, request: IRequest) -> str:
        """
        Apply the create policy and the create rate limit to the client of
        C{request}, and return the key the store counts its rendezvous
        under: the same key as the limits, so that the per-address cap and
        the limits agree on who a client is.
        """
        client = self.client(request)
        if not self.clients.may_create(client):
            raise ForbiddenError("this network may not create rendezvous")
        retry_after = self._create_limit.take(client.key)
        if retry_after is not None:
            raise RateLimitedError("too many rendezvous created from this address", retry_after)
        return client.key

    def resource(self, routes: IResource) -> IResource:
        """
        C{routes} (the Klein app's resource) behind this guard.
        """
        return GuardedResource(self, routes)


@lru_cache(maxsize=256)
def _check_host(hostname: bytes) -> None:
    """
    Raise UnicodeError for a Host that Klein (not UTF-8) or werkzeug (not
    IDNA-encodable, as C{Map.bind} checks it) would refuse.  The few Hosts
    a server sees are checked once each.
    """
    hostname.decode("utf-8").lower().partition(":")[0].encode("idna")


class GuardedResource(Resource):
    """
    The routes behind the rules every request meets first: admission
    (policy and rate limit: a preflight is a request too), a 400 for a
    request line or Host that breaks RFC 9112, every CORS preflight
    answered whatever its path, C{OPTIONS *}, and JSON answers for requests
    Klein cannot route: a path with an empty segment (Klein reads "//" as
    "/"), a path or method that is not UTF-8 (Klein answers those in plain
    text, or fails) and a Host werkzeug refuses (which would escape as a
    500).
    """

    isLeaf = True

    def __init__(self, guard: Guard, routes: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._guard = guard
        self._routes = routes

    def render(self, request: IRequest) -> object:
        guard = self._guard
        try:
            guard.admit(request)
            problem = request.problem if isinstance(request, RendezvousRequest) else None
            if problem is not None:
                raise BadRequestError("M_BAD_REQUEST", problem)
            # A preflight succeeds whatever the path, known or not: a failed
            # one is a broken browser client, and it reveals nothing.
            if request.method == b"OPTIONS":
                return written(request, self.preflight(request))
            segments = request.postpath or [b""]
            # Klein would read "//" as "/" and "/<id>/" as "/<id>": an empty
            # segment anywhere but in "/" itself names nothing we serve.
            if b"" in segments and segments != [b""]:
                raise UnknownPathError()
            try:
                b"/".join(segments).decode("utf-8")
            except UnicodeDecodeError:
                raise UnknownPathError() from None
            try:
                request.method.decode("utf-8")
            except UnicodeDecodeError:
                raise MethodNotAllowedError(ALLOW_SERVER) from None
            try:
                _check_host(request.getRequestHostname())
            except UnicodeError:
                raise BadRequestError("M_BAD_REQUEST", "unusable Host header") from None
            try:
                return self._routes.render(request)
            except WerkzeugHTTPException:
                # The Host werkzeug's bind refused, should _check_host not.
                raise BadRequestError("M_BAD_REQUEST", "unusable Host header") from None
        except HTTPError as refusal:
            return written(request, guard.errors.refuse(request, refusal))

    def preflight(self, request: IRequest) -> bytes:
        """
        Answer a CORS preflight (or C{OPTIONS *}, about the server as a
        whole, RFC 9110 9.3.7, which also says what the server allows).
        """
        headers = request.responseHeaders
        if request.path == http1.ASTERISK:
            headers.setRawHeaders(b"Allow", [ALLOW_SERVER])
        for name, value in PREFLIGHT:
            headers.setRawHeaders(name, [value])
        return respond(request, 204, b"", JSON)
