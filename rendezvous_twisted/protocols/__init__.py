"""
One Klein module per protocol generation, each mapping its routes to the
store contract; L{RendezvousAPI} composes them into one Klein app, whose
errors are answered here, through Klein's C{handle_errors}, by the one error
mapping of L{rendezvous_twisted.http.answers}.
"""

from __future__ import annotations

from collections.abc import Mapping

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as NoRoute

from rendezvous_twisted.core.config import MSC4388_PATHS, Config
from rendezvous_twisted.core.metrics import Metrics
from rendezvous_twisted.core.store import RendezvousError, RendezvousStore
from rendezvous_twisted.http.answers import (
    ErrorAnswers,
    HTTPError,
    MethodNotAllowedError,
    UnknownPathError,
    allow,
)
from rendezvous_twisted.http.guard import Guard
from rendezvous_twisted.http.tokens import CreatePolicy, OpenPolicy
from rendezvous_twisted.protocols import msc3886, msc4108, msc4388


class RendezvousAPI:
    """
    The three generations (L{msc3886}, L{msc4108}, L{msc4388}) over one store, on one Klein
    app.  Every refusal is a L{RendezvousError} or an L{HTTPError}, answered
    by L{ErrorAnswers}; a wrong method is a JSON 405 with Allow, an unknown
    path a JSON 404.
    """

    def __init__(
        self,
        store: RendezvousStore,
        config: Config,
        clock: IReactorTime,
        guard: Guard | None = None,
        policy: CreatePolicy | None = None,
    ) -> None:
        """
        @param clock: keeps time for the rate limits (of a guard made here),
            times wake latency for the metrics and MSC4388's expiries.
        @param guard: who a client is and what it may do; one of its own,
            counting in fresh metrics, when None.
        @param policy: who may create MSC4388 sessions; anyone when None.
        """
        self.guard = guard if guard is not None else Guard(config, clock, Metrics())
        self.metrics = self.guard.metrics
        self.errors = ErrorAnswers(self.metrics, store.max_bytes)
        self.app = app = Klein()
        # Werkzeug would answer "//x" with a 308 to "/x"; a path with an
        # empty segment is a 404 here instead (see http.guard).
        app.url_map.merge_slashes = False
        msc3886.MSC3886(app, store, config, clock, self.guard)
        self._msc4108 = msc4108.MSC4108(app, store, config, clock, self.guard)
        self._msc4388 = msc4388.MSC4388(
            app, store, config, clock, self.guard, policy if policy is not None else OpenPolicy()
        )
        app.route(msc4108.STABLE_CREATE_PATH, methods=["POST"], endpoint="stable.create")(
            self._stable_create
        )
        self._method_hints: Mapping[bytes, str] = msc3886.METHOD_HINTS
        #: The paths that hold no secret, which the access log shows as they are.
        self.public_paths = frozenset(
            (
                b"/",
                *(path.encode("ascii") for path in msc4108.CREATE_PATHS),
                *(path.encode("ascii") for path in MSC4388_PATHS),
            )
        )
        app.handle_errors(MethodNotAllowed)(self._wrong_method)
        app.handle_errors(NoRoute)(self._no_route)
        app.handle_errors(RendezvousError, HTTPError)(self._refused)
        app.handle_errors(Exception)(self._unexpected)

    def resource(self) -> IResource:
        """
        The Klein app's resource (serve it behind L{guard}: see
        L{rendezvous_twisted.http.site.RendezvousSite}).
        """
        return self.app.resource()

    def _stable_create(self, request: IRequest) -> Deferred[bytes]:
        """
        POST to the stable path, which MSC4108 and MSC4388 share: a JSON
        body is MSC4388's create (404 C{M_UNRECOGNIZED} while its API is
        off), any other MSC4108's (whose body is text/plain).
        """
        if msc4388.is_json(request.requestHeaders.getRawHeaders(b"Content-Type")):
            return self._msc4388.create(request)
        return self._msc4108.create(request)

    def refuse(self, request: IRequest, error: BaseException) -> bytes:
        """
        Answer a refusal: status, JSON error body and any headers it needs.
        """
        return self.errors.refuse(request, error)

    def _wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        # werkzeug lists the methods of every rule of the path (and HEAD,
        # beside every GET, which allow() leaves out).
        allowed = allow(error.valid_methods or ())
        hint = self._method_hints.get(request.path, "method not allowed here")
        return self.errors.refuse(request, MethodNotAllowedError(allowed, hint))

    def _no_route(self, request: IRequest, failure: Failure) -> bytes:
        return self.errors.refuse(request, UnknownPathError())

    def _refused(self, request: IRequest, failure: Failure) -> bytes:
        assert failure.value is not None
        return self.errors.refuse(request, failure.value)

    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        return self.errors.internal_error(request, failure)
