"""
Prometheus metrics, on a registry of our own (never the process-global one).
The site that serves them, with a health check, on a separate listener
(C{--metrics ENDPOINT}) is L{rendezvous_twisted.ops.metrics}.

Counts that already live somewhere (rendezvous held, parked readers, TLS
reloads, open connections) are read from their owners at scrape time by a
collector; events seen only in passing (requests, refusals, wakes) are
counted as they happen.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

#: The methods counted by name; anything else is counted as "other", so that
#: a client cannot mint new time series by inventing methods.
METHODS = frozenset(("GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD"))
#: The same, as a request names them.
_METHOD_NAMES = {method.encode("ascii"): method for method in METHODS}
#: Refusal reasons, all exported from the start (at zero).  The last five
#: are answered on the connection itself, below the resource: past a
#: connection cap (429 or 503), too slow (408), unparseable (400), an HTTP/2
#: stream past the per-connection cap (RST_STREAM REFUSED_STREAM), an HTTP/2
#: connection resetting streams faster than allowed (GOAWAY).
REASONS = (
    "too_large",
    "full",
    "rate_limited",
    "connections",
    "slow",
    "malformed",
    "streams",
    "resets",
)

#: Wake latency buckets: from a tenth of a millisecond to a second.
WAKE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Request duration buckets: a long-poll can take its whole poll timeout.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 20.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class Reading:
    """
    A count that lives with its owner (the store, the site, the TLS
    contexts), exported as a metric read at scrape time.
    """

    #: The metric's name (a counter's without its C{_total}).
    name: str
    documentation: str
    kind: Literal["counter", "gauge"]
    #: The value now: a number, or a dict of label value to number with
    #: the label "outcome".
    read: Callable[[], Any]


class Metrics:
    """
    The server's metrics.  The web layer reports events through the methods
    below; L{watch} adds sources read at scrape time.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = _Requests()
        self.registry.register(self._requests)
        self._refusals = Counter(
            "rendezvous_refusals",
            "Requests refused by a limit, by reason: too_large (413), full (429 at "
            "capacity), rate_limited (any other 429), connections (a connection cap: 429 "
            "or 503), slow (408), malformed (400 from the HTTP parser, or an HTTP/2 protocol "
            "error), streams (an HTTP/2 stream past the per-connection cap), resets (an "
            "HTTP/2 connection closed for resetting too many streams).",
            ["reason"],
            registry=self.registry,
        )
        for reason in REASONS:
            self._refusals.labels(reason)
        self._wakes = Histogram(
            "rendezvous_wake_latency_seconds",
            "Time from a write to the answer of a reader parked waiting for it.",
            buckets=WAKE_BUCKETS,
            registry=self.registry,
        )
        self._sources = _Sources()
        self.registry.register(self._sources)

    def request_done(self, method: bytes, status: int, duration_seconds: float) -> None:
        self._requests.count(method, status, duration_seconds)

    def refused(self, reason: str) -> None:
        self._refusals.labels(reason).inc()

    def woke(self, latency_seconds: float) -> None:
        self._wakes.observe(max(0.0, latency_seconds))

    def watch(self, readings: Iterable[Reading]) -> None:
        """
        Export each of C{readings}, read at scrape time, in their order.
        """
        self._sources.sources.extend(readings)


class _Requests(Collector):
    """
    The requests answered, by method and status, and their durations: the
    two metrics every request adds to, exported sample for sample as
    prometheus_client's own Counter and Histogram would export them
    (C{_created} included), but counted in a dict and a list: those
    classes' label look-up, lock and bucket loop were 3 % of a request's
    instructions.
    """

    def __init__(self) -> None:
        #: (method, status) to its count and when it was first counted.
        self._counts: dict[tuple[str, int], list[float]] = {}
        #: Requests per duration bucket, the last one past every bound.
        self._buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self._sum = 0.0
        self._created = time.time()

    def count(self, method: bytes, status: int, duration_seconds: float) -> None:
        key = (_METHOD_NAMES.get(method, "other"), status)
        counted = self._counts.get(key)
        if counted is None:
            self._counts[key] = [1, time.time()]
        else:
            counted[0] += 1
        duration = duration_seconds if duration_seconds > 0.0 else 0.0
        # A bucket counts the durations up to and including its bound.
        self._buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        self._sum += duration

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "rendezvous_http_requests",
            "HTTP requests answered, by method and status.",
            labels=["method", "status"],
        )
        for (method, status), (number, created) in self._counts.items():
            requests.add_metric([method, str(status)], number, created=created)
        yield requests
        durations = HistogramMetricFamily(
            "rendezvous_http_request_duration_seconds",
            "Time from a request's headers to its answer (long-polls included).",
        )
        below = 0
        cumulative = []
        for bound, number in zip((*DURATION_BUCKETS, math.inf), self._buckets, strict=True):
            below += number
            # Its "le" as prometheus_client writes it.
            cumulative.append(("+Inf" if bound == math.inf else repr(float(bound)), float(below)))
        durations.add_metric([], cumulative, self._sum)
        durations.add_sample(durations.name + "_created", {}, self._created)
        yield durations


class _Sources(Collector):
    def __init__(self) -> None:
        self.sources: list[Reading] = []

    def collect(self) -> Iterator[Metric]:
        for reading in self.sources:
            value = reading.read()
            family: Metric
            labels = ["outcome"] if isinstance(value, dict) else []
            if reading.kind == "counter":
                family = CounterMetricFamily(reading.name, reading.documentation, labels=labels)
            else:
                family = GaugeMetricFamily(reading.name, reading.documentation, labels=labels)
            if isinstance(value, dict):
                for label, number in value.items():
                    family.add_metric([label], number)
            else:
                family.add_metric([], value)
            yield family
