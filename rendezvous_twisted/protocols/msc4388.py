"""
MSC4388's rendezvous sessions (the third generation: Element X's
matrix-rust-sdk, the next Element Web, Synapse's C{msc4388_mode}), served
from the same store as the older protocols: JSON bodies, a
C{sequence_token} for the ETag, C{expires_in_ms}, sends made idempotent by
a transaction id, a discovery endpoint and a create policy.

A session is an ordinary rendezvous of the store, stored with a type of its
own (L{SESSION_TYPE}) and its own lifetime (C{--msc4388-lifetime}): its
C{data} is the payload (UTF-8), its C{sequence_token} the payload's ETag
without the quotes (24 hex digits, within the opaque identifier grammar, new
on every write).  MSC4388's paths serve MSC4388 sessions only: an id made
by another protocol is not found there.

Beyond the proposal (its "future optimisation"): a C{GET} with
C{?sequence_token=<the last one seen>} is held until the token changes, or
the poll timeout passes, and then answered as any C{GET}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from rendezvous_twisted.core.conditions import Condition
from rendezvous_twisted.core.config import (
    MSC4388_MAX_BYTES,
    MSC4388_STABLE_PATH,
    MSC4388_UNSTABLE_PATH,
    Config,
)
from rendezvous_twisted.core.store import (
    NotFound,
    PreconditionFailed,
    RendezvousStore,
    Sent,
    Version,
)
from rendezvous_twisted.http.answers import (
    JSON,
    BadRequestError,
    ForbiddenError,
    HTTPError,
    PayloadTooLargeError,
    UnknownPathError,
    respond,
)
from rendezvous_twisted.http.guard import Guard
from rendezvous_twisted.http.tokens import CreatePolicy
from rendezvous_twisted.protocols.common import (
    Generation,
    body_of,
    known_id,
    media_type,
    refuse_head,
    refuse_navigation,
)

#: The type an MSC4388 session is stored with: its data is UTF-8 text, and
#: the profile tells it from the payloads of the other protocols.
SESSION_TYPE = b"text/plain; charset=utf-8; profile=msc4388"
#: The 409's error code: the proposal's unstable name under its unstable
#: prefix (as Synapse answers), the stable one under the stable path.
CONCURRENT_WRITE = {False: "IO_ELEMENT_MSC4388_CONCURRENT_WRITE", True: "M_CONCURRENT_WRITE"}
#: A transaction id: the opaque identifier grammar of the Matrix spec.
_TRANSACTION = re.compile(r"[0-9A-Za-z._~-]{1,255}\Z")
_STABLE = MSC4388_STABLE_PATH.encode("ascii")


class ConcurrentWrite(HTTPError):
    """
    A send whose C{sequence_token} is not the current one.
    """

    code = 409

    def __init__(self, stable: bool) -> None:
        super().__init__("sequence_token is not the current one: GET the session and send again")
        self.errcode = CONCURRENT_WRITE[stable]


def is_json(values: list[bytes] | None) -> bool:
    """
    Whether C{Content-Type} values name C{application/json} (the media type
    compared without case, parameters allowed): how the stable path tells
    an MSC4388 create from an MSC4108 one.
    """
    if not values or len(values) > 1:
        return False
    return media_type(values[0]) == JSON


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_object(request: IRequest) -> Mapping[str, Any]:
    """
    The request's body as a JSON object: 400 C{M_NOT_JSON} when it is not
    JSON (NaN and Infinity are not), C{M_BAD_JSON} when it is not an object.
    """
    try:
        value = json.loads(body_of(request), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise BadRequestError("M_NOT_JSON", "the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequestError("M_BAD_JSON", "the body must be a JSON object")
    return value


def string_field(body: Mapping[str, Any], name: str) -> str:
    """
    A required string field of a JSON body: 400 C{M_MISSING_PARAM} when
    absent, C{M_INVALID_PARAM} when not a string.
    """
    if name not in body:
        raise BadRequestError("M_MISSING_PARAM", f"{name} is required")
    value = body[name]
    if not isinstance(value, str):
        raise BadRequestError("M_INVALID_PARAM", f"{name} must be a string")
    return value


def token_of(version: Version) -> str:
    """
    The C{sequence_token} of a payload: its ETag without the quotes.
    """
    return version.etag[1:-1].decode("ascii")


def condition_of(sequence_token: str) -> Condition:
    """
    The condition that a payload is the one C{sequence_token} names (or,
    for a token no payload can have, one that matches none).
    """
    etag = b'"%s"' % sequence_token.encode("utf-8", "surrogatepass")
    return Condition(any=False, strong=frozenset((etag,)), weak=frozenset())


class MSC4388(Generation):
    """
    MSC4388's routes under its unstable prefix and the stable path, added to
    C{app} when made; all of them answer 404 C{M_UNRECOGNIZED} while the
    API is off.  The stable path's C{POST} is shared with MSC4108: the
    composition (L{rendezvous_twisted.protocols}) routes it here when its
    body is JSON (L{is_json}), to L{create}.
    """

    def __init__(
        self,
        app: Klein,
        store: RendezvousStore,
        config: Config,
        clock: IReactorTime,
        guard: Guard,
        policy: CreatePolicy,
    ) -> None:
        super().__init__(store, config, clock, guard)
        self._enabled = config.msc4388 != "off"
        self._policy = policy
        self._limit = min(MSC4388_MAX_BYTES, store.max_bytes)
        for number, path in enumerate((MSC4388_UNSTABLE_PATH, MSC4388_STABLE_PATH)):
            route = f"msc4388.{number}"
            app.route(path, methods=["GET"], endpoint=f"{route}.discover")(self.discover)
            if path == MSC4388_UNSTABLE_PATH:
                app.route(path, methods=["POST"], endpoint=f"{route}.create")(self.create)
            session = path + "/<session_id>"
            app.route(session, methods=["GET"], endpoint=f"{route}.read")(self.read)
            app.route(session, methods=["PUT"], endpoint=f"{route}.put")(self.put)
            app.route(session, methods=["DELETE"], endpoint=f"{route}.delete")(self.delete)
            app.route(session + "/<txn_id>", methods=["PUT"], endpoint=f"{route}.send")(self.send)

    def discover(self, request: IRequest) -> Deferred[bytes]:
        """
        GET the API: 200 C{{"create_available": ...}}, whether this
        requester may create a session (by the network policy and the
        create policy; an invalid access token is a 401 all the same).
        """
        self._check_enabled()
        refuse_head(request)
        d = self._policy.may_create(request.requestHeaders.getRawHeaders(b"Authorization"))

        def answer(allowed: bool) -> bytes:
            allowed = allowed and self._guard.clients.may_create(self._guard.client(request))
            body = json.dumps({"create_available": allowed}).encode("ascii")
            return respond(request, 200, body, JSON)

        return d.addCallback(answer)

    def create(self, request: IRequest) -> Deferred[bytes]:
        """
        POST C{{"data": ...}}: 200 C{{"id", "sequence_token",
        "expires_in_ms"}}, if the create policy lets the requester create.
        """
        self._check_enabled()
        data = self._data(json_object(request))
        owner = self._guard.creator(request)
        d = self._policy.may_create(request.requestHeaders.getRawHeaders(b"Authorization"))

        def judged(allowed: bool) -> Deferred[Version]:
            if not allowed:
                raise ForbiddenError("this requester may not create rendezvous sessions")
            return self._store.create(
                data, SESSION_TYPE, owner, self._config.msc4388_lifetime_seconds
            )

        def created(version: Version) -> bytes:
            answer = {"id": version.rendezvous_id, **self._state(version)}
            return respond(request, 200, json.dumps(answer).encode("ascii"), JSON, version)

        return d.addCallback(judged).addCallback(created)

    def read(self, request: IRequest, session_id: str) -> Deferred[bytes]:
        """
        GET a session: 200 C{{"data", "sequence_token", "expires_in_ms"}};
        with C{?sequence_token=}, held until the token changes.
        """
        self._check_enabled()
        refuse_head(request)
        known_id(session_id)
        refuse_navigation(request)
        seen = self._seen_token(request)
        if seen is None:
            d = self._store.read(session_id)
        else:
            waiting = self.long_poll(request, session_id, condition_of(seen))
            d = waiting.addCallback(lambda wakeup: wakeup.version)

        def answer(version: Version) -> bytes:
            if version.content_type != SESSION_TYPE:
                raise NotFound()
            try:
                data = version.body.decode("utf-8")
            except UnicodeDecodeError:
                raise NotFound() from None
            body = json.dumps({"data": data, **self._state(version)}).encode("ascii")
            return respond(request, 200, body, JSON, version)

        return d.addCallback(answer)

    def send(self, request: IRequest, session_id: str, txn_id: str) -> Deferred[bytes]:
        """
        PUT C{{"sequence_token", "data"}} by transaction: 200
        C{{"sequence_token"}}, or 409 on a token that is not the current
        one; either answer recorded, and replayed for the same C{txn_id}.
        """
        self._check_enabled()
        known_id(session_id)
        if _TRANSACTION.match(txn_id) is None:
            raise BadRequestError(
                "M_INVALID_PARAM", "the transaction id must be 1 to 255 of [0-9A-Za-z._~-]"
            )
        token, data = self._sent(request)
        d = self._store.send(session_id, data, SESSION_TYPE, condition_of(token), txn_id)

        def answer(sent: Sent) -> bytes:
            if sent.etag is None:
                raise ConcurrentWrite(self._stable(request))
            body = json.dumps({"sequence_token": sent.etag[1:-1].decode("ascii")})
            return respond(request, 200, body.encode("ascii"), JSON)

        return d.addCallback(answer)

    def put(self, request: IRequest, session_id: str) -> Deferred[bytes]:
        """
        PUT without a transaction id, the earlier form that clients in the
        field still send: the same compare-and-swap, recorded nowhere (a
        transaction nobody named cannot be repeated).
        """
        self._check_enabled()
        known_id(session_id)
        token, data = self._sent(request)
        d = self._store.write(session_id, data, SESSION_TYPE, condition_of(token))

        def stale(failure: Failure) -> Version:
            failure.trap(PreconditionFailed)
            raise ConcurrentWrite(self._stable(request))

        def answer(version: Version) -> bytes:
            body = json.dumps({"sequence_token": token_of(version)}).encode("ascii")
            return respond(request, 200, body, JSON)

        return d.addErrback(stale).addCallback(answer)

    def delete(self, request: IRequest, session_id: str) -> Deferred[bytes]:
        """
        DELETE a session: 200 C{{}}.
        """
        self._check_enabled()
        d = self._store.delete(known_id(session_id))
        return d.addCallback(lambda _: respond(request, 200, b"{}", JSON))

    # The parts.

    def _check_enabled(self) -> None:
        if not self._enabled:
            raise UnknownPathError()

    @staticmethod
    def _stable(request: IRequest) -> bool:
        path: bytes = request.path
        return path.startswith(_STABLE)

    def _data(self, body: Mapping[str, Any]) -> bytes:
        """
        The C{data} of a body, as UTF-8, within the limit (413).
        """
        try:
            data = string_field(body, "data").encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequestError("M_INVALID_PARAM", "data must be valid Unicode") from None
        if len(data) > self._limit:
            raise PayloadTooLargeError(self._limit)
        return data

    def _sent(self, request: IRequest) -> tuple[str, bytes]:
        body = json_object(request)
        return string_field(body, "sequence_token"), self._data(body)

    def _seen_token(self, request: IRequest) -> str | None:
        """
        The C{sequence_token} query parameter, if any (one at most).
        """
        values = (request.args or {}).get(b"sequence_token")
        if values is None:
            return None
        if len(values) != 1:
            raise BadRequestError("M_INVALID_PARAM", "sequence_token may be given once")
        try:
            token: str = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError("M_INVALID_PARAM", "sequence_token must be UTF-8") from None
        return token

    def _state(self, version: Version) -> dict[str, Any]:
        remaining = max(0, round((version.expires - self._clock.seconds()) * 1000))
        return {"sequence_token": token_of(version), "expires_in_ms": remaining}
