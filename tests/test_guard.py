"""
The defences of the HTTP layer, in memory: rate limits, network policy,
trusted proxies, connection caps, header caps and slow-request deadlines.
Routes are driven through the Harness; the channel byte by byte over a
StringTransport, with its deadlines on a Clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from rendezvous_twisted.http.http1 import LINGER_SECONDS
from rendezvous_twisted.protocols.msc4108 import STABLE_CREATE_PATH, UNSTABLE_CREATE_PATH

from .conftest import Harness, fired
from .test_web import assert_json_error, raw_answer

PEER = IPv4Address("TCP", "192.0.2.9", 4321)


# Rate limits and policy, through the routes.


def test_request_rate_limit_is_429_json_with_retry_after() -> None:
    """
    Past its request burst a client gets 429 JSON with a truthful Retry-After, then is served again.
    """
    harness = Harness(request_burst=3, request_per_second=0.5)
    rendezvous_id, _ = harness.create()
    assert harness.call("GET", f"/{rendezvous_id}").code == 200
    assert harness.call("OPTIONS", "/").code == 204
    refused = harness.call("GET", f"/{rendezvous_id}")
    assert_json_error(refused, 429, "M_LIMIT_EXCEEDED")
    assert refused.header("retry-after") == b"2"
    harness.advance(1)
    assert harness.call("GET", f"/{rendezvous_id}").code == 429
    harness.advance(1)
    assert harness.call("GET", f"/{rendezvous_id}").code == 200


def test_create_has_its_own_budget() -> None:
    """Creates are limited by their own, smaller budget, and other requests go on."""
    harness = Harness(create_burst=2, create_per_second=0.1)
    first, _ = harness.create()
    harness.create()
    refused = harness.call("POST", "/", b"x")
    assert_json_error(refused, 429, "M_LIMIT_EXCEEDED")
    assert refused.header("retry-after") == b"10"
    assert harness.call("GET", f"/{first}").code == 200
    assert harness.store.rendezvous_count == 2


def test_denied_network_gets_403_on_everything() -> None:
    """A client in a deny network gets 403 JSON on every method, preflights included."""
    harness = Harness(deny=("127.0.0.0/8",))
    for method, path in [("POST", "/"), ("GET", "/" + "a" * 22), ("OPTIONS", "/")]:
        assert_json_error(harness.call(method, path, b"x"), 403, "M_FORBIDDEN")
    assert harness.store.rendezvous_count == 0


def test_allow_create_limits_creating_only() -> None:
    """
    Outside the allow-create networks a client may not create, but may use a rendezvous it was
    given.
    """
    allowed = Harness(allow_create=("127.0.0.0/8",))
    allowed.create()
    harness = Harness(allow_create=("192.0.2.0/24",))
    assert_json_error(harness.call("POST", "/", b"x"), 403, "M_FORBIDDEN")
    version = fired(harness.store.create(b"given", b"text/plain", "192.0.2.1"))
    answer = harness.call("GET", f"/{version.rendezvous_id}")
    assert (answer.code, answer.body) == (200, b"given")


def test_per_address_cap_counts_by_the_limit_key() -> None:
    """The store's per-address cap counts an IPv6 /64 as one client, as the rate limits do."""
    harness = Harness(trusted_proxies=("127.0.0.1/32",), max_rendezvous_per_address=2)
    for host in ("2001:db8::1", "2001:db8::2"):
        harness.create(headers={"X-Forwarded-For": host})
    refused = harness.call("POST", "/", b"x", headers={"X-Forwarded-For": "2001:db8::ffff:3"})
    assert_json_error(refused, 429, "M_LIMIT_EXCEEDED")
    harness.create(headers={"X-Forwarded-For": "2001:db8:0:1::1"})


def test_trusted_proxy_client_has_its_own_budget() -> None:
    """
    Behind a trusted proxy each forwarded client has its own budget; an untrusted peer's header is
    ignored.
    """
    trusted = Harness(trusted_proxies=("127.0.0.1/32",), create_burst=1)
    trusted.create(headers={"X-Forwarded-For": "203.0.113.1"})
    trusted.create(headers={"X-Forwarded-For": "203.0.113.2"})
    untrusted = Harness(create_burst=1)
    untrusted.create(headers={"X-Forwarded-For": "203.0.113.1"})
    refused = untrusted.call("POST", "/", b"x", headers={"X-Forwarded-For": "203.0.113.2"})
    assert refused.code == 429


def test_location_scheme_follows_forwarded_proto_only_from_trusted_proxies() -> None:
    """X-Forwarded-Proto: https makes Location https from a trusted proxy, and nothing otherwise."""
    headers = {"X-Forwarded-Proto": "https"}
    _, trusted = Harness(trusted_proxies=("127.0.0.1/32",)).create(headers=headers)
    assert (trusted.header("location") or b"").startswith(b"https://rendezvous.test/")
    _, untrusted = Harness().create(headers=headers)
    assert (untrusted.header("location") or b"").startswith(b"http://rendezvous.test/")


def test_access_log_names_the_forwarded_client() -> None:
    """Behind a trusted proxy, the access log shows the client the proxy named, not the proxy."""
    harness = Harness(trusted_proxies=("127.0.0.1/32",))
    with capturedLogs() as events:
        harness.create(headers={"X-Forwarded-For": "203.0.113.77"})
    lines = [formatEvent(e) for e in events]
    assert any(line.startswith("203.0.113.77 - - ") for line in lines), lines


# The channel.


def connect(
    harness: Harness, clock: Clock, peer: IPv4Address = PEER
) -> tuple[Any, StringTransport]:
    site = harness.site(clock)
    return open_on(site, peer)


def open_on(site: Any, peer: IPv4Address = PEER) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    return channel, transport


def test_headers_dribbled_past_their_deadline_get_408_and_a_close() -> None:
    """
    A request whose headers are still incomplete at the header deadline gets 408 and is closed,
    however steadily bytes came.
    """
    harness = Harness(header_timeout_seconds=2)
    clock = Clock()
    channel, transport = connect(harness, clock)
    dribble = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
    for byte in dribble[:39]:
        channel.dataReceived(bytes([byte]))
        clock.advance(0.05)
    assert not transport.disconnecting and transport.value() == b""
    channel.dataReceived(dribble[39:40])
    clock.advance(0.05)
    status, headers, body = raw_answer(transport)
    assert status.startswith(b"HTTP/1.1 408 ")
    assert headers[b"content-type"] == b"application/json"
    assert b"M_REQUEST_TIMEOUT" in body
    assert transport.disconnecting


def test_a_silent_connection_gets_the_header_deadline_too() -> None:
    """
    A connection that sends nothing is closed at the header deadline, not after the idle timeout.
    """
    harness = Harness(header_timeout_seconds=3)
    clock = Clock()
    _, transport = connect(harness, clock)
    clock.advance(3)
    assert transport.disconnecting


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() -> None:
    """
    A keep-alive connection with no request on it is closed once idle_timeout_seconds pass, and
    not before.
    """
    harness = Harness(idle_timeout_seconds=7, header_timeout_seconds=100)
    clock = Clock()
    channel, transport = connect(harness, clock)
    channel.dataReceived(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 204 ")
    clock.advance(6.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_a_body_dribbled_past_its_deadline_gets_408() -> None:
    """A body still incomplete at the body deadline gets 408 and a close."""
    harness = Harness(header_timeout_seconds=100, body_timeout_seconds=2)
    clock = Clock()
    channel, transport = connect(harness, clock)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    for _ in range(30):
        channel.dataReceived(b"z")
        clock.advance(0.1)
    assert transport.disconnecting
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert harness.store.rendezvous_count == 0


def test_parked_long_poll_outlives_the_deadlines() -> None:
    """A parked GET is not cut by the header or body deadlines, and is answered by the next PUT."""
    harness = Harness(header_timeout_seconds=1, body_timeout_seconds=1, poll_timeout_seconds=30)
    rendezvous_id, created = harness.create()
    etag = created.header("etag")
    assert etag is not None
    clock = Clock()
    channel, transport = connect(harness, clock)
    channel.dataReceived(
        b"GET /%s HTTP/1.1\r\nHost: x\r\nIf-None-Match: %s\r\n\r\n"
        % (rendezvous_id.encode("ascii"), etag)
    )
    # A pipelined byte while parked must not start a deadline either.
    channel.dataReceived(b"G")
    clock.advance(10)
    assert transport.value() == b"" and not transport.disconnecting
    assert harness.store.parked_count == 1
    harness.call("PUT", f"/{rendezvous_id}", b"next")
    assert raw_answer(transport)[2] == b"next"
    assert not transport.disconnecting


def test_parked_requests_are_in_flight_until_answered_or_abandoned() -> None:
    """
    A parked GET counts as in flight until it is answered or its client hangs up, and only once.
    """
    harness = Harness(poll_timeout_seconds=30)
    clock = Clock()
    site = harness.site(clock)
    parked = []
    for port in (1, 2):
        rendezvous_id, created = harness.create()
        channel, transport = open_on(site, IPv4Address("TCP", "192.0.2.9", port))
        channel.dataReceived(
            b"GET /%s HTTP/1.1\r\nHost: x\r\nIf-None-Match: %s\r\n\r\n"
            % (rendezvous_id.encode("ascii"), created.header("etag") or b"")
        )
        parked.append((rendezvous_id, channel, transport))
    assert (site.in_flight, harness.store.parked_count) == (2, 2)
    (woken_id, woken, woken_transport), (_, abandoned, _) = parked
    harness.call("PUT", f"/{woken_id}", b"next")
    assert raw_answer(woken_transport)[2] == b"next"
    assert site.in_flight == 1
    abandoned.connectionLost(Failure(ConnectionDone()))
    assert (site.in_flight, harness.store.parked_count) == (0, 0)
    woken.connectionLost(Failure(ConnectionDone()))
    assert site.in_flight == 0


def test_keep_alive_requests_each_get_a_fresh_deadline() -> None:
    """On a kept-alive connection, each request's header deadline runs from its own first byte."""
    harness = Harness(header_timeout_seconds=2)
    clock = Clock()
    channel, transport = connect(harness, clock)
    for _ in range(3):
        clock.advance(1.5)
        channel.dataReceived(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 204 " in transport.value()
        transport.clear()
    assert not transport.disconnecting


def test_a_keep_alive_connection_keeps_one_timer_for_its_deadlines() -> None:
    """
    The header, body and idle deadlines of a connection share one timer: a
    hundred requests on one connection, a tenth of a second apart, set a
    timer a handful of times (about once per shortest timeout), never one
    per request, and the connection never holds more than one.
    """
    harness = Harness(
        header_timeout_seconds=2,
        body_timeout_seconds=3,
        idle_timeout_seconds=5,
        request_burst=1000,
    )
    clock = Clock()
    set_timers: list[Any] = []
    original = clock.callLater

    def call_later(delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        call = original(delay, f, *args, **kwargs)
        set_timers.append(call)
        return call

    clock.callLater = call_later  # type: ignore[method-assign,assignment]
    channel, transport = connect(harness, clock)

    def channels_timers() -> list[Any]:
        calls: Any = clock.getDelayedCalls()
        return [c for c in calls if getattr(c.func, "__self__", None) is channel]

    for n in range(100):
        request = b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n"
        if n % 2:
            request = b"PUT /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        channel.dataReceived(request)
        assert transport.value().startswith((b"HTTP/1.1 204 ", b"HTTP/1.1 404 "))
        transport.clear()
        assert len(channels_timers()) <= 1
        clock.advance(0.1)
    mine = [c for c in set_timers if getattr(c.func, "__self__", None) is channel]
    # 10 seconds in all, the shortest timeout 2: about 5 (before: 250, two
    # per request and one more per body).
    assert len(mine) <= 7, len(mine)
    assert not transport.disconnecting


@pytest.mark.parametrize(
    ("header", "body", "idle"),
    [(2.0, 10.0, 15.0), (10.0, 2.0, 15.0), (10.0, 10.0, 3.0), (4.0, 6.0, 5.0), (6.0, 4.0, 5.0)],
)
def test_each_deadline_falls_when_it_is_due_whatever_the_others(
    header: float, body: float, idle: float
) -> None:
    """
    Whichever timeout is the shortest, each deadline closes the connection
    exactly when it falls due, not a moment before or after: a silent new
    connection (header deadline or idle timeout), a kept-alive connection
    after its answer (idle timeout, from its last byte), and a body that
    never comes (body deadline or idle timeout, from the headers' last
    byte).  The request deadlines answer 408 first; the idle timeout just
    closes.
    """
    harness = Harness(
        header_timeout_seconds=header, body_timeout_seconds=body, idle_timeout_seconds=idle
    )

    def closes_after(seconds: float, clock: Clock, transport: StringTransport) -> None:
        clock.advance(seconds - 0.001)
        assert not transport.disconnecting
        clock.advance(0.001)
        assert transport.disconnecting

    clock = Clock()
    _, transport = connect(harness, clock)
    clock.advance(0.5)
    closes_after(min(header, idle) - 0.5, clock, transport)
    assert transport.value().startswith(b"HTTP/1.1 408 ") is (header < idle)

    clock = Clock()
    channel, transport = connect(harness, clock)
    clock.advance(1)
    channel.dataReceived(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
    transport.clear()
    closes_after(idle, clock, transport)
    assert transport.value() == b""

    clock = Clock()
    channel, transport = connect(harness, clock)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\n")
    clock.advance(1)
    channel.dataReceived(b"Content-Length: 5\r\n\r\nabc")
    closes_after(min(body, idle), clock, transport)
    assert transport.value().startswith(b"HTTP/1.1 408 ") is (body < idle)


def test_too_many_headers_is_a_json_400() -> None:
    """
    More header lines than max_headers gets a JSON 400 and a close; max_headers itself is served.
    """
    harness = Harness(max_headers=5)
    clock = Clock()
    channel, transport = connect(harness, clock)
    channel.dataReceived(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 4 + b"\r\n")
    assert b" 204 " in transport.value()
    channel, transport = connect(harness, clock)
    channel.dataReceived(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 5 + b"\r\n")
    status, headers, _ = raw_answer(transport)
    assert status.startswith(b"HTTP/1.1 400 ") and headers[b"content-type"] == b"application/json"
    assert transport.disconnecting


@pytest.mark.parametrize(
    "data",
    [
        b"OPTIONS / HTTP/1.1\r\nHost: x\r\n" + b"X-Short: " + b"a" * 40 + b"\r\n" * 1,
        b"OPTIONS / HTTP/1.1\r\n" + (b"X-Short: " + b"a" * 40 + b"\r\n") * 12,
        b"OPTIONS / HTTP/1.1\r\nX-Big: " + b"a" * 600,
        b"GET /" + b"a" * 600 + b" HTTP/1.1",
    ],
    ids=["control", "many-short-lines", "one-long-line", "long-request-line"],
)
def test_oversize_headers_are_a_json_400(data: bytes) -> None:
    """
    A header section over max_header_bytes, in many short lines or one
    unfinished long one, gets a JSON 400 and a close.
    """
    harness = Harness(max_header_bytes=512)
    channel, transport = connect(harness, Clock())
    channel.dataReceived(data)
    if data.count(b"X-Short") == 1:
        # The control: the same lines, under the limit, are accepted.
        channel.dataReceived(b"\r\n")
        assert b" 204 " in transport.value()
        return
    status, headers, _ = raw_answer(transport)
    assert status.startswith(b"HTTP/1.1 400 ") and headers[b"content-type"] == b"application/json"
    assert transport.disconnecting


#: A request head, which a refused connection waits for before it is answered.
HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_connection_cap_per_address_is_429_and_frees_on_close() -> None:
    """
    Past max_connections_per_address an address's next connection gets 429 and a close; closing one
    frees a slot.
    """
    harness = Harness(max_connections_per_address=2)
    clock = Clock()
    site = harness.site(clock)
    first, _ = open_on(site)
    open_on(site)
    refused_channel, refused = open_on(site)
    refused_channel.dataReceived(HEAD)
    status, headers, body = raw_answer(refused)
    assert status == b"HTTP/1.1 429 Too Many Requests"
    assert headers[b"retry-after"] == b"1" and b"M_LIMIT_EXCEEDED" in body
    clock.advance(LINGER_SECONDS)
    assert refused.disconnecting
    _, other = open_on(site, IPv4Address("TCP", "192.0.2.10", 1))
    assert not other.disconnecting
    first.connectionLost(Failure(ConnectionDone()))
    _, again = open_on(site)
    assert not again.disconnecting
    assert site.connection_count == 3


def refusals(site: Any, reason: str) -> float:
    value = site.metrics.registry.get_sample_value("rendezvous_refusals_total", {"reason": reason})
    assert value is not None
    return float(value)


def test_refusals_on_the_connection_are_counted_and_logged() -> None:
    """
    Refusals written on the connection below the resource (a connection cap, a 408, a 400) are
    counted by reason and logged, as the error mapping's refusals are.
    """
    harness = Harness(max_connections_per_address=1, header_timeout_seconds=1)
    clock = Clock()
    site = harness.site(clock)
    open_on(site)  # holds the address's one connection; it times out too
    with capturedLogs() as events:
        refused_channel, refused = open_on(site)
        refused_channel.dataReceived(HEAD)
        _, other = open_on(site, IPv4Address("TCP", "192.0.2.10", 1))
        other.clear()
        clock.advance(1)
    assert raw_answer(refused)[0] == b"HTTP/1.1 429 Too Many Requests"
    status, _, body = raw_answer(other)
    assert status.startswith(b"HTTP/1.1 408 ")
    assert b'within 1 second"' in body
    assert refusals(site, "connections") == 1
    assert refusals(site, "slow") == 2
    messages = [formatEvent(event) for event in events]
    assert any("refusing a connection from 192.0.2.9" in m for m in messages), messages
    assert any("not complete in 1s" in m for m in messages), messages
    bad, transport = open_on(site, IPv4Address("TCP", "192.0.2.11", 1))
    with capturedLogs() as events:
        bad.dataReceived(b"NOT HTTP AT ALL\r\n\r\n")
    assert raw_answer(transport)[0].startswith(b"HTTP/1.1 400 ")
    assert refusals(site, "malformed") == 1
    assert any("unparseable request from 192.0.2.11" in formatEvent(e) for e in events)


def test_trusted_proxies_are_only_under_the_global_connection_cap() -> None:
    """
    A trusted proxy's connections count against max_connections only; past that, anyone gets 503.
    """
    harness = Harness(
        trusted_proxies=("192.0.2.0/24",), max_connections=4, max_connections_per_address=1
    )
    site = harness.site(Clock())
    for _ in range(3):
        assert not open_on(site)[1].disconnecting
    assert not open_on(site, IPv4Address("TCP", "198.51.100.1", 1))[1].disconnecting
    refused_channel, refused = open_on(site, IPv4Address("TCP", "198.51.100.2", 1))
    refused_channel.dataReceived(HEAD)
    assert raw_answer(refused)[0] == b"HTTP/1.1 503 Service Unavailable"


def test_refused_connection_is_not_counted_and_reads_nothing() -> None:
    """
    A refused connection serves no request it sends, answering only its refusal, and once closed
    leaves the counts as they were.
    """
    harness = Harness(max_connections_per_address=1)
    site = harness.site(Clock())
    open_on(site)
    refused_channel, transport = open_on(site)
    refused_channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx" + HEAD * 2
    )
    assert transport.value().count(b"HTTP/1.1 ") == 1
    assert raw_answer(transport)[0] == b"HTTP/1.1 429 Too Many Requests"
    assert harness.store.rendezvous_count == 0
    refused_channel.connectionLost(Failure(ConnectionDone()))
    assert site.connection_count == 1


def test_clients_behind_a_unix_socket_proxy_have_their_own_budgets() -> None:
    """
    Behind a proxy on a UNIX socket, each client it names in X-Forwarded-For
    has its own create budget, and its connections are under no per-address cap.
    """
    harness = Harness(create_burst=1, max_connections_per_address=1)
    site = harness.site(Clock())
    peer = UNIXAddress(b"/run/rendezvous.sock")

    def post(client: bytes) -> bytes:
        channel = site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\nContent-Length: 1\r\n\r\nx"
            % client
        )
        status: bytes = raw_answer(transport)[0]
        return status

    assert post(b"203.0.113.1") == b"HTTP/1.1 200 OK"
    assert post(b"203.0.113.2") == b"HTTP/1.1 200 OK"
    assert post(b"203.0.113.1") == b"HTTP/1.1 429 Too Many Requests"
    assert site.connection_count == 3


def test_msc4108_creates_share_the_create_policy_and_budget() -> None:
    """
    MSC4108 creates are under the same allow-create policy and the same
    create budget as native ones, and count towards the same per-address cap.
    """
    text = {"Content-Type": "text/plain"}
    refused = Harness(allow_create=("192.0.2.0/24",)).call(
        "POST", UNSTABLE_CREATE_PATH, b"x", headers=text
    )
    assert_json_error(refused, 403, "M_FORBIDDEN")
    harness = Harness(create_burst=2, create_per_second=0.01)
    harness.create()
    assert harness.call("POST", STABLE_CREATE_PATH, b"x", headers=text).code == 201
    limited = harness.call("POST", UNSTABLE_CREATE_PATH, b"x", headers=text)
    assert_json_error(limited, 429, "M_LIMIT_EXCEEDED")
    assert limited.header("retry-after") == b"100"
    capped = Harness(max_rendezvous_per_address=1)
    capped.create()
    assert capped.call("POST", STABLE_CREATE_PATH, b"x", headers=text).code == 429
