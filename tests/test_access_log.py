"""
The access log can go to a file of its own (C{--access-log}), appended by
Twisted directly instead of passing through every log observer; its lines are
the same, ids still redacted.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent

from rendezvous_twisted import tap
from rendezvous_twisted.web import RendezvousSite, redact

from .conftest import Harness
from .test_tap import parsed

CLIENT = IPv4Address("TCP", "192.0.2.9", 4321)


def test_access_lines_go_to_the_file_only(tmp_path: Path) -> None:
    """With an access-log path, each request's line is appended there and not to the log."""
    path = tmp_path / "access.log"
    path.write_text("an older line\n")
    harness = Harness()
    rendezvous_id, _ = harness.create(b"payload")
    site = harness.api.site(MemoryReactorClock(), access_log=str(path))
    site.doStart()  # type: ignore[no-untyped-call]
    channel = site.buildProtocol(CLIENT)  # type: ignore[no-untyped-call]
    transport = StringTransport(peerAddress=CLIENT)
    channel.makeConnection(transport)
    with capturedLogs() as events:
        channel.dataReceived(f"GET /{rendezvous_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz")
    site.doStop()  # type: ignore[no-untyped-call]
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2
    lines = path.read_text().splitlines()
    assert lines[0] == "an older line"
    assert lines[1].startswith("192.0.2.9 - - [")
    assert lines[1].endswith(f'"GET /~{redact(rendezvous_id)} HTTP/1.1" 200 7')
    assert '"POST / HTTP/1.1" 200' in lines[2]
    assert len(lines) == 3
    text = "\n".join(formatEvent(event) for event in events)
    assert "HTTP/1.1" not in text and rendezvous_id not in text


def test_access_log_option_and_variable(tmp_path: Path) -> None:
    """--access-log and RENDEZVOUS_ACCESS_LOG name the site's log file; neither means none."""
    path = str(tmp_path / "access.log")
    assert parsed([f"--access-log={path}"])["access-log"] == path
    assert tap.options_from_environment({"RENDEZVOUS_ACCESS_LOG": path})["access-log"] == path
    assert parsed([])["access-log"] is None
    for access_log, expected in [(path, path), (None, None)]:
        reactor = MemoryReactorClock()
        options = parsed(
            ["--listen=tcp:0"] + ([f"--access-log={access_log}"] if access_log else [])
        )
        tap.makeService(options, reactor).startService()
        [(_, site, _, _)] = reactor.tcpServers
        assert isinstance(site, RendezvousSite)
        assert site.logPath == expected
