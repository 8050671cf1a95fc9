"""
What both protocol generations share: a rendezvous' id as a URL names it, the
read (long-polling on C{If-None-Match}), the delete, the request body, and
the base URL that created rendezvous are named under.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from klein.interfaces import IKleinRequest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed

from rendezvous_twisted.core import conditions
from rendezvous_twisted.core.conditions import Condition
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.store import NotFound, RendezvousStore, Version, Wakeup
from rendezvous_twisted.http.answers import JSON, ForbiddenError, http_date, respond
from rendezvous_twisted.http.guard import Guard

# Ids are minted by secrets.token_urlsafe(16): 22 URL-safe characters.  A
# little slack costs nothing; anything else can never name a rendezvous.
_ID = re.compile(r"[A-Za-z0-9_-]{16,64}\Z")
# A Host header fit to build a URL from: a name or IPv4 address, or an IPv6
# literal, and an optional port.  Anything else falls back to our own address.
_HOST = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")


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


def known_id(rendezvous_id: str) -> str:
    """
    C{rendezvous_id}, if it could name a rendezvous; else L{NotFound}, as
    unknown as any other id.
    """
    if _ID.match(rendezvous_id) is None:
        raise NotFound()
    return rendezvous_id


def refuse_head(request: IRequest) -> None:
    """
    Refuse HEAD with 405, as every route does: werkzeug routes it to every
    GET route, and a GET's answer without its body is no answer here.
    """
    if request.method == b"HEAD":
        mapper = IKleinRequest(request).mapper
        raise MethodNotAllowed(valid_methods=mapper.allowed_methods())


def media_type(content_type: bytes) -> bytes:
    """
    The media type of a C{Content-Type} value, lower-cased, its parameters
    (a charset, say) left out: RFC 9110 8.3.1 compares types so.
    """
    return content_type.split(b";", 1)[0].strip(b" \t").lower()


def refuse_navigation(request: IRequest) -> None:
    """
    Refuse a browser opening a payload's URL itself (not a page's fetch()),
    so that nobody can host pages or files here for people to open: 403.
    """
    headers = request.requestHeaders
    mode = headers.getRawHeaders(b"Sec-Fetch-Mode")
    destination = headers.getRawHeaders(b"Sec-Fetch-Dest")
    if mode == [b"navigate"] or destination == [b"document"]:
        raise ForbiddenError("payloads cannot be opened as pages")


def body_of(request: IRequest) -> bytes:
    """
    The body of C{request}, read whole.  Its size is the store's to judge
    (and the request's, before it was read).
    """
    content = request.content
    assert content is not None
    content.seek(0)
    body: bytes = content.read()
    return body


class Generation:
    """
    The store, and what both generations answer alike over it.
    """

    def __init__(
        self, store: RendezvousStore, config: Config, clock: IReactorTime, guard: Guard
    ) -> None:
        """
        @param clock: times wake latency for the metrics.
        @param guard: tells who a client is, and whether it may create.
        """
        self._store = store
        self._config = config
        self._clock = clock
        self._guard = guard
        self._metrics = guard.metrics

    def payload(
        self, version: Version, request: IRequest, content_type: bytes | None = None
    ) -> bytes:
        """
        A 200 with the payload of C{version}, and its stored type or
        C{content_type} when given.
        """
        return respond(request, 200, version.body, content_type or version.content_type, version)

    def read_rendezvous(
        self, request: IRequest, rendezvous_id: str, content_type: bytes | None = None
    ) -> Deferred[bytes]:
        """
        GET, long-polling on a matching If-None-Match.  A 200 carries the
        stored Content-Type, or C{content_type} when given.
        """
        refuse_head(request)
        known_id(rendezvous_id)
        refuse_navigation(request)
        headers = request.requestHeaders
        if_none_match = conditions.parse(headers.getRawHeaders(b"If-None-Match"))
        if if_none_match is None:
            d = self._store.read(rendezvous_id)
            return d.addCallback(self.payload, request, content_type)

        def answer(wakeup: Wakeup) -> bytes:
            version = wakeup.version
            if wakeup.changed:
                return self.payload(version, request, content_type)
            return respond(request, 304, b"", version.content_type, version)

        return self.long_poll(request, rendezvous_id, if_none_match).addCallback(answer)

    def long_poll(
        self, request: IRequest, rendezvous_id: str, if_none_match: Condition
    ) -> Deferred[Wakeup]:
        """
        Wait for a payload that C{if_none_match} does not name (the store's
        L{wait_for_change}), for the poll timeout or less if the client
        prefers (RFC 7240 C{Prefer: wait}): the answer is dated when it is
        made, and a wake by a write counts in the wake-latency metric.
        """
        headers = request.requestHeaders
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
                request.responseHeaders.setRawHeaders(b"Date", [http_date(self._clock.seconds())])
            return result

        def woke(wakeup: Wakeup) -> Wakeup:
            version = wakeup.version
            # A wake is a write made while the reader waited: a store that
            # answers later (Redis) answers an older payload late too, and
            # that reader never waited for it.
            if wakeup.changed and parked and version.last_modified >= asked:
                self._metrics.woke(self._clock.seconds() - version.last_modified)
            return wakeup

        # A client that hangs up meanwhile has this cancelled by Klein, and
        # the store's canceller frees its slot.
        waiting = self._store.wait_for_change(rendezvous_id, if_none_match, timeout)
        answered = waiting.addBoth(dated).addCallback(woke)
        # Had the store answered at once, woke() has run by now; if it runs
        # later, the reader was parked and a write woke it.
        parked = True
        return answered

    def delete_rendezvous(self, request: IRequest, rendezvous_id: str) -> Deferred[bytes]:
        """
        DELETE: 204.
        """
        d = self._store.delete(known_id(rendezvous_id))
        return d.addCallback(lambda _: respond(request, 204, b"", JSON))

    def base_url(self, request: IRequest) -> str:
        """
        The URL that created rendezvous are named under: the public URL if
        configured, else the request's scheme and Host (or our own address
        for a Host unfit for a URL), with a slash at the end.
        """
        base = self._config.base_url
        if base is not None:
            return base
        secure = self._guard.client(request).secure
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
