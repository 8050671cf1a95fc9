"""
What the request path was engineered to do per request (docs/performance.md,
"Klein through its public API"), pinned by its effect, over the real channel
and site with their time on a Clock.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import http

from .conftest import EPOCH, Harness
from .test_http1 import Raw, answers

PEER = IPv4Address("TCP", "192.0.2.9", 4321)


class Served:
    """
    A Harness's API, its site on a Clock at EPOCH, and one connection.
    """

    def __init__(self) -> None:
        self.harness = Harness()
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.site = self.harness.site(self.clock)
        self.protocol: Any = self.site.buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.protocol.makeConnection(self.transport)

    def ask(self, request: bytes) -> Raw:
        self.protocol.dataReceived(request)
        [answer] = answers(self.transport.value())
        self.transport.clear()
        return answer


def dated(answer: Raw) -> float:
    date = answer.header(b"Date")
    assert date is not None, answer.headers
    return parsedate_to_datetime(date.decode("ascii")).timestamp()


def test_date_is_the_sites_time() -> None:
    """
    An answer's Date is its site's reactor's time (formatted once per
    second), not the wall clock's.
    """
    served = Served()
    served.clock.advance(0.7)
    assert dated(served.ask(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")) == EPOCH
    served.clock.advance(2)
    answer = served.ask(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 404
    assert dated(answer) == EPOCH + 2


def test_host_is_parsed_once_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The guard and Klein's render both ask a request for its host name;
    Twisted parses the Host header once, and each request its own.
    """
    parsed: list[bytes | None] = []
    original = http.Request.getRequestHostname

    def counting(request: http.Request) -> bytes:
        parsed.append(request.getHeader(b"Host"))
        hostname: bytes = original(request)  # type: ignore[no-untyped-call]
        return hostname

    monkeypatch.setattr(http.Request, "getRequestHostname", counting)
    served = Served()
    created = served.ask(
        b"POST / HTTP/1.1\r\nHost: one.test\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 2\r\n\r\nhi"
    )
    assert created.status == 200
    location = created.header(b"Location")
    assert location is not None and location.startswith(b"http://one.test/")
    path = location.removeprefix(b"http://one.test")
    read = served.ask(b"GET %s HTTP/1.1\r\nHost: two.test\r\n\r\n" % path)
    assert read.status == 200 and read.body == b"hi"
    assert parsed == [b"one.test", b"two.test"]


class CountingTransport(StringTransport):
    """A transport that counts how often its addresses are asked for."""

    def __init__(self) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            peerAddress=PEER, hostAddress=IPv4Address("TCP", "192.0.2.1", 80)
        )
        self.asked: list[str] = []

    def getPeer(self) -> Any:
        self.asked.append("peer")
        return super().getPeer()  # type: ignore[no-untyped-call]

    def getHost(self) -> Any:
        # A TCP transport calls getsockname() and builds an address here.
        self.asked.append("host")
        return super().getHost()  # type: ignore[no-untyped-call]


def test_a_connections_addresses_are_asked_once() -> None:
    """
    Every request of a connection has its client and host addresses, and
    the transport is asked for each once per connection, not per request.
    """
    served = Served()
    transport = CountingTransport()
    protocol: Any = served.site.buildProtocol(PEER)
    protocol.makeConnection(transport)
    asked_at_start = len(transport.asked)
    requests: list[Any] = []
    original = served.site.resource.render

    def render(request: Any) -> Any:
        requests.append(request)
        return original(request)

    served.site.resource.render = render
    for _ in range(3):
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    written: bytes = transport.value()  # type: ignore[no-untyped-call]
    assert [answer.status for answer in answers(written)] == [405] * 3
    assert len(requests) == 3
    for request in requests:
        assert request.getClientAddress() == PEER
        assert request.getHost() == IPv4Address("TCP", "192.0.2.1", 80)
    assert transport.asked.count("host") <= 1
    assert transport.asked[asked_at_start:].count("peer") <= 1
