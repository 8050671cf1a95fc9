"""
A Twisted client for the rendezvous protocol of SPEC.md, on treq.

    client = RendezvousClient(reactor)
    rendezvous = await client.create("https://rendezvous.example.org/", b"hello")
    print(rendezvous.url)                       # show it as a QR code
    message = await client.receive(rendezvous)  # long-polls until the other side writes
    rendezvous = await client.send(message.rendezvous, b"answer")
    await client.cancel(rendezvous)

Every method returns a Deferred (so it can be awaited in an C{async def}
under C{Deferred.fromCoroutine} or C{task.react}).  A refusal by the server
fails it with L{ServerError} (or its subclass for the status: L{NotFoundError},
L{PreconditionFailedError}...), carrying the status and the server's JSON
C{errcode} and C{error}.  Nothing here touches the global reactor: the
caller passes one.

L{HTTPClientBase} is what this client shares with MSC4388's
(L{rendezvous_twisted.client.msc4388}): bounded requests, typed refusals
and the long-poll loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.client import Agent
from twisted.web.http import stringToDatetime
from twisted.web.iweb import IResponse

_T = TypeVar("_T")

OCTET_STREAM = "application/octet-stream"
#: How long to wait before polling again when a 304 came back at once (a
#: server, or a proxy, that does not long-poll): the once-a-second polling
#: of the clients that predate long-polling.
FALLBACK_POLL_INTERVAL_SECONDS = 1.0
#: A 304 sooner than this after its request is taken as "did not long-poll".
_IMMEDIATE_SECONDS = 0.5
#: Default bound on the whole of one L{RendezvousClient.receive}.
DEFAULT_RECEIVE_TIMEOUT_SECONDS = 60.0
#: Bound on every request that is not a long-poll.
DEFAULT_REQUEST_TIMEOUT_SECONDS = 30.0


class HTTPRequester(Protocol):
    """
    What the client needs to make requests: C{treq.client.HTTPClient}, the
    C{treq} module itself, or C{treq.testing.StubTreq}.
    """

    # A Callable attribute rather than a method, so that HTTPClient's
    # keyword-only signature fits: request(method, url, headers=, data=, ...).
    @property
    def request(self) -> Callable[..., Deferred[Any]]: ...


class ServerError(Exception):
    """
    The server refused a request.  C{status} is the HTTP status; C{errcode}
    and C{error} come from its JSON body (None when it had none, as from a
    proxy's error page); C{retry_after_seconds} from C{Retry-After} on a 429.
    """

    def __init__(
        self,
        status: int,
        errcode: str | None,
        error: str | None,
        retry_after_seconds: int | None = None,
    ) -> None:
        super().__init__(f"{status} {errcode or 'no errcode'}: {error or 'no message'}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.retry_after_seconds = retry_after_seconds

    @property
    def details(self) -> tuple[int, str | None, str | None, int | None]:
        """
        The arguments this error was made with, to make another kind from.
        """
        return (self.status, self.errcode, self.error, self.retry_after_seconds)


class NotFoundError(ServerError):
    """
    404: the rendezvous never existed, was cancelled, or expired.
    """


class GoneWhileWaitingError(NotFoundError):
    """
    404 to L{RendezvousClient.receive}: the rendezvous expired, or was
    cancelled, before the other device wrote to it.
    """

    def __str__(self) -> str:
        return (
            f"{super().__str__()}: the rendezvous expired or was cancelled before the other "
            "device wrote to it (the other device must read it and send its answer within "
            "the rendezvous' lifetime)"
        )


class UnrecognizedError(NotFoundError):
    """
    404 C{M_UNRECOGNIZED}: the server does not serve this API here (an
    MSC4388 server whose API is switched off, or another prefix).
    """


class PreconditionFailedError(ServerError):
    """
    412: someone wrote since the ETag the writer held.  C{current_etag} is
    the ETag now stored (re-read it before writing again).
    """

    current_etag: str | None = None


class ConcurrentWriteError(ServerError):
    """
    409 (MSC4388's C{M_CONCURRENT_WRITE}): someone wrote since the sequence
    token the writer held; read the session again before sending.
    """


class UnauthorizedError(ServerError):
    """
    401 (C{M_UNKNOWN_TOKEN}, C{M_MISSING_TOKEN}): the server refused the
    access token given.
    """


class ForbiddenError(ServerError):
    """
    403 (C{M_FORBIDDEN}): the server's policy refuses this requester (an
    MSC4388 create without a token where only a homeserver's users may
    create, or an address it denies).
    """


#: The error each status is, beyond a plain L{ServerError}.
_KINDS: dict[int, type[ServerError]] = {
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConcurrentWriteError,
    412: PreconditionFailedError,
}


class ReceiveTimeout(TimeoutError):
    """
    L{RendezvousClient.receive} saw no new payload within its bound.  (Any
    other request that outlives its bound fails with C{TimeoutError}.)
    """


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """
    One rendezvous as this client last saw it.  Immutable: operations that
    change it return a new one.
    """

    #: The absolute URL (the one to show as a QR code).
    url: str
    #: The ETag of the payload last written or read through this object.
    etag: str | None
    #: When the server forgets it, in seconds since the epoch (None if the
    #: server did not say).
    expires: float | None = None
    #: The server's payload limit, when it said (on create).
    max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """
    A payload read from a rendezvous, and the rendezvous as of that read
    (its ETag is this payload's: pass it on to send or receive again).
    """

    body: bytes
    #: Exactly as the writer sent it.
    content_type: str
    rendezvous: Rendezvous


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value: bytes = values[0]
    return value.decode("latin-1")


def _expires(response: IResponse) -> float | None:
    value = _header(response, b"Expires")
    if value is None:
        return None
    try:
        return float(stringToDatetime(value.encode("latin-1")))
    except ValueError:
        return None


class HTTPClientBase:
    """
    What the clients of both protocols share: requests bounded in time on
    the caller's clock, refusals turned into typed errors, and the
    long-poll loop of a receive.

    @param reactor: provides L{IReactorTime} for timeouts and, when no
        C{http} is given, the reactor an C{Agent} connects with.
    @param http: what makes the requests (an C{HTTPClient}, C{treq}, or a
        C{StubTreq} in tests); a new C{HTTPClient} on C{Agent(reactor)}
        when None.
    @param request_timeout_seconds: bound on every request but a receive's
        long-polls (which the receive's own bound covers).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        http: HTTPRequester | None = None,
        *,
        request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        self._reactor = reactor
        self._http: HTTPRequester = http or HTTPClient(Agent(reactor))
        self._request_timeout = request_timeout_seconds

    def _run(self, coroutine: Coroutine[Deferred[Any], Any, _T]) -> Deferred[_T]:
        return Deferred.fromCoroutine(coroutine)

    def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> Deferred[IResponse]:
        d: Deferred[IResponse] = self._http.request(
            method,
            url,
            headers={k: [v] for k, v in (headers or {}).items()},
            data=body,
            # Redirects would turn a PUT into something else; the protocols
            # have none.
            allow_redirects=False,
        )
        return self._bounded(d, timeout or self._request_timeout)

    def _content(self, response: IResponse) -> Deferred[bytes]:
        d: Deferred[bytes] = treq.content(response)
        return self._bounded(d, self._request_timeout)

    def _bounded(self, d: Deferred[_T], seconds: float) -> Deferred[_T]:
        """
        C{d}, cancelled after C{seconds} on our clock and then failing with
        C{TimeoutError}.  (Not C{Deferred.addTimeout}: an Agent's cancelled
        request fails with C{ResponseNeverReceived}, which it would pass on.)
        """
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._reactor.callLater(seconds, expire)

        def settle(result: object) -> object:
            if timer.active():
                timer.cancel()
            if expired:
                raise TimeoutError(f"no answer within {seconds:g} s")
            return result

        return d.addBoth(settle)

    async def _poll(
        self, timeout_seconds: float, attempt: Callable[[float], Awaitable[_T | None]]
    ) -> _T:
        """
        Call C{attempt} (given the seconds left) until it returns something
        other than None: at once after a long-poll, and after
        L{FALLBACK_POLL_INTERVAL_SECONDS} when the server answered at once
        (it, or a proxy, does not long-poll); L{ReceiveTimeout} after
        C{timeout_seconds} in all.
        """
        clock = self._reactor
        deadline = clock.seconds() + timeout_seconds
        # Bounded in count as well as in time: one poll per second of the
        # bound, and a few more, is all a well-behaved server ever needs.
        for _ in range(int(timeout_seconds) + 10):
            remaining = deadline - clock.seconds()
            if remaining <= 0:
                break
            started = clock.seconds()
            try:
                result = await attempt(remaining)
            except TimeoutError:
                # Our own bound, not the server's: the poll is dropped (and
                # the server drops its parked entry with the connection).
                break
            if result is not None:
                return result
            if clock.seconds() - started < _IMMEDIATE_SECONDS:
                pause = min(FALLBACK_POLL_INTERVAL_SECONDS, deadline - clock.seconds())
                if pause > 0:
                    await deferLater(clock, pause, lambda: None)
        raise ReceiveTimeout(f"no new payload within {timeout_seconds:g} s")

    def _error(self, response: IResponse, content: bytes) -> ServerError:
        """
        The server's refusal as the error of its kind (see L{_KINDS}).
        """
        errcode = message = None
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            errcode = parsed.get("errcode")
            message = parsed.get("error")
        retry_after = _header(response, b"Retry-After")
        args = (
            response.code,
            errcode if isinstance(errcode, str) else None,
            message if isinstance(message, str) else None,
            int(retry_after) if retry_after and retry_after.isdigit() else None,
        )
        kind = _KINDS.get(response.code, ServerError)
        if kind is NotFoundError and errcode == "M_UNRECOGNIZED":
            kind = UnrecognizedError
        error = kind(*args)
        if isinstance(error, PreconditionFailedError):
            error.current_etag = _header(response, b"ETag")
        return error

    def _gone(self, response: IResponse, content: bytes) -> ServerError:
        """
        The refusal of a receive: a rendezvous not found is one that went
        while we waited (L{GoneWhileWaitingError}).
        """
        error = self._error(response, content)
        if type(error) is NotFoundError:
            return GoneWhileWaitingError(*error.details)
        return error


class RendezvousClient(HTTPClientBase):
    """
    Create, send, receive and cancel rendezvous on a server (the native
    protocol of SPEC.md); the parameters are L{HTTPClientBase}'s.
    """

    def create(
        self, server_url: str, body: bytes = b"", content_type: str = OCTET_STREAM
    ) -> Deferred[Rendezvous]:
        """
        Create a rendezvous holding C{body} on the server at C{server_url}
        (its base URL, any path prefix included).  The URL comes from the
        C{Location} header, as SPEC.md promises, whatever the success status.
        """
        return self._run(self._create(server_url, body, content_type))

    def read(self, url: str) -> Deferred[Message]:
        """
        The current payload of the rendezvous at C{url}, at once.
        """
        return self._run(self._read(url))

    def send(
        self,
        rendezvous: Rendezvous,
        body: bytes,
        content_type: str = OCTET_STREAM,
        *,
        if_match: bool = True,
    ) -> Deferred[Rendezvous]:
        """
        Replace the payload; returns the rendezvous with its new ETag.

        By default the write is conditional on C{rendezvous.etag}
        (C{If-Match}), so that it fails with L{PreconditionFailedError}
        rather than overwrite a payload this client has not seen; with
        C{if_match=False} it writes unconditionally.
        """
        return self._run(self._send(rendezvous, body, content_type, if_match))

    def receive(
        self,
        rendezvous: Rendezvous,
        timeout_seconds: float = DEFAULT_RECEIVE_TIMEOUT_SECONDS,
    ) -> Deferred[Message]:
        """
        Wait for a payload other than the one C{rendezvous.etag} names (at
        once if there is one already, or if the ETag is None), long-polling
        with C{If-None-Match}.  Each C{304} polls again, at once after a
        long-poll and after L{FALLBACK_POLL_INTERVAL_SECONDS} from a server
        that answered at once; after C{timeout_seconds} in all it fails
        with L{ReceiveTimeout}.  Fails with L{GoneWhileWaitingError} (a
        L{NotFoundError}) when the rendezvous is cancelled or expires
        meanwhile.
        """
        return self._run(self._receive(rendezvous, timeout_seconds))

    def cancel(self, rendezvous: Rendezvous | str) -> Deferred[None]:
        """
        Delete the rendezvous (a L{Rendezvous} or its URL).
        """
        url = rendezvous if isinstance(rendezvous, str) else rendezvous.url
        return self._run(self._cancel(url))

    # The protocol.

    async def _create(self, server_url: str, body: bytes, content_type: str) -> Rendezvous:
        response = await self._request(
            "POST", server_url, body=body, headers={"Content-Type": content_type}
        )
        content = await self._content(response)
        # Like the Matrix clients, judge by Location, not by 200 versus 201.
        location = _header(response, b"Location")
        if response.code // 100 != 2:
            raise self._error(response, content)
        if location is None:
            raise ServerError(response.code, None, "the server sent no Location header")
        max_bytes = _header(response, b"X-Max-Bytes")
        return Rendezvous(
            url=location,
            etag=_header(response, b"ETag"),
            expires=_expires(response),
            max_bytes=int(max_bytes) if max_bytes and max_bytes.isdigit() else None,
        )

    async def _read(self, url: str) -> Message:
        response = await self._request("GET", url)
        content = await self._content(response)
        if response.code != 200:
            raise self._error(response, content)
        return self._message(Rendezvous(url, None), response, content)

    async def _send(
        self, rendezvous: Rendezvous, body: bytes, content_type: str, if_match: bool
    ) -> Rendezvous:
        headers = {"Content-Type": content_type}
        if if_match:
            if rendezvous.etag is None:
                raise ValueError("a conditional send needs the rendezvous' ETag; read it first")
            headers["If-Match"] = rendezvous.etag
        response = await self._request("PUT", rendezvous.url, body=body, headers=headers)
        content = await self._content(response)
        if response.code // 100 != 2:
            raise self._error(response, content)
        return replace(
            rendezvous,
            etag=_header(response, b"ETag"),
            expires=_expires(response) or rendezvous.expires,
        )

    async def _receive(self, rendezvous: Rendezvous, timeout_seconds: float) -> Message:
        etag = rendezvous.etag

        async def attempt(remaining: float) -> Message | None:
            nonlocal etag
            headers: dict[str, str] = {}
            if etag is not None:
                # Ask the server not to hold the poll past our own bound.
                headers = {"If-None-Match": etag, "Prefer": f"wait={max(1, math.ceil(remaining))}"}
            response = await self._request("GET", rendezvous.url, headers, timeout=remaining)
            content = await self._content(response)
            if response.code == 200:
                return self._message(rendezvous, response, content)
            if response.code != 304:
                raise self._gone(response, content)
            etag = _header(response, b"ETag") or etag
            return None

        return await self._poll(timeout_seconds, attempt)

    async def _cancel(self, url: str) -> None:
        response = await self._request("DELETE", url)
        content = await self._content(response)
        if response.code // 100 != 2:
            raise self._error(response, content)

    def _message(self, rendezvous: Rendezvous, response: IResponse, content: bytes) -> Message:
        return Message(
            body=content,
            content_type=_header(response, b"Content-Type") or OCTET_STREAM,
            rendezvous=replace(
                rendezvous,
                etag=_header(response, b"ETag"),
                expires=_expires(response) or rendezvous.expires,
            ),
        )
