"""
The edges of HTTP/1.1 that twisted.web leaves to us (rendezvous_twisted.http.http1),
driven byte by byte through the real channel over a StringTransport, with
its deadlines on a Clock: Content-Type bytes Twisted's form parser choked
on, Host, request-target forms, chunk sizes, connections refused at the caps,
saturation, and the keep-alive deadlines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from rendezvous_twisted.http import http1
from rendezvous_twisted.http.answers import EVERY_RESPONSE, Refusal
from rendezvous_twisted.http.http1 import (
    LINGER_SECONDS,
    ChunkedAnnouncements,
    Target,
    TargetError,
    check_host,
    parse_target,
)
from rendezvous_twisted.ops.metrics import metrics_site

from .conftest import BufferingTransport, Harness, PeerTransport

PEER = IPv4Address("TCP", "192.0.2.9", 4321)

T = TypeVar("T", bound=StringTransport)


class Server:
    """
    One server (a Harness's API on a Clock) and raw connections to it.
    """

    def __init__(self, **config: Any) -> None:
        self.harness = Harness(**config)
        self.clock = Clock()
        self.site = self.harness.site(self.clock)

    def open(self, peer: IPv4Address = PEER) -> tuple[Any, StringTransport]:
        return self.connect(StringTransport(peerAddress=peer))

    def connect(self, transport: T) -> tuple[Any, T]:
        """
        A connection over C{transport}, from its peer.
        """
        protocol = self.site.buildProtocol(transport.getPeer())  # type: ignore[no-untyped-call]
        protocol.makeConnection(transport)
        return protocol, transport

    def exchange(self, data: bytes, peer: IPv4Address = PEER) -> list[Raw]:
        """
        Send C{data} on a new connection; the answers it got at once.
        """
        protocol, transport = self.open(peer)
        protocol.dataReceived(data)
        return answers(transport.value())


class Raw:
    """
    One answer off the wire: status code, headers (lower-cased names, every
    value), body.
    """

    def __init__(self, status: int, headers: dict[bytes, list[bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower(), [])
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def assert_json_error(self, status: int, errcode: str) -> None:
        """
        A JSON error with C{status} and C{errcode}, and every header SPEC.md
        puts on every answer (ours, not Twisted's).
        """
        assert self.status == status, (self.status, self.headers, self.body)
        assert self.header(b"Content-Type") == b"application/json"
        assert self.json()["errcode"] == errcode
        assert_house_headers(self)


def assert_house_headers(answer: Raw) -> None:
    for name, value in EVERY_RESPONSE:
        assert answer.header(name) == value, (name, answer.headers)


def answers(data: bytes) -> list[Raw]:
    """
    The answers in C{data}, read by their framing (Content-Length; none on
    204 and 304).
    """
    found = []
    for _ in range(100):
        if not data:
            break
        head, separator, rest = data.partition(b"\r\n\r\n")
        assert separator, data
        status_line, *lines = head.split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        status = int(status_line.split(b" ")[1])
        length = 0 if status in (204, 304) else int(headers.get(b"content-length", [b"0"])[0])
        found.append(Raw(status, headers, rest[:length]))
        data = rest[length:]
    return found


def no_failure_logged(events: Sequence[Any]) -> bool:
    return not [e for e in events if "log_failure" in e or e["log_level"] >= LogLevel.error]


# 1. Content-Type bytes that Twisted's form parser raised on.


@pytest.mark.parametrize("control", [b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x7f", b"\x01"])
@pytest.mark.parametrize("method", [b"POST", b"PUT"])
def test_a_control_character_in_content_type_is_a_json_400(method: bytes, control: bytes) -> None:
    """
    A POST or PUT whose Content-Type holds a control character gets a JSON 400 M_INVALID_PARAM,
    with no failure logged, and the connection goes on.
    """
    server = Server()
    rendezvous_id, _ = server.harness.create(b"before")
    target = b"/" if method == b"POST" else b"/" + rendezvous_id.encode("ascii")
    request = (
        b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain%sx\r\nContent-Length: 3\r\n\r\nabc"
        % (
            method,
            target,
            control,
        )
    )
    with capturedLogs() as events:
        first, second = server.exchange(request + b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
    first.assert_json_error(400, "M_INVALID_PARAM")
    assert second.status == 204
    assert no_failure_logged(events)
    assert server.harness.call("GET", f"/{rendezvous_id}").body == b"before"


def test_obs_text_in_content_type_is_kept_byte_for_byte() -> None:
    """
    A Content-Type holding bytes 0x80-0xff (obs-text, a valid field value) is stored and read back
    exactly as written, 0x85 (which Python's email package reads as a line break) included.
    """
    server = Server()
    content_type = b"text/plain; charset=\x85\xe9x"
    [created] = server.exchange(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: 2\r\n\r\nhi"
        % content_type
    )
    assert created.status == 200, created.body
    [read] = server.exchange(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % created.json()["id"].encode())
    assert (read.status, read.body, read.header(b"Content-Type")) == (200, b"hi", content_type)


@pytest.mark.parametrize(
    "content_type",
    [b"multipart/form-data; boundary=zz", b"application/x-www-form-urlencoded"],
)
def test_a_form_content_type_is_an_opaque_payload(content_type: bytes) -> None:
    """
    A POST whose Content-Type names a form is stored as opaque bytes, not parsed as a form (a body
    that is no multipart document was a 400).
    """
    server = Server()
    [created] = server.exchange(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: 7\r\n\r\na=1&b=2"
        % content_type
    )
    assert created.status == 200, created.body
    [read] = server.exchange(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % created.json()["id"].encode())
    assert (read.body, read.header(b"Content-Type")) == (b"a=1&b=2", content_type)


# 2. Host.


@pytest.mark.parametrize(
    "host_lines",
    [b"", b"Host: a\r\nHost: a\r\n", b"Host: a\r\nHost: b\r\n", b"Host: a/b\r\n", b"Host: a b\r\n"],
    ids=["none", "two-equal", "two-different", "slash", "space"],
)
def test_an_http11_request_needs_exactly_one_valid_host(host_lines: bytes) -> None:
    """
    An HTTP/1.1 request without Host, with two Host lines (equal or not) or with a Host that is no
    host gets a JSON 400 M_BAD_REQUEST and creates nothing; the connection goes on.
    """
    server = Server()
    first, second = server.exchange(
        b"POST / HTTP/1.1\r\n%sContent-Length: 1\r\n\r\nx" % host_lines
        + b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    first.assert_json_error(400, "M_BAD_REQUEST")
    assert "Host" in first.json()["error"]
    assert second.status == 204
    assert server.harness.store.rendezvous_count == 0


@pytest.mark.parametrize("host", [b"", b"rendezvous.test:8080", b"[2001:db8::1]:443", b"a.b."])
def test_valid_hosts_are_served(host: bytes) -> None:
    """
    A Host that is a name, an address, a bracketed IPv6 literal (with ports) or empty is served.
    """
    [created] = Server().exchange(
        b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: 1\r\n\r\nx" % host
    )
    assert created.status == 200, created.body


def test_http10_may_omit_host_but_not_repeat_it() -> None:
    """
    An HTTP/1.0 request without Host is served (Location names the server's own address); one with
    two Host lines gets a JSON 400.
    """
    server = Server()
    [created] = server.exchange(b"POST / HTTP/1.0\r\nContent-Length: 1\r\n\r\nx")
    assert created.status == 200
    assert (created.header(b"Location") or b"").startswith(b"http://")
    [refused] = server.exchange(
        b"POST / HTTP/1.0\r\nHost: a\r\nHost: b\r\nContent-Length: 1\r\n\r\nx"
    )
    refused.assert_json_error(400, "M_BAD_REQUEST")


def test_http2_hosts_are_the_authority() -> None:
    """
    Over HTTP/2 (where Twisted adds a Host for :authority) one Host, two equal ones (:authority
    and a Host header) or none pass; two that differ do not.
    """
    check_host([b"a"], b"HTTP/2", absolute=False)
    check_host([b"a", b"a"], b"HTTP/2", absolute=False)
    check_host(None, b"HTTP/2", absolute=False)
    with pytest.raises(TargetError):
        check_host([b"a", b"b"], b"HTTP/2", absolute=False)
    with pytest.raises(TargetError):
        check_host([b"a", b"a"], b"HTTP/1.1", absolute=False)


def test_http10_with_transfer_encoding_is_a_json_400() -> None:
    """An HTTP/1.0 request with Transfer-Encoding (faulty framing, RFC 9112 6.1) gets a JSON 400."""
    [refused] = Server().exchange(
        b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    )
    refused.assert_json_error(400, "M_BAD_REQUEST")


# 3. OPTIONS *.


def test_options_asterisk_is_ours() -> None:
    """
    OPTIONS * gets our 204 (the preflight's answer with Allow for the whole server) and every header
    of every answer, not Twisted's own 200.
    """
    [answer] = Server().exchange(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 204
    assert answer.header(b"Allow") == b"GET, PUT, POST, DELETE, OPTIONS"
    assert answer.header(b"Access-Control-Allow-Methods") == b"GET, PUT, POST, DELETE"
    assert answer.header(b"Server") == b"rendezvous-twisted"
    assert answer.header(b"Content-Length") is None
    assert_house_headers(answer)


@pytest.mark.parametrize("method", [b"GET", b"POST", b"DELETE", b"BREW"])
def test_any_other_method_on_asterisk_is_a_json_400(method: bytes) -> None:
    """A request target of * with any method but OPTIONS gets a JSON 400, not Twisted's 405."""
    [answer] = Server().exchange(b"%s * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % method)
    answer.assert_json_error(400, "M_BAD_REQUEST")


# 4. Chunk sizes.


@pytest.mark.parametrize(
    "chunks",
    [b"fffffffffffffffffff\r\n", b"65\r\n", b"a\r\n0123456789\r\n5b\r\n", b"64;ext=1\r\nab"],
    ids=["absurd", "one-over", "sum-over", "with-extension"],
)
def test_a_chunk_announcing_more_than_max_bytes_is_413_at_once(chunks: bytes) -> None:
    """
    A chunked body whose chunk sizes announce more than max_bytes gets a JSON 413 and a close as
    soon as the size line is in, before its data and long before the body deadline; exactly
    max_bytes is not refused.
    """
    server = Server(max_bytes=100, body_timeout_seconds=10)
    protocol, transport = server.open()
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    if chunks.startswith(b"64;"):
        # The control: 100 announced, then 2 of its bytes; still waiting.
        protocol.dataReceived(head + chunks)
        assert transport.value() == b""
        assert not transport.disconnecting
        return
    protocol.dataReceived(head + chunks)
    [answer] = answers(transport.value())
    answer.assert_json_error(413, "M_TOO_LARGE")
    assert answer.header(b"Connection") == b"close"
    assert transport.disconnecting
    assert server.harness.store.rendezvous_count == 0


def test_chunk_sizes_split_across_reads_are_followed() -> None:
    """The chunk sizes are read wherever the reads split the body, one byte at a time included."""
    body = b"5\r\nhello\r\n3;x=y\r\n, w\r\n4\r\norld\r\n0\r\n\r\n"
    server = Server(max_bytes=12)
    protocol, transport = server.open()
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for byte in body:
        protocol.dataReceived(bytes([byte]))
    [created] = answers(transport.value())
    assert created.status == 200, created.body
    assert server.harness.call("GET", "/" + created.json()["id"]).body == b"hello, world"


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=5000), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=40000), max_size=8),
)
def test_announcements_sum_the_chunk_sizes(sizes: list[int], cuts: list[int]) -> None:
    """However a well-formed chunked body is cut into reads, it announces its chunks' sum."""
    body = b"".join(b"%x\r\n%s\r\n" % (size, b"z" * size) for size in sizes) + b"0\r\n\r\n"
    announcements = ChunkedAnnouncements()
    start = 0
    for cut in [*sorted({min(cut, len(body)) for cut in cuts}), len(body)]:
        announcements.feed(body[start:cut])
        start = cut
    assert announcements.announced == sum(sizes)


# 5. Request-target forms.


def test_absolute_form_is_routed_on_its_path_with_its_authority_as_host() -> None:
    """
    An absolute-form POST creates (not 404), and Location names the target's authority, which
    replaces the Host header (RFC 9112 3.2.2); the new URL reads back in absolute-form too.
    """
    server = Server()
    [created] = server.exchange(
        b"POST http://rendezvous.example:8080/ HTTP/1.1\r\nHost: other\r\n"
        b"Content-Length: 2\r\n\r\nhi"
    )
    assert created.status == 200, created.body
    rendezvous_id = created.json()["id"]
    assert (
        created.header(b"Location") == b"http://rendezvous.example:8080/" + rendezvous_id.encode()
    )
    [read] = server.exchange(
        b"GET HTTPS://rendezvous.example/%s?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        % rendezvous_id.encode()
    )
    assert (read.status, read.body) == (200, b"hi")


def test_absolute_form_leaves_a_public_url_alone() -> None:
    """With --public-url set, Location is the public URL whatever authority the target names."""
    server = Server(public_url="https://rz.example/qr")
    [created] = server.exchange(
        b"POST http://attacker.example/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
    )
    assert (created.header(b"Location") or b"").startswith(b"https://rz.example/qr/")


@pytest.mark.parametrize("target", [b"http://x/abc", b"http://x/", b"http://x"])
def test_absolute_form_preflights(target: bytes) -> None:
    """OPTIONS on an absolute-form target gets the preflight 204; an empty path means the server."""
    [answer] = Server().exchange(b"OPTIONS %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    assert answer.status == 204
    assert answer.header(b"Access-Control-Allow-Methods") == b"GET, PUT, POST, DELETE"
    assert (answer.header(b"Allow") is not None) == (target == b"http://x")


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT rendezvous.example:443 HTTP/1.1",
        b"GET rendezvous.example HTTP/1.1",
        b"POST abc HTTP/1.1",
        b"GET ftp://x/ HTTP/1.1",
        b"GET http://user:pw@x/ HTTP/1.1",
        b"GET http:/// HTTP/1.1",
        b"GET http://a\\b/ HTTP/1.1",
    ],
    ids=["connect", "authority-form", "bare-word", "ftp", "userinfo", "no-authority", "bad-host"],
)
def test_other_targets_are_a_json_400(line: bytes) -> None:
    """
    authority-form (CONNECT's host:port), a bare word, another scheme, user information or an
    authority that is no host get a JSON 400 (this server is not a proxy).
    """
    server = Server()
    [answer] = server.exchange(line + b"\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    answer.assert_json_error(400, "M_BAD_REQUEST")
    assert server.harness.store.rendezvous_count == 0


def test_connect_on_a_path_is_a_json_405() -> None:
    """CONNECT with a path is a method this server does not allow there: a JSON 405 with Allow."""
    [answer] = Server().exchange(b"CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer.assert_json_error(405, "M_UNRECOGNIZED")
    assert answer.header(b"Allow") == b"POST, OPTIONS"


def test_parse_target_forms() -> None:
    """Each request-target form parses to the path to route on and the authority replacing Host."""
    assert parse_target(b"GET", b"/a?b") == Target(b"/a?b")
    assert parse_target(b"GET", b"http://h:1/a?b") == Target(b"/a?b", b"h:1")
    assert parse_target(b"GET", b"http://h?q") == Target(b"/?q", b"h")
    assert parse_target(b"OPTIONS", b"http://[::1]") == Target(b"*", b"[::1]")
    assert parse_target(b"OPTIONS", b"*") == Target(b"*")


# 6. Connections refused at the caps.


def test_a_refused_connection_is_answered_after_its_request_head() -> None:
    """
    A connection past the per-address cap is not answered at accept but once its request's head is
    in (whatever the pieces), with a JSON 429 and Retry-After, then closed after the linger.
    """
    server = Server(max_connections_per_address=1)
    server.open()
    protocol, transport = server.open()
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    for byte in head[:-1]:
        protocol.dataReceived(bytes([byte]))
    assert transport.value() == b""
    protocol.dataReceived(head[-1:] + b"hello")
    [answer] = answers(transport.value())
    answer.assert_json_error(429, "M_LIMIT_EXCEEDED")
    assert answer.header(b"Retry-After") == b"1"
    assert answer.header(b"Connection") == b"close"
    # The body, or anything after, is dropped while the client reads.
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(answers(transport.value())) == 1
    assert not transport.disconnecting
    server.clock.advance(LINGER_SECONDS)
    assert transport.disconnecting
    assert server.harness.store.rendezvous_count == 0


def test_a_silent_refused_connection_gets_its_refusal_at_the_header_deadline() -> None:
    """
    A refused connection that sends nothing is answered its 503 (not a 408) at the header deadline.
    """
    server = Server(max_connections=1, max_connections_per_address=1, header_timeout_seconds=3)
    server.open(IPv4Address("TCP", "192.0.2.1", 1))
    _, transport = server.open()
    server.clock.advance(2.9)
    assert transport.value() == b""
    server.clock.advance(0.1)
    [answer] = answers(transport.value())
    answer.assert_json_error(503, "M_LIMIT_EXCEEDED")


def test_an_endless_head_is_answered_past_max_header_bytes() -> None:
    """A refused connection whose head never ends is answered once it passes max_header_bytes."""
    server = Server(max_connections_per_address=1, max_header_bytes=512)
    server.open()
    protocol, transport = server.open()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nX: " + b"a" * 400)
    assert transport.value() == b""
    protocol.dataReceived(b"a" * 200)
    assert answers(transport.value())[0].status == 429


def test_waiting_refusals_are_capped() -> None:
    """
    Past max_waiting_refusals, a refused connection is answered at once and closed; one that ends
    frees its place.
    """
    server = Server(max_connections_per_address=1, max_waiting_refusals=2)
    server.open()
    waiting = [server.open() for _ in range(2)]
    assert server.site.admission.waiting_refusals == 2
    assert all(transport.value() == b"" for _, transport in waiting)
    _, at_once = server.open()
    answers(at_once.value())[0].assert_json_error(429, "M_LIMIT_EXCEEDED")
    assert at_once.disconnecting
    protocol, _ = waiting[0]
    protocol.connectionLost(Failure(ConnectionDone()))
    assert server.site.admission.waiting_refusals == 1
    _, again = server.open()
    assert again.value() == b""
    assert server.site.connection_count == 1


def test_a_graceful_stop_answers_a_waiting_refusal() -> None:
    """
    A refused connection still waiting for its request when a graceful stop begins gets its refusal,
    and the stop ends once it is closed.
    """
    server = Server(max_connections_per_address=1)
    admitted, _ = server.open()
    protocol, transport = server.open()
    drained = server.site.drain(server.clock, 5)
    answers(transport.value())[0].assert_json_error(429, "M_LIMIT_EXCEEDED")
    for lost in (admitted, protocol):
        lost.connectionLost(Failure(ConnectionDone()))
    assert drained.called


def test_a_drain_survives_a_close_reported_at_once() -> None:
    """
    A connection whose transport reports its loss inside loseConnection (as a half-closed TCP one
    does, such as a refused connection lingering after its answer) ends a graceful stop once.
    """
    server = Server()
    protocol = server.site.buildProtocol(PEER)
    transport = StringTransportWithDisconnection(peerAddress=PEER)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    drained = server.site.drain(server.clock, 5)
    assert drained.called
    assert not transport.connected


def test_the_refusal_value_answers_either_http_version() -> None:
    """
    A Refusal carries what an HTTP/2 stream needs (status, headers with type and length, body) and
    its HTTP/1.1 bytes end with Connection: close.
    """
    refusal = http1.SERVER_FULL
    assert isinstance(refusal, Refusal)
    headers = dict(refusal.response_headers())
    assert headers[b"Content-Length"] == b"%d" % len(refusal.body())
    assert headers[b"Retry-After"] == b"1"
    assert json.loads(refusal.body())["errcode"] == "M_LIMIT_EXCEEDED"
    [answer] = answers(refusal.http11())
    assert answer.status == 503
    assert answer.header(b"Connection") == b"close"
    assert answer.body == refusal.body()


# 7. Saturation.


def test_saturated_from_the_cap_until_a_tenth_below_it() -> None:
    """
    The site is saturated once its connections reach max_connections, and stays so, whatever opens
    and closes at the cap, until they fall a tenth of the cap below it.
    """
    server = Server(max_connections=20, max_connections_per_address=20)
    opened = [server.open(IPv4Address("TCP", "192.0.2.1", port))[0] for port in range(19)]
    assert not server.site.saturated
    opened.append(server.open(IPv4Address("TCP", "192.0.2.1", 19))[0])
    assert server.site.saturated
    # Connections come and go at the cap: it stays saturated.
    for port in range(30, 35):
        opened.pop().connectionLost(Failure(ConnectionDone()))
        assert server.site.saturated
        opened.append(server.open(IPv4Address("TCP", "192.0.2.1", port))[0])
        assert server.site.saturated
    for count in (19, 18):
        opened.pop().connectionLost(Failure(ConnectionDone()))
        assert server.site.connection_count == count
        assert server.site.saturated == (count > 18)


def health(site: Any) -> tuple[int, bytes]:
    metrics = metrics_site(site.metrics, lambda: False, Clock(), saturated=lambda: site.saturated)
    protocol = metrics.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    [answer] = answers(transport.value())
    return answer.status, answer.body


def test_health_says_saturated() -> None:
    """/health answers 503 "saturated" while the site is saturated, and 200 "serving" after."""
    server = Server(max_connections=2, max_connections_per_address=2)
    first, _ = server.open()
    assert health(server.site)[0] == 200
    server.open()
    assert health(server.site) == (503, b"saturated\n")
    first.connectionLost(Failure(ConnectionDone()))
    assert health(server.site) == (200, b"serving\n")


# 9. Keep-alive and the deadlines.


def test_bytes_pipelined_behind_a_parked_request_get_the_header_deadline() -> None:
    """
    Bytes of a next request sent while a GET is parked are under the header deadline once it is
    answered: keep-alive does not stretch a slow head to the idle timeout.
    """
    server = Server(header_timeout_seconds=2, idle_timeout_seconds=15, poll_timeout_seconds=30)
    rendezvous_id, created = server.harness.create()
    protocol, transport = server.open()
    protocol.dataReceived(
        b"GET /%s HTTP/1.1\r\nHost: x\r\nIf-None-Match: %s\r\n\r\nGET / HT"
        % (rendezvous_id.encode("ascii"), created.header("etag") or b"")
    )
    server.clock.advance(10)
    server.harness.call("PUT", f"/{rendezvous_id}", b"next")
    assert answers(transport.value())[0].status == 200
    transport.clear()
    server.clock.advance(1.9)
    assert transport.value() == b""
    server.clock.advance(0.1)
    answers(transport.value())[0].assert_json_error(408, "M_REQUEST_TIMEOUT")


def test_an_idle_keep_alive_connection_is_counted_until_closed() -> None:
    """
    An idle keep-alive connection counts against max_connections (and so in the memory budget) until
    the idle timeout closes it.
    """
    server = Server(idle_timeout_seconds=5, max_connections=1, max_connections_per_address=1)
    protocol, transport = server.open()
    protocol.dataReceived(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert server.site.connection_count == 1
    refused, refused_transport = server.open(IPv4Address("TCP", "192.0.2.1", 1))
    refused.dataReceived(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answers(refused_transport.value())[0].status == 503
    server.clock.advance(5)
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert server.site.connection_count == 0


def test_check_request_reads_headers() -> None:
    """check_request applies the target, Host and framing rules to a request's line and headers."""
    headers = Headers({b"Host": [b"h"]})
    assert http1.check_request(b"GET", b"/x", b"HTTP/1.1", headers) == Target(b"/x")
    with pytest.raises(TargetError):
        http1.check_request(b"GET", b"/x", b"HTTP/1.1", Headers())


# 10. What a peer that does not read or close can hold.


class CountingTransport(PeerTransport):
    """
    A transport that counts its aborts and, like a TLS transport aborted
    once already, fails on a second one.
    """

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peer)
        self.aborts = 0

    def abortConnection(self) -> None:
        self.aborts += 1
        assert self.aborts == 1, "aborted twice (a TLS transport raises AttributeError)"
        super().abortConnection()  # type: ignore[no-untyped-call]


def test_a_connection_cut_at_the_header_deadline_is_timed_out_once() -> None:
    """
    A connection answered 408 at the header deadline is aborted once, at Twisted's abort timeout
    after it: the idle timeout, still armed, does not time it out (and abort it) a second time.
    """
    server = Server(header_timeout_seconds=2, idle_timeout_seconds=5)
    _, transport = server.connect(CountingTransport(PEER))
    with capturedLogs() as events:
        server.clock.advance(2)
        answers(transport.value())[0].assert_json_error(408, "M_REQUEST_TIMEOUT")
        assert transport.disconnecting
        for _ in range(40):
            server.clock.advance(1)
    assert transport.aborts == 1
    assert [e for e in events if e.get("log_format", "").startswith("Timing out")] != []
    assert len([e for e in events if e.get("log_format", "").startswith("Timing out")]) == 1
    assert no_failure_logged(events)


def test_a_refusal_answered_at_once_is_aborted_after_the_linger() -> None:
    """
    A refused connection past max_waiting_refusals, answered at once, is aborted after the linger
    if its peer does not close (a TLS close waits for the peer's close_notify for ever).
    """
    server = Server(max_connections_per_address=1, max_waiting_refusals=1)
    server.open()
    server.open()
    protocol, transport = server.connect(CountingTransport(PEER))
    answers(transport.value())[0].assert_json_error(429, "M_LIMIT_EXCEEDED")
    assert transport.disconnecting
    assert transport.aborts == 0
    server.clock.advance(LINGER_SECONDS)
    assert transport.aborts == 1
    protocol.connectionLost(Failure(ConnectionDone()))
    calls: Any = server.clock.getDelayedCalls()
    mine = [c for c in calls if getattr(c.func, "__self__", None) in (protocol, protocol.http11)]
    assert mine == []


def pipelined(server: Server, count: int) -> tuple[Any, BufferingTransport]:
    """
    A connection over a transport that pauses its producer as TCP's does,
    whose peer has pipelined C{count} GETs of a new rendezvous of 1000
    bytes, and read nothing yet.
    """
    rendezvous_id, _ = server.harness.create(b"p" * 1000)
    protocol, transport = server.connect(BufferingTransport(PEER))
    protocol.dataReceived(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % rendezvous_id.encode() * count)
    return protocol, transport


def test_pipelined_answers_wait_for_a_peer_that_does_not_read() -> None:
    """
    Requests pipelined by a peer that does not read are answered only as the transport writes what
    it holds, never more than its buffer and one answer ahead; all are answered as the peer reads.
    """
    server = Server(max_bytes=1000, request_burst=1000)
    _, transport = pipelined(server, 100)
    held = len(transport.value())
    assert transport.buffer_size < held < transport.buffer_size + 2000
    got = answers(transport.read())
    for _ in range(100):
        held = len(transport.value())
        assert held < transport.buffer_size + 2000
        if not held:
            break
        got += answers(transport.read())
    assert len(got) == 100
    assert all(answer.status == 200 and answer.body == b"p" * 1000 for answer in got)


def test_a_peer_that_pipelines_and_never_reads_is_cut_at_the_idle_timeout() -> None:
    """
    A peer whose pipelined answers fill the transport and who reads none of them for idle_timeout
    is closed, then aborted, and its other requests are never answered.
    """
    server = Server(max_bytes=1000, idle_timeout_seconds=5)
    with capturedLogs() as events:
        _, transport = pipelined(server, 100)
        held = len(transport.value())
        assert len(answers(transport.value())) < 10
        server.clock.advance(4.9)
        assert not transport.disconnecting
        server.clock.advance(0.1)
        assert transport.disconnecting
        assert len(transport.value()) == held
    assert no_failure_logged(events)


def test_a_graceful_stop_closes_a_connection_whose_answers_wait_to_be_read() -> None:
    """
    A graceful stop closes a connection whose requests are all answered but whose pipelined ones
    wait for the transport to write what it holds: nothing is being asked or answered on it.
    """
    server = Server(max_bytes=1000, request_burst=1000)
    _, transport = pipelined(server, 10)
    assert transport.paused
    server.site.drain(server.clock, 5)
    assert transport.disconnecting
