"""
The small C{twisted.web} site of the metrics listener (C{--metrics
ENDPOINT}): C{/metrics} in Prometheus' text format and C{/health}; and what
it exports of the counts that the store, the site and the TLS contexts keep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site

from rendezvous_twisted.core.metrics import Metrics, Reading
from rendezvous_twisted.core.store import RendezvousStore
from rendezvous_twisted.http.answers import JSON, SERVER, error_body
from rendezvous_twisted.ops.tls import ContextRegistry


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


class _Admission(Protocol):
    @property
    def max_connections(self) -> int: ...

    @property
    def waiting_refusals(self) -> int: ...


class CountingSite(Protocol):
    """
    What the metrics read of the server's site: its connections, their cap
    and requests in flight.
    """

    @property
    def admission(self) -> _Admission: ...

    @property
    def connection_count(self) -> int: ...

    @property
    def saturated(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...


def site_readings(site: CountingSite) -> list[Reading]:
    """
    The metrics of the server's connections and requests.
    """
    return [
        Reading(
            "rendezvous_http_connections",
            "Open HTTP connections.",
            "gauge",
            lambda: site.connection_count,
        ),
        Reading(
            "rendezvous_http_connections_max",
            "The connection cap (--max-connections): past it new connections get 503.",
            "gauge",
            lambda: site.admission.max_connections,
        ),
        Reading(
            "rendezvous_http_saturated",
            "1 from when the open connections reach the cap until they fall a tenth below it "
            "(/health answers 503 saturated meanwhile), else 0.",
            "gauge",
            lambda: int(site.saturated),
        ),
        Reading(
            "rendezvous_http_refusals_waiting",
            "Connections refused at a connection cap, waiting for their request to be answered.",
            "gauge",
            lambda: site.admission.waiting_refusals,
        ),
        Reading(
            "rendezvous_http_requests_in_flight",
            "Requests being received or answered.",
            "gauge",
            lambda: site.in_flight,
        ),
    ]


def tls_readings(contexts: ContextRegistry) -> list[Reading]:
    """
    The metrics of the TLS certificates: their reloads, by outcome.
    """

    def reloads() -> dict[str, int]:
        total = {"success": 0, "failure": 0}
        for context in contexts.contexts:
            for outcome, count in context.reloads.items():
                total[outcome] += count
        return total

    return [
        Reading(
            "rendezvous_tls_reloads", "TLS certificate reloads, by outcome.", "counter", reloads
        )
    ]


def watch(
    metrics: Metrics, store: RendezvousStore, site: CountingSite, contexts: ContextRegistry
) -> None:
    """
    Export the counts that the store, the site and the TLS contexts keep,
    read at scrape time.
    """
    metrics.watch([*store.readings(), *site_readings(site), *tls_readings(contexts)])
