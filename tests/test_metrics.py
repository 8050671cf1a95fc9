"""
Tests for logs and metrics: the access log, --log-format, the open-file
limit, and the Prometheus metrics and health check, in memory and on a real
twistd process.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import resource
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.application.service import Application
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.web.test.requesthelper import DummyRequest

from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.core.metrics import DURATION_BUCKETS, Metrics
from rendezvous_twisted.http.answers import HTTPError
from rendezvous_twisted.http.site import redact
from rendezvous_twisted.ops import logs
from rendezvous_twisted.ops.metrics import metrics_site
from rendezvous_twisted.ops.service import OpenFileLimitService, StoreService, raise_open_file_limit
from rendezvous_twisted.protocols.msc4108 import UNSTABLE_CREATE_PATH

from .conftest import Harness, make_site
from .test_end_to_end import (
    CLEAN_EXIT,
    HOST,
    LISTEN,
    PARKED_PROOF_SECONDS,
    Conn,
    TwistdServer,
    create,
    etag_of,
    secret,
)
from .test_tap import parsed


def samples(metrics_text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """
    Every sample of a Prometheus text page, by name and labels.
    """
    found = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return page[(name, frozenset(labels.items()))]


# The access log, in memory.


def access_events(events: Sequence[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_namespace") == "rendezvous_twisted.access"]


def test_access_log_event_fields() -> None:
    """
    Each request gets one access event with client, method, redacted path,
    status, length and duration, and no id, query or payload anywhere.
    """
    harness = Harness()
    rendezvous_id, _ = harness.create(b"SECRET-PAYLOAD")
    with capturedLogs() as events:
        harness.call("GET", f"/{rendezvous_id}?token=SECRET")
    [event] = access_events(events)
    assert event["method"] == "GET"
    assert event["path"] == "/~" + redact(rendezvous_id)
    assert event["status"] == 200
    assert event["length"] == len(b"SECRET-PAYLOAD")
    assert event["duration_ms"] >= 0
    assert event["client"] == "127.0.0.1"
    text = formatEvent(event) + repr(event)
    assert rendezvous_id not in text and "SECRET" not in text


def test_no_access_log() -> None:
    """With the access log off, requests are still counted but not logged."""
    harness = Harness()
    metrics = Metrics()
    site = make_site(harness.store, harness.config, harness.clock, metrics, access_log=False)
    with capturedLogs() as events:
        request = DummyRequest([b""])
        request.method = b"GET"
        request.code = 200  # type: ignore[attr-defined]
        site.log(request)  # type: ignore[arg-type]
    assert access_events(events) == []
    page = samples(_render(metrics))
    assert value(page, "rendezvous_http_requests_total", method="GET", status="200") == 1


def test_access_log_shows_the_fixed_create_paths_and_hashes_the_rest() -> None:
    """
    The access log names MSC4108's create paths as they are (they hold no secret) and still
    hashes every other path.
    """
    harness = Harness()
    with capturedLogs() as events:
        harness.call("POST", UNSTABLE_CREATE_PATH, b"x", headers={"Content-Type": "text/plain"})
        harness.call("GET", "/not/a/create/path")
    paths = [event["path"] for event in access_events(events)]
    assert paths == [UNSTABLE_CREATE_PATH, "/~" + redact("not/a/create/path")]


def _render(metrics: Metrics) -> str:
    from prometheus_client.exposition import generate_latest

    text: str = generate_latest(metrics.registry).decode("utf-8")
    return text


class RateLimited(HTTPError):
    """
    A refusal as issue 3's rate limiter may raise it: a 429 that is not Full.
    """

    code = 429
    errcode = "M_LIMIT_EXCEEDED"


def test_refusals_are_counted_by_reason_in_the_one_error_mapping() -> None:
    """
    The error mapping counts a 413 as too_large, a full store's 429 as full,
    and any other 429 as rate_limited; other errors are not refusals.
    """
    harness = Harness(max_bytes=10, max_rendezvous_per_address=1, max_rendezvous=5)
    metrics = harness.api.metrics
    assert harness.call("POST", "/", b"x" * 11).code == 413
    harness.create(b"x")
    assert harness.call("POST", "/", b"x").code == 429
    assert harness.call("GET", "/AAAAAAAAAAAAAAAAAAAAAA").code == 404
    harness.api.refuse(DummyRequest([b""]), RateLimited("slow down"))  # type: ignore[arg-type]
    page = samples(_render(metrics))
    assert value(page, "rendezvous_refusals_total", reason="too_large") == 1
    assert value(page, "rendezvous_refusals_total", reason="full") == 1
    assert value(page, "rendezvous_refusals_total", reason="rate_limited") == 1


def test_odd_methods_share_one_series() -> None:
    """Invented methods are counted as "other", so clients cannot mint time series."""
    metrics = Metrics()
    metrics.request_done(b"BREW", 405, 0.001)
    metrics.request_done(b"FROB", 405, 0.001)
    page = samples(_render(metrics))
    assert value(page, "rendezvous_http_requests_total", method="other", status="405") == 2


def test_requests_are_exported_as_prometheus_clients_own_counter_and_histogram() -> None:
    """
    The request counts and durations, counted without prometheus_client's
    Counter and Histogram, are exported sample for sample as those would
    export them (a duration on a bucket's bound in that bucket, a negative
    one as zero), in both exposition formats, _created samples included.
    """
    reference = CollectorRegistry()
    counter = Counter(
        "rendezvous_http_requests",
        "HTTP requests answered, by method and status.",
        ["method", "status"],
        registry=reference,
    )
    histogram = Histogram(
        "rendezvous_http_request_duration_seconds",
        "Time from a request's headers to its answer (long-polls included).",
        buckets=DURATION_BUCKETS,
        registry=reference,
    )
    metrics = Metrics()
    answered = [
        (b"GET", 200, 0.0004),
        (b"GET", 200, 0.005),
        (b"PUT", 412, 0.0050001),
        (b"BREW", 405, 60.0),
        (b"DELETE", 404, 61.5),
        (b"GET", 304, -0.25),
        (b"GET", 200, 20.0),
    ]
    for method, status, seconds in answered:
        metrics.request_done(method, status, seconds)
        name = method.decode()
        counter.labels(name if name != "BREW" else "other", str(status)).inc()
        histogram.observe(max(0.0, seconds))

    def ours(text: str) -> list[str]:
        # The two families' lines, each _created value replaced by its name.
        kept = []
        for line in text.splitlines():
            if "rendezvous_http_request" in line:
                kept.append(re.sub(r"(_created(\{[^}]*\})?) \S+$", r"\1 T", line))
        return kept

    ours_text = _render(metrics)
    reference_text = generate_latest(reference).decode()
    assert ours(ours_text) == ours(reference_text)
    ours_openmetrics = openmetrics(metrics.registry)  # type: ignore[no-untyped-call]
    reference_openmetrics = openmetrics(reference)  # type: ignore[no-untyped-call]
    assert ours(ours_openmetrics.decode()) == ours(reference_openmetrics.decode())
    page = samples(ours_text)
    assert value(page, "rendezvous_http_request_duration_seconds_bucket", le="0.005") == 3
    assert value(page, "rendezvous_http_request_duration_seconds_bucket", le="0.001") == 2
    assert value(page, "rendezvous_http_request_duration_seconds_count") == len(answered)


# Log formats.


def test_json_observer_writes_one_object_per_line() -> None:
    """--log-format json writes each event as one flat JSON object on its own line."""
    out = io.StringIO()
    observer = logs.observer("json", out)
    observer({"log_format": "hello {who}", "who": "world", "log_time": 0.0})
    observer({"log_format": "again", "log_time": 1.0})
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["hello world", "again"]
    assert json.loads(lines[0])["who"] == "world"


def test_unknown_log_format_is_a_usage_error() -> None:
    """--log-format accepts text and json only."""
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="text, json"):
        parsed(["--log-format=xml"])


def test_json_format_becomes_the_applications_log_observer() -> None:
    """
    With --log-format json, the service tree gives twistd's application its
    ILogObserver (which twistd then uses); with text it leaves twistd's own.
    """
    from rendezvous_twisted import tap

    json_app = Application("json")
    tap.makeService(parsed(["--log-format=json"])).setServiceParent(json_app)
    assert json_app.getComponent(ILogObserver, None) is not None
    text_app = Application("text")
    tap.makeService(parsed([])).setServiceParent(text_app)
    assert text_app.getComponent(ILogObserver, None) is None


def test_the_metrics_listener_answers_in_json_and_names_no_version() -> None:
    """
    The metrics listener serves /metrics and /health; any other path is a JSON 404 and any
    other method a JSON 405 with Allow, none of them naming Twisted or its version.
    """

    # StubTreq copies treq's functions onto itself at run time: Any.
    client: Any = StubTreq(metrics_site(Metrics(), lambda: False).resource)  # type: ignore[no-untyped-call]

    def call(method: str, path: str) -> tuple[int, Any, bytes]:
        d = client.request(method, "http://metrics.test" + path)
        response = fired_result(d)
        body = fired_result(client.content(response))
        return response.code, response.headers, body

    code, headers, body = call("GET", "/health")
    assert (code, body) == (200, b"serving\n")
    assert headers.getRawHeaders(b"Server") == [b"rendezvous-twisted"]
    code, headers, _ = call("GET", "/metrics")
    assert code == 200 and headers.getRawHeaders(b"Server") == [b"rendezvous-twisted"]
    for path in ("/", "/nope", "/health/x"):
        code, headers, body = call("GET", path)
        assert code == 404, path
        assert headers.getRawHeaders(b"Content-Type") == [b"application/json"]
        assert json.loads(body)["errcode"] == "M_NOT_FOUND"
        assert headers.getRawHeaders(b"Server") == [b"rendezvous-twisted"]
    code, headers, body = call("POST", "/health")
    assert code == 405
    assert headers.getRawHeaders(b"Allow") == [b"GET, HEAD"]
    assert json.loads(body)["errcode"] == "M_UNRECOGNIZED"
    assert b"TwistedWeb" not in b"".join(headers.getRawHeaders(b"Server") or [])


def fired_result(d: Any) -> Any:
    """The result of a Deferred that has fired (StubTreq answers at once)."""
    results: list[Any] = []
    d.addBoth(results.append)
    [result] = results
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    """The soft open-file limit is raised to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 1024:
        pytest.skip("needs a finite hard limit to lower the soft one below")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard - 1, hard))
    assert raise_open_file_limit() == (hard, hard)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_open_file_limit_is_checked_against_connections_not_parked_readers() -> None:
    """
    A start whose descriptor limit covers max_connections logs no warning,
    however many parked readers max_parked allows (each holds a connection).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 1024:
        pytest.skip("needs a finite hard limit of at least 1024 descriptors")
    config = Config(max_connections=100, max_parked=hard + 1)
    try:
        with capturedLogs() as events:
            OpenFileLimitService().privilegedStartService()
            StoreService(MemoryStore(config, Clock()), config, Clock()).startService()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert any("open-file limit" in formatEvent(e) for e in events)
    assert [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn] == []


# A real process.

_METRICS_PORT = re.compile(rb'"Site starting on (\d+)"')


def get(port: int, path: str) -> tuple[int, str]:
    client = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        client.request("GET", path)
        response = client.getresponse()
        return response.status, response.read().decode("utf-8")
    finally:
        client.close()


def test_metrics_health_and_json_logs_end_to_end(tmp_path: Path) -> None:
    """
    A real server with --metrics and --log-format json counts what happened
    (created, deleted, requests by method and status, refusals, a wake),
    answers /health 200 while serving and 503 while it drains, and logs
    only JSON lines, holding no id or payload.
    """
    process = TwistdServer(
        [
            "rendezvous",
            "--listen",
            LISTEN,
            "--metrics",
            f"tcp:0:interface={HOST}",
            "--log-format=json",
            "--max-bytes=100",
            "--max-rendezvous-per-address=2",
            "--shutdown-timeout-seconds=10",
        ],
        tmp_path,
    )
    try:
        metrics_port = int(process.wait_for(_METRICS_PORT, 10).group(1))
        assert get(metrics_port, "/health") == (200, "serving\n")
        with Conn(process.port) as writer, Conn(process.port) as reader:
            rendezvous_id, created = create(process, writer, secret("metrics"))
            create(process, writer, secret("second"))
            writer.exchange("POST", "/", body=b"x").assert_error(429)
            path = "/" + rendezvous_id
            reader.request("GET", path, [("If-None-Match", etag_of(created))])
            assert reader.quiet_for(PARKED_PROOF_SECONDS)
            update = secret("update")
            process.secrets.append(update)
            assert writer.exchange("PUT", path, body=update).status == 202
            assert reader.read_response().status == 200
            assert writer.exchange("DELETE", path).status == 204
        with Conn(process.port) as big:
            big.exchange("POST", "/", body=b"y" * 101).assert_error(413)

        status, text = get(metrics_port, "/metrics")
        assert status == 200
        page = samples(text)
        assert value(page, "rendezvous_created_total") == 2
        assert value(page, "rendezvous_deleted_total") == 1
        assert value(page, "rendezvous_live") == 1
        assert value(page, "rendezvous_parked_readers") == 0
        assert value(page, "rendezvous_http_requests_total", method="POST", status="200") == 2
        assert value(page, "rendezvous_http_requests_total", method="POST", status="429") == 1
        assert value(page, "rendezvous_http_requests_total", method="POST", status="413") == 1
        assert value(page, "rendezvous_http_requests_total", method="GET", status="200") == 1
        assert value(page, "rendezvous_refusals_total", reason="full") == 1
        assert value(page, "rendezvous_refusals_total", reason="too_large") == 1
        assert value(page, "rendezvous_wake_latency_seconds_count") == 1
        assert value(page, "rendezvous_tls_reloads_total", outcome="success") == 0

        # A stalled upload keeps the drain going: health says so meanwhile.
        with Conn(process.port) as stalled:
            stalled.send(stalled.head("POST", "/", [("Content-Length", "50")]) + b"partial")
            assert stalled.quiet_for(PARKED_PROOF_SECONDS)
            process.send_signal(signal.SIGTERM)
            process.wait_for(re.compile(rb'"message": "draining: 1 requests? in flight'), 5)
            assert get(metrics_port, "/health") == (503, "stopping\n")
        code = process.stop()
    finally:
        process.stop()
    assert code in CLEAN_EXIT, process.text()
    lines = [line for line in process.output.splitlines() if line.strip()]
    events: list[dict[str, Any]] = [json.loads(line) for line in lines]
    access = [e for e in events if e["logger"] == "rendezvous_twisted.access"]
    assert {(e["method"], e["status"]) for e in access} >= {("POST", 200), ("PUT", 202)}
    assert all(e["path"] == "/" or re.fullmatch(r"/~[0-9a-f]{8}", e["path"]) for e in access)
    for hidden in process.secrets:
        assert hidden not in process.output, f"{hidden!r} is in the log"
    assert not any(e["level"] in ("error", "critical") for e in events)
    assert b"Traceback" not in process.output


def test_no_access_log_end_to_end(tmp_path: Path) -> None:
    """twistd rendezvous --no-access-log answers requests without logging them."""
    process = TwistdServer(["rendezvous", "--listen", LISTEN, "--no-access-log"], tmp_path)
    try:
        mark = process.mark()
        with Conn(process.port) as conn:
            create(process, conn, secret("quiet"))
            conn.exchange("GET", "/AAAAAAAAAAAAAAAAAAAAAA").assert_error(404)
        started = time.monotonic()
        code = process.stop()
    finally:
        process.stop()
    assert code in CLEAN_EXIT
    assert time.monotonic() - started < 10
    assert b"rendezvous_twisted.access" not in process.output[mark:]
    assert b'"POST / HTTP/1.1"' not in process.output[mark:]


def test_environment_sets_log_and_metrics_options() -> None:
    """The .tac's RENDEZVOUS_* variables set --log-format, --metrics and --no-access-log."""
    from twisted.python import usage

    from rendezvous_twisted import tap

    options = tap.options_from_environment(
        {
            "RENDEZVOUS_LOG_FORMAT": "json",
            "RENDEZVOUS_METRICS": "tcp:9090:interface=127.0.0.1",
            "RENDEZVOUS_NO_ACCESS_LOG": "1",
        }
    )
    assert options["log-format"] == "json"
    assert options["metrics"] == "tcp:9090:interface=127.0.0.1"
    assert options["no-access-log"]
    assert not tap.options_from_environment({"RENDEZVOUS_NO_ACCESS_LOG": "0"})["no-access-log"]
    with pytest.raises(usage.UsageError, match="RENDEZVOUS_NO_ACCESS_LOG=maybe: must be 1 or 0"):
        tap.options_from_environment({"RENDEZVOUS_NO_ACCESS_LOG": "maybe"})


def test_the_request_rate_limit_is_counted_as_rate_limited() -> None:
    """A 429 from the request rate limiter is counted as rate_limited, not full."""
    harness = Harness(request_burst=1, request_per_second=0.01)
    harness.create(b"x")
    assert harness.call("POST", "/", b"y").code == 429
    page = samples(_render(harness.api.metrics))
    assert value(page, "rendezvous_refusals_total", reason="rate_limited") == 1
    assert value(page, "rendezvous_refusals_total", reason="full") == 0
