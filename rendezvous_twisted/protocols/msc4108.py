"""
MSC4108's rendezvous sessions ("insecure rendezvous session", the protocol of
today's Element Web and Element X, and of Synapse), served from the same store
as the native protocol: Klein routes over the store contract, with what
MSC4108 asks that the native protocol does not: its paths (fixed create
paths, and sessions under a configurable prefix), its body type, its strict
C{If-Match}, the unstable error code of its C{412}.

A session is an ordinary rendezvous of the store: its id is also valid under
the native URL (both are bearer secrets of the same strength), it counts
against the same caps, and it expires after the same fixed TTL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from rendezvous_twisted.core import conditions
from rendezvous_twisted.core.conditions import Condition
from rendezvous_twisted.core.config import MSC4108_MAX_BYTES, Config
from rendezvous_twisted.core.store import PreconditionFailed, RendezvousStore, Version
from rendezvous_twisted.http.answers import (
    JSON,
    BadRequestError,
    HTTPError,
    PayloadTooLargeError,
    respond,
)
from rendezvous_twisted.http.guard import Guard
from rendezvous_twisted.protocols.common import Generation, body_of, known_id, media_type

#: Create, as Synapse and today's clients call it.
UNSTABLE_CREATE_PATH = "/_matrix/client/unstable/org.matrix.msc4108/rendezvous"
#: Create, as the proposal names it for the stable API.
STABLE_CREATE_PATH = "/_matrix/client/v1/rendezvous"
CREATE_PATHS = frozenset((UNSTABLE_CREATE_PATH, STABLE_CREATE_PATH))

#: The one body type: stored, and answered on every 200, exactly so
#: (clients compare it with ==).
TEXT_PLAIN = b"text/plain"
#: The 412 body's extra field: the proposal's error code, unstable-prefixed
#: beside the stable C{M_UNKNOWN}, as Synapse answers it.
CONCURRENT_WRITE_FIELDS: Mapping[str, str] = {"org.matrix.msc4108.errcode": "M_CONCURRENT_WRITE"}


class ConcurrentWrite(HTTPError):
    """
    A stale C{If-Match} on a session: a 412 in MSC4108's words, with the
    current ETag.
    """

    code = 412
    errcode = "M_UNKNOWN"
    extra = CONCURRENT_WRITE_FIELDS

    def __init__(self, failure: PreconditionFailed) -> None:
        super().__init__("If-Match matches no current ETag")
        self.version = failure.current


def is_text_plain(value: bytes) -> bool:
    """
    Whether a C{Content-Type} is C{text/plain}: the media type compared
    without case (RFC 9110 8.3.1), parameters such as a charset allowed, as a
    browser's fetch() adds one to a string body when the page sets no type.
    """
    return media_type(value) == TEXT_PLAIN


def is_single_strong(condition: Condition) -> bool:
    """
    Whether an C{If-Match} names exactly one strong ETag: MSC4108 accepts
    nothing else (no C{*}, no list, no weak tag).
    """
    return not condition.any and len(condition.strong) == 1 and not condition.weak


class MSC4108(Generation):
    """
    MSC4108's routes, added to C{app} when made: its create paths, and its
    sessions under the configured prefix.
    """

    def __init__(
        self, app: Klein, store: RendezvousStore, config: Config, clock: IReactorTime, guard: Guard
    ) -> None:
        super().__init__(store, config, clock, guard)
        # The stable create path is MSC4388's too: the composition routes
        # its POSTs (rendezvous_twisted.protocols).
        app.route(UNSTABLE_CREATE_PATH, methods=["POST"], endpoint="msc4108.create")(self.create)
        session = config.msc4108_session_prefix + "<session_id>"
        app.route(session, methods=["GET"], endpoint="msc4108.read")(self.read)
        app.route(session, methods=["PUT"], endpoint="msc4108.write")(self.write)
        app.route(session, methods=["DELETE"], endpoint="msc4108.delete")(self.delete)

    def create(self, request: IRequest) -> Deferred[bytes]:
        """
        POST to a create path: 201 with JSON C{{"url": ...}}, the absolute
        session URL, and no Location.
        """
        body = self._body(request)
        d = self._store.create(body, TEXT_PLAIN, self._guard.creator(request))

        def created(version: Version) -> bytes:
            prefix = self._config.msc4108_session_prefix.lstrip("/")
            url = self.base_url(request) + prefix + version.rendezvous_id
            return respond(request, 201, json.dumps({"url": url}).encode("ascii"), JSON, version)

        return d.addCallback(created)

    def read(self, request: IRequest, session_id: str) -> Deferred[bytes]:
        """
        GET a session: its payload, always as text/plain.
        """
        return self.read_rendezvous(request, session_id, TEXT_PLAIN)

    def write(self, request: IRequest, session_id: str) -> Deferred[bytes]:
        """
        PUT on a session: If-Match with exactly one strong ETag is required.
        """
        known_id(session_id)
        values = request.requestHeaders.getRawHeaders(b"If-Match")
        if not values:
            raise BadRequestError("M_MISSING_PARAM", "If-Match is required")
        if_match = conditions.parse(values)
        if if_match is None or not is_single_strong(if_match):
            raise BadRequestError("M_INVALID_PARAM", "If-Match must be one strong ETag")
        body = self._body(request)
        d = self._store.write(session_id, body, TEXT_PLAIN, if_match)

        def stale(failure: Failure) -> None:
            failure.trap(PreconditionFailed)
            assert isinstance(failure.value, PreconditionFailed)
            raise ConcurrentWrite(failure.value)

        d.addErrback(stale)
        return d.addCallback(lambda version: respond(request, 202, b"", JSON, version))

    def delete(self, request: IRequest, session_id: str) -> Deferred[bytes]:
        """
        DELETE a session: 204.
        """
        return self.delete_rendezvous(request, session_id)

    def _body(self, request: IRequest) -> bytes:
        """
        The body of an MSC4108 POST or PUT: text/plain, within the limit.
        """
        values = request.requestHeaders.getRawHeaders(b"Content-Type")
        if not values or values == [b""]:
            raise BadRequestError("M_MISSING_PARAM", "Content-Type is required: text/plain")
        if len(values) > 1 or not is_text_plain(values[0]):
            raise BadRequestError("M_INVALID_PARAM", "Content-Type must be text/plain")
        body = body_of(request)
        limit = min(MSC4108_MAX_BYTES, self._store.max_bytes)
        if len(body) > limit:
            raise PayloadTooLargeError(limit)
        return body
