"""
Who may create MSC4388 sessions (L{CreatePolicy}): anyone (L{OpenPolicy}),
or the holders of a valid access token of a homeserver, which judges them
(its C{/_matrix/client/v3/account/whoami}: L{HomeserverPolicy}).
L{create_policy} picks one from the configuration.

A token that is present is never ignored where it can be judged: MSC4388
asks that an invalid one get C{401 M_UNKNOWN_TOKEN} (L{InvalidTokenError}),
not be treated as no token.  A homeserver that cannot judge it now is a
C{503} (L{HomeserverUnavailableError}), never an open door.

What this holds is bounded, and counted in the memory budget
(L{rendezvous_twisted.core.budget.token_memory}): at most
C{MAX_TOKEN_VERDICTS} verdicts remembered, at most
C{MAX_HOMESERVER_LOOKUPS} questions to the homeserver in flight, each
answer read up to C{MAX_WHOAMI_BYTES}.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from hyperlink import URL
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from rendezvous_twisted.core.budget import (
    MAX_HOMESERVER_IDLE_CONNECTIONS,
    MAX_HOMESERVER_LOOKUPS,
    MAX_TOKEN_VERDICTS,
    MAX_WHOAMI_BYTES,
)
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.http.answers import SERVER, HTTPError
from rendezvous_twisted.http.whoami import (
    WHOAMI_PATH,
    Complaints,
    Invalid,
    Verdict,
    failure_kind,
    judge,
    read_bounded,
)

#: The longest access token judged; a longer one is refused as malformed.
#: Matrix sets no limit; homeservers issue opaque strings of some tens of
#: bytes, and this bounds what one header makes us hash and forward.
MAX_TOKEN_BYTES = 4096
#: How long an idle connection to the homeserver is kept for the next
#: question (a balancer in front of it may close sooner; the pool retries a
#: GET that finds its connection closed).
IDLE_CONNECTION_SECONDS = 60

# RFC 6750 2.1: credentials = "Bearer" 1*SP b64token, the scheme
# case-insensitive (RFC 9110 11.1); b64token is
# 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=".
_BEARER = re.compile(rb"bearer +([A-Za-z0-9._~+/-]+=*)", re.IGNORECASE)


class InvalidTokenError(HTTPError):
    """
    The access token given is not valid (unknown, expired, logged out), or
    the C{Authorization} header carries no token that could be judged
    (C{M_MISSING_TOKEN}).  C{soft_logout}, when the homeserver said it, is
    passed on as the client-server API's field of that name.
    """

    code = 401
    errcode = "M_UNKNOWN_TOKEN"

    def __init__(
        self,
        message: str = "the access token is not valid",
        errcode: str = "M_UNKNOWN_TOKEN",
        soft_logout: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.errcode = errcode
        if soft_logout is not None:
            self.extra = {"soft_logout": soft_logout}


class HomeserverUnavailableError(HTTPError):
    """
    The homeserver cannot judge an access token now (down, slow, or
    answering something else than a verdict).
    """

    code = 503
    errcode = "M_UNKNOWN"
    headers = ((b"Retry-After", b"5"),)

    def __init__(self) -> None:
        super().__init__("the homeserver cannot judge access tokens now; try again shortly")


class CreatePolicy(Protocol):
    """
    Whether a requester may create an MSC4388 session.
    """

    def may_create(self, authorization: Sequence[bytes] | None) -> Deferred[bool]:
        """
        Judge the requester by its C{Authorization} header values (None when
        it sent none): True if it may create, False if policy refuses it
        (C{403 M_FORBIDDEN} on create, C{create_available: false} on
        discovery).  Fails with L{InvalidTokenError} or
        L{HomeserverUnavailableError}.
        """


class ClosableCreatePolicy(CreatePolicy, Protocol):
    """
    A L{CreatePolicy} that may hold connections, released by L{close}.
    """

    def close(self) -> Deferred[None]:
        """
        Stop asking (what needs a question from now on, or is being asked,
        fails with L{HomeserverUnavailableError}) and close the connections
        held; fires once the idle ones are closed.
        """


class OpenPolicy:
    """
    Anyone may create, and tokens are not judged: with no homeserver to ask,
    there is nothing to judge them by.
    """

    def may_create(self, authorization: Sequence[bytes] | None) -> Deferred[bool]:
        return succeed(True)

    def close(self) -> Deferred[None]:
        return succeed(None)


def create_policy(config: Config, reactor: Any) -> ClosableCreatePolicy:
    """
    The create policy C{config} asks for: a L{HomeserverPolicy} asking
    C{config.homeserver} with C{--msc4388 authenticated}, else an
    L{OpenPolicy} (with C{off} nothing asks it: the API answers 404).

    @param reactor: provides L{IReactorTime} (timeouts, the cache's clock)
        and L{IReactorTCP} (and, for an https homeserver, L{IReactorSSL}).
    """
    if config.msc4388 != "authenticated":
        return OpenPolicy()
    if config.homeserver is None:  # Config refuses it; said again for mypy
        raise ValueError("--msc4388 authenticated needs --homeserver")
    return HomeserverPolicy(
        config.homeserver,
        reactor,
        timeout_seconds=config.homeserver_timeout_seconds,
        cache_seconds=config.token_cache_seconds,
    )


def bearer_token(authorization: Sequence[bytes]) -> bytes:
    """
    The access token of the C{Authorization} header values C{authorization}
    (at least one): exactly one value, C{Bearer <token>} (the scheme in any
    case, the token in RFC 6750's C{b64token} grammar, at most
    L{MAX_TOKEN_BYTES}).

    Anything else fails with L{InvalidTokenError} C{M_MISSING_TOKEN}, and no
    homeserver is asked: another scheme, several values (or tokens), a
    malformed or overlong token.  The code is the one Synapse answers for
    such a header ("Invalid Authorization header", "Too many Authorization
    headers"): the header holds no token to judge, and a client told
    C{M_UNKNOWN_TOKEN} would refresh a token that was never the problem.
    It is a 401 all the same, never a requester treated as anonymous.
    """
    if len(authorization) != 1:
        raise InvalidTokenError("give one Authorization header", errcode="M_MISSING_TOKEN")
    # Optional whitespace around a field value is not part of it (RFC 9110 5.5).
    value = authorization[0].strip(b" \t")
    if len(value) <= len(b"Bearer ") + MAX_TOKEN_BYTES:
        match = _BEARER.fullmatch(value)
        if match is not None and len(match.group(1)) <= MAX_TOKEN_BYTES:
            return match.group(1)
    raise InvalidTokenError(
        "the Authorization header must be 'Bearer <access token>'", errcode="M_MISSING_TOKEN"
    )


class _Lookup:
    """
    One question to the homeserver about one token, shared by every
    requester that gives that token while it is asked.  Each has its own
    Deferred (L{join}): cancelling it leaves the question to the others.
    """

    def __init__(self) -> None:
        self.waiters: list[Deferred[bool]] = []
        self.asking: Deferred[None] | None = None
        self.settled = False
        self.outcome: Verdict | None = None

    def join(self) -> Deferred[bool]:
        if self.settled:  # it ended before its first requester joined
            d: Deferred[bool] = Deferred()
            answered(d, self.outcome)
            return d
        d = Deferred(self.waiters.remove)
        self.waiters.append(d)
        return d

    def settle(self, outcome: Verdict | None) -> None:
        """
        Answer every requester waiting: C{None} is a homeserver that gave
        no verdict.
        """
        self.settled, self.outcome = True, outcome
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            answered(d, outcome)


def answered(d: Deferred[bool], verdict: Verdict | None) -> None:
    """
    Fire C{d} with C{verdict}: a boolean, L{InvalidTokenError}, or
    L{HomeserverUnavailableError} for C{None}.
    """
    if isinstance(verdict, bool):
        d.callback(verdict)
    elif isinstance(verdict, Invalid):
        d.errback(InvalidTokenError(errcode=verdict.errcode, soft_logout=verdict.soft_logout))
    else:
        d.errback(HomeserverUnavailableError())


@implementer(IStreamClientEndpoint)
class _Quiet:
    """
    An endpoint whose connections' factories log nothing: Twisted's log
    "Starting factory" and "Stopping factory" for each new connection, two
    lines a question for a homeserver that refuses connections
    (tests/test_tokens.py fails if the lines come back).
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:  # noqa: N803
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        connected: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return connected


@implementer(IAgentEndpointFactory)
class _HomeserverEndpoints:
    """
    Where the policy's Agent connects: the homeserver's host and port, over
    TLS verified as a browser would for https, each connection quiet
    (L{_Quiet}) and given up after C{timeout_seconds}.
    """

    def __init__(self, reactor: Any, timeout_seconds: float) -> None:
        self._reactor = reactor
        self._timeout = timeout_seconds
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, uri.host, uri.port, timeout=self._timeout
        )
        if uri.scheme == b"https":
            creator = self._tls.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return _Quiet(endpoint)


class HomeserverPolicy:
    """
    Holders of an access token that the homeserver accepts may create; it
    is asked on C{GET {homeserver}/_matrix/client/v3/account/whoami} with
    C{Authorization: Bearer <token>}.

    Rules (L{may_create}):
      - no C{Authorization} header: False, and the homeserver is not asked;
      - a header that is not one C{Bearer <token>} value:
        L{InvalidTokenError} C{M_MISSING_TOKEN}, not asked (L{bearer_token});
      - otherwise the homeserver's answer (L{judge}): True, False
        (a guest, or a 403), L{InvalidTokenError} (its 401);
      - no verdict from it (an error status, a body that is not one, or
        over C{MAX_WHOAMI_BYTES}; refused or failed connection, DNS, TLS;
        no answer within C{timeout_seconds}; more than C{max_in_flight}
        questions already asked; the policy closed):
        L{HomeserverUnavailableError}, logged once a minute per kind of
        failure at most.  Never a yes.

    Verdicts (all three kinds, never "no verdict") are remembered for
    C{cache_seconds} on C{clock}, by the SHA-256 of the token (the token
    itself is neither kept nor logged), the C{max_cached} most recently
    used at most.  Requesters giving a token being asked about share the
    one question.

    The homeserver is asked with a L{twisted.web.client.Agent} on a pool of
    its own (persistent connections, C{MAX_HOMESERVER_IDLE_CONNECTIONS}
    kept idle), not with treq's C{HTTPClient}, which would follow redirects
    (taking the token elsewhere), keep cookies, buffer bodies whole and
    inflate gzip in one go (a small compressed answer of megabytes): each
    would need undoing here.  Its TLS is the Agent's default, verified as
    a browser would.
    """

    log = Logger()

    def __init__(
        self,
        homeserver_url: str,
        reactor: Any,
        timeout_seconds: float,
        cache_seconds: float,
        clock: IReactorTime | None = None,
        max_in_flight: int = MAX_HOMESERVER_LOOKUPS,
        max_cached: int = MAX_TOKEN_VERDICTS,
    ) -> None:
        """
        @param reactor: connects to the homeserver and times its answers
            out (L{IReactorTCP}, L{IReactorTime}, L{IReactorSSL} for https).
        @param clock: when verdicts expire and complaints are logged (the
            reactor when None).
        """
        self._reactor = reactor
        self._clock: IReactorTime = clock or reactor
        self._timeout_seconds = timeout_seconds
        self._cache_seconds = cache_seconds
        self._max_in_flight = max_in_flight
        self._max_cached = max_cached
        self._whoami = (
            URL.from_text(homeserver_url.rstrip("/") + WHOAMI_PATH)
            .to_uri()
            .to_text()
            .encode("ascii")
        )
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = MAX_HOMESERVER_IDLE_CONNECTIONS
        self._pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
        self._agent = Agent.usingEndpointFactory(
            reactor, _HomeserverEndpoints(reactor, timeout_seconds), pool=self._pool
        )
        self._verdicts: OrderedDict[bytes, tuple[float, Verdict]] = OrderedDict()
        self._lookups: dict[bytes, _Lookup] = {}
        self._complaints = Complaints(self._clock, self.log, homeserver_url)
        self._closed = False

    @property
    def lookups_in_flight(self) -> int:
        """
        Questions to the homeserver being asked now.
        """
        return len(self._lookups)

    @property
    def cached(self) -> int:
        """
        Verdicts remembered now (some may have expired, unread).
        """
        return len(self._verdicts)

    def may_create(self, authorization: Sequence[bytes] | None) -> Deferred[bool]:
        if not authorization:
            return succeed(False)
        try:
            token = bearer_token(authorization)
        except InvalidTokenError as e:
            return fail(e)
        key = hashlib.sha256(token).digest()
        verdict = self._remembered(key)
        if verdict is not None:
            d: Deferred[bool] = Deferred()
            answered(d, verdict)
            return d
        lookup = self._lookups.get(key)
        if lookup is None:
            if self._closed:
                return fail(HomeserverUnavailableError())
            if len(self._lookups) >= self._max_in_flight:
                self._complaints.note(f"over {self._max_in_flight} questions in flight")
                return fail(HomeserverUnavailableError())
            lookup = self._ask(key, token)
        return lookup.join()

    def close(self) -> Deferred[None]:
        """
        Stop asking: the questions in flight are cancelled (their
        requesters answered 503), as is any later one, and the pool's idle
        connections closed; fires once they are.
        """
        self._closed = True
        for lookup in list(self._lookups.values()):
            if lookup.asking is not None:
                lookup.asking.cancel()
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    def _remembered(self, key: bytes) -> Verdict | None:
        entry = self._verdicts.get(key)
        if entry is None:
            return None
        if self._clock.seconds() >= entry[0]:
            del self._verdicts[key]
            return None
        self._verdicts.move_to_end(key)
        return entry[1]

    def _remember(self, key: bytes, verdict: Verdict) -> None:
        self._verdicts[key] = (self._clock.seconds() + self._cache_seconds, verdict)
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > self._max_cached:
            self._verdicts.popitem(last=False)

    def _ask(self, key: bytes, token: bytes) -> _Lookup:
        """
        Start the question about C{token} (whose key is C{key}), bounded by
        the timeout; its requesters are answered when it ends.
        """
        lookup = _Lookup()
        self._lookups[key] = lookup
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            asking.cancel()

        def settle(result: Verdict | Failure) -> None:
            if timer.active():
                timer.cancel()
            del self._lookups[key]
            if isinstance(result, Failure):
                if not self._closed:
                    self._complaints.note(
                        f"no answer within {self._timeout_seconds:g} s"
                        if timed_out
                        else failure_kind(result)
                    )
                lookup.settle(None)
            else:
                self._remember(key, result)
                lookup.settle(result)

        # The timer first: a question may fail at once (a refused
        # connection on some reactors), and settling it cancels the timer.
        timer: IDelayedCall = self._reactor.callLater(self._timeout_seconds, expire)
        asking = Deferred.fromCoroutine(self._whoami_verdict(token))
        lookup.asking = asking.addBoth(settle)
        return lookup

    async def _whoami_verdict(self, token: bytes) -> Verdict:
        response: IResponse = await self._agent.request(
            b"GET",
            self._whoami,
            Headers(
                {
                    b"Authorization": [b"Bearer " + token],
                    b"Accept": [b"application/json"],
                    b"User-Agent": [SERVER],
                }
            ),
        )
        body = await read_bounded(response, MAX_WHOAMI_BYTES)
        return judge(response.code, body)
