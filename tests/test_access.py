"""
Tests for the access log's cheap text path: the access event rendered
without a formatter, and the text observer that writes Twisted's own lines
for it, and when twistd's logging lets that observer take its place.
"""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    capturedLogs,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions

from rendezvous_twisted import tap
from rendezvous_twisted.http import access
from rendezvous_twisted.ops import logs

#: Access events as the server emits them, with awkward values: a method
#: with braces and escapes, a duration that rounds, a huge length.
ACCESS: list[dict[str, Any]] = [
    dict(client="127.0.0.1", method="GET", path="/~0a1b2c3d", protocol="HTTP/1.1",
         status=200, length=5, duration_ms=0.04999),
    dict(client="2001:db8::1", method="{X}\\xff", path="/", protocol="HTTP/1.0",
         status=404, length=0, duration_ms=1234.55),
    dict(client="-", method="PUT", path="/~ffffffff", protocol="HTTP/2",
         status=202, length=2**40, duration_ms=0.0),
]  # fmt: skip


def emitted(fields: dict[str, Any]) -> dict[str, Any]:
    with capturedLogs() as events:
        access.emit(**fields)
    [event] = events
    return dict(event)


@pytest.mark.parametrize("fields", ACCESS)
def test_render_is_what_the_formatter_gives(fields: dict[str, Any]) -> None:
    """The access event's text rendered without a formatter equals formatEvent's."""
    event = emitted(fields)
    assert event["log_namespace"] == "rendezvous_twisted.access"
    assert access.render(event) == formatEvent(event)


@pytest.mark.parametrize("fields", ACCESS)
def test_the_event_is_the_one_logger_info_emits(fields: dict[str, Any]) -> None:
    """
    emit() builds its event itself: key for key, it is the event Twisted's
    Logger.info gives for the same format and fields (so this fails should
    Twisted's events gain, lose or change a key).
    """
    ours = emitted(fields)
    with capturedLogs() as events:
        before = time.time()
        Logger(namespace=access.NAMESPACE).info(access.FORMAT, **fields)
    [twisteds] = events
    assert set(ours) == set(twisteds)
    for key, value in twisteds.items():
        if key == "log_logger":
            assert type(ours[key]) is type(value)
            assert ours[key].namespace == value.namespace
            assert ours[key].source is value.source
        elif key == "log_time":
            assert before - 5 <= ours[key] <= value
        else:
            assert ours[key] == value, key
            assert type(ours[key]) is type(value), key


def test_render_declines_other_events() -> None:
    """Events of another format, or missing a field, are left to the formatter."""
    event = emitted(ACCESS[0])
    assert access.render({**event, "log_format": "{client}"}) is None
    del event["status"]
    assert access.render(event) is None


def test_text_observer_writes_twisteds_own_lines() -> None:
    """
    The text observer writes, byte for byte, what textFileLogObserver
    writes: for access events, other events, systems, failures and
    multi-line messages, across second boundaries.
    """
    ours, twisteds = io.StringIO(), io.StringIO()
    publisher = LogPublisher(logs.observer("text", ours), textFileLogObserver(twisteds))
    log = Logger(namespace="somewhere", observer=publisher)
    base = float(int(time.time()))
    for offset in (0.0, 0.25, 0.999999, 1.0, 61.5, 3600.0):
        for fields in ACCESS:
            with capturedLogs() as events:
                access.emit(**fields)
            publisher({**events[0], "log_time": base + offset})
        log.info("two\nlines {n}", n=offset)
        log.warn("with a system", log_system="sys-tem", log_time=base + offset)
        log.failure("failed", Failure(ValueError("boom")), log_time=base + offset)
        log.emit(LogLevel.info, None)
    publisher({**emitted(ACCESS[0]), "log_system": "proxy"})
    assert ours.getvalue() == twisteds.getvalue()
    assert '[rendezvous_twisted.access#info] 127.0.0.1 - - "GET /~0a1b2c3d HTTP/1.1"' in (
        ours.getvalue()
    )


def twistd_options(argv: list[str]) -> Any:
    options = ServerOptions()
    options.parseOptions(argv)
    return options


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-n"], True),
        (["-n", "--logfile=-"], True),
        (["--nodaemon", "--logfile="], True),
        (["-n", "--logfile=server.log"], False),
        (["-n", "--syslog"], False),
        (["-n", "--logger=twisted.logger.textFileLogObserver"], False),
        ([], False),
    ],
)
def test_when_twistd_logs_to_stdout(argv: list[str], expected: bool) -> None:
    """Only a foreground twistd writing its text log to stdout counts as such."""
    assert logs.twistd_logs_to_stdout(twistd_options([*argv, "rendezvous"])) is expected
    assert logs.twistd_logs_to_stdout(None) is False


def test_text_observer_is_the_applications_when_twistd_logs_to_stdout() -> None:
    """
    Under `twistd -n rendezvous` the service tree gives the application the
    text observer; with --logfile it leaves twistd's own (which rotates).
    """
    to_stdout = Application("stdout")
    options = twistd_options(["-n", "rendezvous"])
    tap.makeService(options.subOptions).setServiceParent(to_stdout)
    assert to_stdout.getComponent(ILogObserver, None) is not None
    to_file = Application("file")
    options = twistd_options(["-n", "--logfile=server.log", "rendezvous"])
    tap.makeService(options.subOptions).setServiceParent(to_file)
    assert to_file.getComponent(ILogObserver, None) is None
