"""
The small C{twisted.web} site of the metrics listener (C{--metrics
ENDPOINT}): C{/metrics} in Prometheus' text format and C{/health}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site

from rendezvous_twisted.core.metrics import Metrics
from rendezvous_twisted.http.answers import JSON, SERVER, error_body


class _Page(Resource):
    """
    A page of the metrics listener: GET (and HEAD) only, and like every
    answer of the server it names no version and may not be cached; any
    other method is a JSON 405, not Twisted's HTML page.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Server", SERVER)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if request.postpath:
            # Under a page (/health/x): nothing.
            return _not_found(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _refuse(request, 405, "M_UNRECOGNIZED", "only GET is served here")
        page: bytes = super().render(request)  # type: ignore[no-untyped-call]
        return page


class _NotFound(_Page):
    def render_GET(self, request: Any) -> bytes:
        return _not_found(request)


class _Root(Resource):
    def getChild(self, path: bytes, request: Any) -> Resource:
        return _NotFound()  # type: ignore[no-untyped-call]


def _not_found(request: Any) -> bytes:
    return _refuse(request, 404, "M_NOT_FOUND", "no such page: /metrics and /health are served")


def _refuse(request: Any, code: int, errcode: str, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", JSON)
    return error_body(errcode, message)


class _MetricsPage(_Page):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        page: bytes = generate_latest(self._metrics.registry)
        return page


class _Health(_Page):
    def __init__(
        self,
        stopping: Callable[[], bool],
        store_available: Callable[[], bool],
        saturated: Callable[[], bool],
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._stopping = stopping
        self._store_available = store_available
        self._saturated = saturated

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if self._stopping():
            request.setResponseCode(503)
            return b"stopping\n"
        if not self._store_available():
            request.setResponseCode(503)
            return b"store unavailable\n"
        if self._saturated():
            # New connections are being refused at the connection cap: a
            # balancer should send them elsewhere until this clears.
            request.setResponseCode(503)
            return b"saturated\n"
        return b"serving\n"


def metrics_site(
    metrics: Metrics,
    stopping: Callable[[], bool],
    reactor: Any = None,
    store_available: Callable[[], bool] = lambda: True,
    saturated: Callable[[], bool] = lambda: False,
) -> Site:
    """
    The site of the metrics listener: C{/metrics} in Prometheus' text
    format, C{/health} answering 200 while serving, and 503 once a stop
    began, while the store (Redis) cannot be reached, or while the server
    is saturated (refusing new connections at its connection cap, see
    L{rendezvous_twisted.http.http1.Admission}); anything else is a JSON 404 or
    405.
    """
    root = _Root()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", _MetricsPage(metrics))
    root.putChild(b"health", _Health(stopping, store_available, saturated))
    site = Site(root, reactor=reactor)
    site.noisy = False
    # Scrapes every few seconds would drown the log.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
