"""
Tests for C{--log-format json}: one flat object per line (time, level,
logger, the rendered message, the event's own fields), first built from
events in memory, then read from a real twistd, one line of each kind of
event the server writes.
"""

from __future__ import annotations

import io
import json
import re
import signal
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, formatEvent
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from rendezvous_twisted.http import access
from rendezvous_twisted.ops import logs

from .certificates import CA
from .test_end_to_end import HOST, LISTEN, TwistdServer, secret
from .test_end_to_end import Conn as Connection

REPO = Path(__file__).resolve().parent.parent


def lines_of(*events: dict[str, Any]) -> list[dict[str, Any]]:
    """
    What the JSON observer writes for C{events}, parsed line by line.
    """
    out = io.StringIO()
    observer = logs.observer("json", out)
    for event in events:
        observer(event)
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == len(events), text
    return [json.loads(line) for line in text.splitlines()]


def collector(events: list[dict[str, Any]]) -> LogPublisher:
    """
    A publisher that appends every event to C{events}.
    """
    return LogPublisher(cast(ILogObserver, events.append))


def logged(emit: Any) -> dict[str, Any]:
    """
    The event that C{emit(logger)} logs through a real L{Logger}.
    """
    events: list[dict[str, Any]] = []
    logger = Logger(namespace="tests.logs", observer=collector(events))
    emit(logger)
    [event] = events
    return event


def test_a_line_is_flat_with_time_level_logger_and_message() -> None:
    """An event is time (ISO 8601 UTC), level, logger, the rendered message and its fields."""
    event = logged(lambda log: log.warn("{count} parked readers left", count=3))
    [line] = lines_of(event)
    assert list(line)[:4] == ["time", "level", "logger", "message"]
    assert line["level"] == "warn"
    assert line["logger"] == "tests.logs"
    assert line["message"] == "3 parked readers left"
    assert line["count"] == 3
    assert not any(key.startswith("log_") for key in line), line
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert 0 <= event["log_time"] - datetime.fromisoformat(line["time"]).timestamp() < 0.001


def test_an_access_event_is_the_access_line_and_its_fields() -> None:
    """The access event's line carries its message as text and each field by name."""
    events: list[dict[str, Any]] = []
    with_observer = Logger(namespace=access.NAMESPACE, observer=collector(events))
    with_observer.info(
        access.FORMAT,
        client="192.0.2.1",
        method="PUT",
        path="/~0123abcd",
        protocol="HTTP/1.1",
        status=202,
        length=0,
        duration_ms=1.25,
    )
    [line] = lines_of(*events)
    assert line["message"] == '192.0.2.1 - - "PUT /~0123abcd HTTP/1.1" 202 0 1.2ms'
    assert line["message"] == formatEvent(events[0])
    assert {k: line[k] for k in ("client", "method", "path", "status", "duration_ms")} == {
        "client": "192.0.2.1",
        "method": "PUT",
        "path": "/~0123abcd",
        "status": 202,
        "duration_ms": 1.25,
    }
    assert line["logger"] == access.NAMESPACE


def test_a_failure_becomes_its_traceback_text() -> None:
    """A logged failure is an `exception` string holding its traceback, never the object."""
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    event = logged(lambda log: log.failure("answering {method}", failure, method="GET"))
    [line] = lines_of(event)
    assert line["level"] == "critical"
    assert line["message"] == "answering GET"
    assert "Traceback" in line["exception"] and "ZeroDivisionError" in line["exception"]
    assert "failure" not in line and "log_failure" not in line


def test_values_json_cannot_hold_are_written_as_text() -> None:
    """Bytes, objects, sets, and floats that are not finite become text; nothing is lost."""

    class Thing:
        def __str__(self) -> str:
            return "a thing"

    [line] = lines_of(
        {
            "log_format": "odd values",
            "log_level": LogLevel.info,
            "log_namespace": "tests",
            "log_time": 0.0,
            "raw": b"\x00\xff",
            "thing": Thing(),
            "nan": float("nan"),
            "many": {1, 2},
            "nested": {"inner": [b"x", float("inf")]},
        }
    )
    assert line["raw"] == repr(b"\x00\xff")
    assert line["thing"] == "a thing"
    assert line["nan"] == "nan"
    assert sorted(line["many"]) == [1, 2]
    assert line["nested"] == {"inner": ["b'x'", "inf"]}
    assert line["time"] == "1970-01-01T00:00:00.000Z"


def test_a_field_named_like_a_key_is_kept_beside_it() -> None:
    """An event field called `message` or `time` is written as `event_message`, `event_time`."""
    event = logged(lambda log: log.info("got {message}", message="hi", time=3))
    [line] = lines_of(event)
    assert line["message"] == "got hi"
    assert line["event_message"] == "hi"
    assert line["event_time"] == 3
    assert line["time"].endswith("Z")


def test_a_legacy_event_is_rendered_too() -> None:
    """An event of twisted.python.log (as twistd and twisted.web still log) has its text."""
    events: list[dict[str, Any]] = []
    publisher = collector(events)
    legacy = legacy_log.LogPublisher(publisher, publisher)
    legacy.msg(format="Site starting on %(port)d", port=8080)
    [line] = lines_of(*events)
    assert line["message"] == "Site starting on 8080"
    assert line["port"] == 8080
    assert "isError" not in line and "format" not in line and "event_time" not in line


def test_a_json_line_costs_little_more_than_the_event() -> None:
    """A JSON access line is a few hundred bytes, not Twisted's kilobyte of internals."""
    [line] = lines_of(
        {
            "log_format": access.FORMAT,
            "log_level": LogLevel.info,
            "log_namespace": access.NAMESPACE,
            "log_time": 1.0,
            "log_logger": Logger(),
            "log_source": object(),
            "client": "192.0.2.1",
            "method": "GET",
            "path": "/",
            "protocol": "HTTP/1.1",
            "status": 200,
            "length": 10,
            "duration_ms": 0.5,
        }
    )
    assert len(json.dumps(line)) < 300


# A real server.

#: A .tac serving as rendezvous.tac does, with one service more: it logs an
#: error with a failure on start, as the server does for an unexpected
#: error (which no request can be made to cause).
FAILING_TAC = """
import os

from twisted.application.service import Application, Service
from twisted.logger import Logger
from twisted.python.failure import Failure

from rendezvous_twisted.tap import environment_service


class Failing(Service):
    log = Logger(namespace="rendezvous_twisted.http.answers.ErrorAnswers")

    def startService(self):
        super().startService()
        try:
            {}["missing"]
        except KeyError:
            self.log.failure("unexpected error answering {method}", Failure(), method=b"GET")


application = Application("rendezvous")
environment_service(os.environ).setServiceParent(application)
Failing().setServiceParent(application)
"""


def test_every_kind_of_event_is_one_flat_json_line(tmp_path: Path) -> None:
    """
    A real twistd with --log-format json writes only flat JSON lines: the
    start-up lines, a warning, an access line, a refusal, a TLS reload, an
    error with a failure, and the graceful stop, each with its rendered
    message and its own fields.
    """
    CA.make("json-logs").write_leaf(tmp_path)
    (tmp_path / "failing.tac").write_text(FAILING_TAC)
    process = TwistdServer(
        ["-y", str(tmp_path / "failing.tac")],
        tmp_path,
        {
            "RENDEZVOUS_LISTEN": f"{LISTEN} ssl:0:interface={HOST}",
            "RENDEZVOUS_TLS_CERT": str(tmp_path / "fullchain.pem"),
            "RENDEZVOUS_TLS_KEY": str(tmp_path / "key.pem"),
            "RENDEZVOUS_LOG_FORMAT": "json",
            "RENDEZVOUS_MAX_BYTES": "100",
        },
        # Fewer descriptors than the default --max-connections needs: a warning.
        prefix=["prlimit", "--nofile=1024:1024", "--"],
    )
    try:
        with Connection(process.port) as conn:
            body = secret("json")
            process.secrets.append(body)
            created = conn.exchange("POST", "/", body=body)
            assert created.status == 200
            process.secrets.append(created.json()["id"].encode("ascii"))
        with Connection(process.port) as big:
            big.exchange("POST", "/", body=b"y" * 101).assert_error(413, "M_TOO_LARGE")
        mark = process.mark()
        process.send_signal(signal.SIGHUP)
        process.signalled = False  # SIGHUP is not the stop
        process.wait_for(re.compile(rb"TLS files re-read"), 10, mark)
        code = process.stop()
    finally:
        process.stop()
    assert code in (0, -signal.SIGTERM), process.text()
    lines = [json.loads(line) for line in process.output.splitlines() if line.strip()]

    def one(pattern: str) -> dict[str, Any]:
        found = [line for line in lines if re.search(pattern, line["message"])]
        assert found, f"no line matches {pattern!r}:\n{process.text()}"
        first: dict[str, Any] = found[0]
        return first

    for line in lines:
        assert list(line)[:4] == ["time", "level", "logger", "message"], line
        assert isinstance(line["message"], str) and line["message"], line
        assert not any(key.startswith("log_") for key in line), line
        assert "unpersistable" not in json.dumps(line), line
    started = one(r"^rendezvous-twisted \S+ \(Twisted \S+, Python \S+\) starting$")
    assert started["logger"] == "rendezvous_twisted.ops.logs.RendezvousRoot"
    limits = one(r"^rendezvous store started: TTL 60")
    assert limits["max_bytes"] == 100
    warning = one(r"^the process may open 1024 files")
    assert warning["level"] == "warn" and warning["soft"] == 1024
    assert one(r"^RendezvousSite starting on \d+$")["level"] == "info"
    request = one(r'^127\.0\.0\.1 - - "POST / HTTP/1\.1" 200 ')
    assert request["logger"] == "rendezvous_twisted.access"
    assert (request["method"], request["status"], request["path"]) == ("POST", 200, "/")
    refusal = one(r"^refused a body over 100 bytes from 127\.0\.0\.1$")
    assert refusal["max_bytes"] == 100 and refusal["client"] == "127.0.0.1"
    reload = one(r"^TLS files re-read; the certificate is unchanged")
    assert reload["subject"].startswith("CN=localhost") or "localhost" in reload["subject"]
    error = one(r"^unexpected error answering b'GET'$")
    assert error["level"] == "critical"
    assert "KeyError: 'missing'" in error["exception"]
    assert one(r"^stopped gracefully$")["logger"] == "rendezvous_twisted.ops.service.StoreService"
    assert one(r"^draining: ")["level"] == "info"
    for hidden in process.secrets:
        assert hidden not in process.output
