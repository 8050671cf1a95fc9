"""
A Twisted client for MSC4388's insecure rendezvous sessions (the JSON
sessions of Matrix's "sign in with QR"), on treq.

    client = MSC4388Client(reactor, "https://matrix.example.org")
    if await client.discover():
        session = await client.create("hello")       # show session.id and the base URL
        payload = await client.receive(session)      # waits for the other side's send
        session = await client.send(payload.session, "answer")
        await client.delete(session)

A session is named by its id on the client's server (its base URL and
prefix), not by a URL of its own.  Every method returns a Deferred; a
refusal fails it with the typed errors of L{rendezvous_twisted.client.
rendezvous}: L{NotFoundError} (L{UnrecognizedError} where the server does
not serve the API, L{GoneWhileWaitingError} to a receive),
L{ConcurrentWriteError} (409, a stale sequence token),
L{UnauthorizedError} (401, a refused access token), L{ForbiddenError}
(403), or L{ServerError}.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IResponse

from rendezvous_twisted.client.rendezvous import (
    DEFAULT_RECEIVE_TIMEOUT_SECONDS,
    DEFAULT_REQUEST_TIMEOUT_SECONDS,
    HTTPClientBase,
    HTTPRequester,
    ServerError,
)

#: Where MSC4388 lives under a server's base URL: the unstable prefix (what
#: the clients in the field, and Synapse, use while the proposal is open)
#: and the stable one (the proposal's own, shared with MSC4108's create).
UNSTABLE_PREFIX = "/_matrix/client/unstable/io.element.msc4388/rendezvous"
STABLE_PREFIX = "/_matrix/client/v1/rendezvous"
PREFIXES = {"unstable": UNSTABLE_PREFIX, "stable": STABLE_PREFIX}
#: How many times L{MSC4388Client.send} tries one transaction whose answer
#: was lost, and how long it pauses between tries.
DEFAULT_SEND_ATTEMPTS = 3
SEND_RETRY_PAUSE_SECONDS = 1.0
JSON = "application/json"

#: A send whose answer never came, which the same transaction may repeat:
#: no connection, a connection lost, our own bound, or a gateway's error.
_LOST = (
    ConnectError,
    ConnectionClosed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    TimeoutError,
)
_GATEWAY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class Session:
    """
    One MSC4388 session as this client last saw it.  Immutable: operations
    that change it return a new one.
    """

    #: The session's id (with the server's base URL, what the QR code holds).
    id: str
    #: The token of the payload last written or read through this object
    #: (None: not known yet; a receive then returns what is there).
    sequence_token: str | None
    #: When the server forgets it, in seconds on the client's clock (None
    #: if not known yet).
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    """
    The data read from a session, and the session as of that read (its
    sequence token is this data's: pass it on to send or receive again).
    """

    data: str
    session: Session


def _field(response: IResponse, parsed: Any, name: str, kind: type) -> Any:
    """
    The field C{name} of a JSON answer, of type C{kind}; else a
    L{ServerError} saying the answer is not MSC4388's.
    """
    value = parsed.get(name) if isinstance(parsed, dict) else None
    # bool is an int to Python, never to JSON.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ServerError(
            response.code, None, f"the server's answer has no {kind.__name__} {name!r}"
        )
    return value


class MSC4388Client(HTTPClientBase):
    """
    Discover, create, read, receive, send and delete MSC4388 sessions on
    the server at C{base_url} (a Matrix base URL: a trailing slash or not).

    @param prefix: the API's path under C{base_url} (L{UNSTABLE_PREFIX} by
        default, L{STABLE_PREFIX}).
    @param access_token: sent (C{Authorization: Bearer}) on discovery and
        create only, as the proposal asks; sessions are anonymous.
    @param send_attempts: how many times a send whose answer was lost is
        tried, with the same transaction id.
    The other parameters are L{HTTPClientBase}'s.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        base_url: str,
        http: HTTPRequester | None = None,
        *,
        prefix: str = UNSTABLE_PREFIX,
        access_token: str | None = None,
        request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
        send_attempts: int = DEFAULT_SEND_ATTEMPTS,
    ) -> None:
        super().__init__(reactor, http, request_timeout_seconds=request_timeout_seconds)
        self.base_url = base_url
        #: The discovery and create URL; sessions live below it.
        self.endpoint = base_url.rstrip("/") + prefix
        self._access_token = access_token
        self._send_attempts = max(1, send_attempts)

    def session_url(self, session: Session | str) -> str:
        """
        The URL of a session (a L{Session} or its id).
        """
        session_id = session if isinstance(session, str) else session.id
        return f"{self.endpoint}/{quote(session_id, safe='')}"

    def discover(self) -> Deferred[bool]:
        """
        Whether this requester may create sessions here (C{create_available}).
        """
        return self._run(self._discover())

    def create(self, data: str = "") -> Deferred[Session]:
        """
        Create a session holding C{data}; returns it with its id, sequence
        token and expiry.
        """
        return self._run(self._create(data))

    def read(self, session: Session | str) -> Deferred[Payload]:
        """
        The current data of a session (a L{Session} or its id), at once.
        """
        if isinstance(session, str):
            session = Session(session, None)
        return self._run(self._read(session, None, None))

    def receive(
        self, session: Session, timeout_seconds: float = DEFAULT_RECEIVE_TIMEOUT_SECONDS
    ) -> Deferred[Payload]:
        """
        Wait for data other than that of C{session.sequence_token} (at once
        if there is some already, or if the token is None), long-polling
        with C{?sequence_token=} (and C{Prefer: wait} with what is left of
        the bound): a server that holds the poll answers when the token
        changes, one that does not is polled once a second.  After
        C{timeout_seconds} in all it fails with L{ReceiveTimeout}; with
        L{GoneWhileWaitingError} when the session is deleted or expires
        meanwhile.
        """
        return self._run(self._receive(session, timeout_seconds))

    def send(self, session: Session, data: str, *, txn_id: str | None = None) -> Deferred[Session]:
        """
        Replace the data, if C{session.sequence_token} is still the current
        one (else L{ConcurrentWriteError}); returns the session with its new
        token.

        The send is one transaction, named by C{txn_id} (a new random one of
        128 bits when None): when its answer is lost (no connection, a
        connection lost, no answer in time, a gateway's 502, 503 or 504) it
        is tried again with the same id, up to C{send_attempts} times, and
        the server answers a repeat with what it answered the first (the
        same token, or the same conflict) without writing twice.
        """
        if session.sequence_token is None:
            raise ValueError("a send needs the session's sequence token; read it first")
        return self._run(self._send(session, data, txn_id or secrets.token_urlsafe(16)))

    def delete(self, session: Session | str) -> Deferred[None]:
        """
        Delete a session (a L{Session} or its id).
        """
        return self._run(self._delete(session))

    # The protocol.

    def _authorization(self) -> dict[str, str]:
        if self._access_token is None:
            return {}
        return {"Authorization": f"Bearer {self._access_token}"}

    async def _json(
        self, method: str, url: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[IResponse, Any]:
        """
        Make a request (with C{body} as JSON, when not None); return the
        response and its JSON, or raise the server's refusal.
        """
        headers = dict(headers or {})
        data = None
        if body is not None:
            headers["Content-Type"] = JSON
            data = json.dumps(body).encode("utf-8")
        response = await self._request(method, url, headers, data)
        content = await self._content(response)
        if response.code // 100 != 2:
            raise self._error(response, content)
        try:
            return response, json.loads(content)
        except ValueError:
            return response, None

    async def _discover(self) -> bool:
        response, parsed = await self._json("GET", self.endpoint, headers=self._authorization())
        available: bool = _field(response, parsed, "create_available", bool)
        return available

    async def _create(self, data: str) -> Session:
        response, parsed = await self._json(
            "POST", self.endpoint, {"data": data}, self._authorization()
        )
        return Session(
            id=_field(response, parsed, "id", str),
            sequence_token=_field(response, parsed, "sequence_token", str),
            expires=self._expires(response, parsed),
        )

    async def _read(self, session: Session, after: str | None, timeout: float | None) -> Payload:
        """
        A GET of the session: at once, or held by the server until the
        token is no longer C{after}.  A 404 is L{GoneWhileWaitingError}
        when C{timeout} (a receive's) is given.
        """
        url = self.session_url(session)
        headers: dict[str, str] = {}
        if after is not None:
            url += "?sequence_token=" + quote(after, safe="")
            if timeout is not None:
                # Ask the server not to hold the poll past our own bound.
                headers["Prefer"] = f"wait={max(1, math.ceil(timeout))}"
        response = await self._request("GET", url, headers, timeout=timeout)
        content = await self._content(response)
        if response.code != 200:
            raise self._gone(response, content) if timeout else self._error(response, content)
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        return Payload(
            data=_field(response, parsed, "data", str),
            session=replace(
                session,
                sequence_token=_field(response, parsed, "sequence_token", str),
                expires=self._expires(response, parsed),
            ),
        )

    async def _receive(self, session: Session, timeout_seconds: float) -> Payload:
        after = session.sequence_token

        async def attempt(remaining: float) -> Payload | None:
            payload = await self._read(session, after, remaining)
            if payload.session.sequence_token != after:
                return payload
            return None

        return await self._poll(timeout_seconds, attempt)

    async def _send(self, session: Session, data: str, txn_id: str) -> Session:
        url = f"{self.session_url(session)}/{quote(txn_id, safe='')}"
        body = {"sequence_token": session.sequence_token, "data": data}
        for attempt in range(1, self._send_attempts + 1):
            try:
                response, parsed = await self._json("PUT", url, body)
            except _LOST:
                if attempt == self._send_attempts:
                    raise
            except ServerError as e:
                if e.status not in _GATEWAY_STATUSES or attempt == self._send_attempts:
                    raise
            else:
                token: str = _field(response, parsed, "sequence_token", str)
                return replace(session, sequence_token=token)
            await deferLater(self._reactor, SEND_RETRY_PAUSE_SECONDS, lambda: None)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _delete(self, session: Session | str) -> None:
        await self._json("DELETE", self.session_url(session))

    def _expires(self, response: IResponse, parsed: Any) -> float:
        milliseconds: int = _field(response, parsed, "expires_in_ms", int)
        return self._reactor.seconds() + milliseconds / 1000
