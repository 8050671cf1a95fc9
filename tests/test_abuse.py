"""
Attacks on a real server: C{twistd rendezvous} in a subprocess, driven over
loopback sockets from two source addresses (127.0.0.1 is the attacker,
127.0.0.2 the honest client; Linux routes all of 127/8 to the loopback).

Each attack is configured with small limits so that it is short, and each
test ends with the honest client completing a whole exchange.  Nothing
sleeps: every wait is a C{select()} with a deadline, every loop is bounded.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from .test_end_to_end import (
    PARKED_PROOF_SECONDS,
    Conn,
    Headers,
    Response,
    TwistdServer,
    assert_exchange_works,
    create,
    etag_of,
    running,
    secret,
    start_plugin_server,
)

ATTACKER = "127.0.0.1"
HONEST = "127.0.0.2"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[TwistdServer]]:
    """
    Servers a test starts; each is stopped afterwards, must exit cleanly and
    must have logged no failure.
    """
    started: list[TwistdServer] = []
    with ExitStack() as stack:
        try:
            yield started
        finally:
            for server in started:
                stack.enter_context(contextmanager(running)(server))


def start(servers: list[TwistdServer], tmp_path: Path, *options: str) -> TwistdServer:
    server = start_plugin_server(tmp_path, *options)
    servers.append(server)
    return server


def ask(
    server: TwistdServer,
    source: str,
    method: str,
    target: str,
    headers: Headers = (),
    body: bytes | None = None,
) -> Response:
    with Conn(server.port, source=source) as conn:
        return conn.exchange(method, target, headers, body)


def assert_rate_limited(response: Response) -> int:
    """
    A 429 JSON answer with a Retry-After of whole seconds; returns it.
    """
    response.assert_error(429, "M_LIMIT_EXCEEDED")
    retry_after = response.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit(), response.head
    assert response.header("Access-Control-Allow-Origin") == b"*"
    return int(retry_after)


def test_create_flood_is_limited_while_another_address_exchanges(
    servers: list[TwistdServer], tmp_path: Path
) -> None:
    """
    A flood of creates from one address gets 429 with Retry-After once its
    create budget is spent, while a second address creates and completes an
    exchange unhindered.
    """
    server = start(
        servers,
        tmp_path,
        "--create-burst=5",
        "--create-per-second=0.01",
        "--max-rendezvous-per-address=32",
    )
    statuses = []
    with Conn(server.port, source=ATTACKER) as flood:
        for _ in range(20):
            response = flood.exchange("POST", "/", body=b"flood")
            statuses.append(response.status)
            if response.status == 429:
                # The budget refills at 0.01/s: the next token is 100 s away.
                assert 1 < assert_rate_limited(response) <= 100
            else:
                server.secrets.append(response.json()["id"].encode("ascii"))
    # Five creates, well under the per-address cap of 32: the rate limit,
    # not the cap, refused the rest.
    assert statuses == [200] * 5 + [429] * 15
    assert_exchange_works(server, HONEST)


def test_request_flood_is_limited_per_address(servers: list[TwistdServer], tmp_path: Path) -> None:
    """
    A flood of reads from one address gets 429 once its request budget is
    spent; another address reads the same rendezvous and exchanges.
    """
    server = start(servers, tmp_path, "--request-burst=10", "--request-per-second=0.01")
    with Conn(server.port, source=HONEST) as honest:
        rendezvous_id, _ = create(server, honest, secret("read-me"))
    statuses = []
    with Conn(server.port, source=ATTACKER) as flood:
        for _ in range(15):
            response = flood.exchange("GET", "/" + rendezvous_id)
            statuses.append(response.status)
            if response.status == 429:
                assert_rate_limited(response)
    assert statuses == [200] * 10 + [429] * 5
    # The honest address spent 1 request of its 10; an exchange takes 6.
    assert_exchange_works(server, HONEST)


def test_full_server_refuses_and_keeps_every_rendezvous(
    servers: list[TwistdServer], tmp_path: Path
) -> None:
    """
    A full server answers new creates 429 with Retry-After, and every live
    rendezvous keeps its payload and ETag (nothing is evicted); the honest
    client completes an exchange on its own rendezvous.
    """
    server = start(
        servers,
        tmp_path,
        "--max-rendezvous=6",
        "--max-rendezvous-per-address=4",
        "--create-burst=100",
    )
    live: dict[str, tuple[bytes, bytes]] = {}
    with Conn(server.port, source=HONEST) as honest:
        honest_id, honest_created = create(server, honest, secret("honest"))
        live[honest_id] = (server.secrets[-1], etag_of(honest_created))
    with Conn(server.port, source=ATTACKER) as flood:
        for _ in range(4):
            body = secret("flood")
            rendezvous_id, created = create(server, flood, body)
            live[rendezvous_id] = (body, etag_of(created))
        # The attacker is at its per-address cap ...
        assert_rate_limited(flood.exchange("POST", "/", body=b"more"))
    with Conn(server.port, source="127.0.0.3") as other:
        body = secret("third")
        rendezvous_id, created = create(server, other, body)
        live[rendezvous_id] = (body, etag_of(created))
        # ... and now the server is full, for everyone.
        refused = other.exchange("POST", "/", body=b"one too many")
        assert assert_rate_limited(refused) >= 1
        assert b"full" in refused.body
    assert_rate_limited(ask(server, HONEST, "POST", "/", body=b"full"))
    for rendezvous_id, (body, etag) in live.items():
        read = ask(server, "127.0.0.4", "GET", "/" + rendezvous_id)
        assert (read.status, read.body, etag_of(read)) == (200, body, etag)
    # The honest client's own handshake goes on, on its live rendezvous.
    with Conn(server.port, source=HONEST) as a, Conn(server.port, source=HONEST) as b:
        path = "/" + honest_id
        b.request("GET", path, [("If-None-Match", live[honest_id][1])])
        assert b.quiet_for(PARKED_PROOF_SECONDS)
        reply = secret("reply")
        server.secrets.append(reply)
        assert a.exchange("PUT", path, [("If-Match", live[honest_id][1])], reply).status == 202
        woken = b.read_response()
        assert (woken.status, woken.body) == (200, reply)


def dribble_until_closed(conns: list[Conn], data: bytes, seconds: float) -> list[bytes | None]:
    """
    Send C{data} on every connection a byte at a time, one byte each every
    50 ms, until the server has closed them all or C{seconds} pass.  For each
    connection, what the server answered before closing it, or None if it
    is still open.
    """
    deadline = time.monotonic() + seconds
    received = [bytearray() for _ in conns]
    closed = [False] * len(conns)
    sent = 0
    next_byte = time.monotonic()
    for _ in range(100_000):
        now = time.monotonic()
        if all(closed) or now >= deadline:
            break
        if now >= next_byte and sent < len(data):
            for i, conn in enumerate(conns):
                if not closed[i]:
                    try:
                        conn.sock.send(data[sent : sent + 1])
                    except OSError:
                        closed[i] = True
            sent += 1
            next_byte = now + 0.05
        open_socks = [conn.sock for i, conn in enumerate(conns) if not closed[i]]
        wait = max(0.0, min(next_byte, deadline) - time.monotonic())
        readable, _, _ = select.select(open_socks, [], [], wait)
        for sock in readable:
            i = next(i for i, conn in enumerate(conns) if conn.sock is sock)
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                received[i] += chunk
            else:
                closed[i] = True
    return [bytes(r) if c else None for r, c in zip(received, closed, strict=True)]


def test_slowloris_is_cut_while_honest_clients_are_served(
    servers: list[TwistdServer], tmp_path: Path
) -> None:
    """
    Connections dribbling their headers (or body) a byte at a time are
    answered 408 and closed once the header (or body) deadline passes, even
    though each byte would reset an idle timeout; meanwhile an honest client
    exchanges, its long-poll parked for longer than those deadlines.
    """
    server = start(servers, tmp_path, "--header-timeout=1", "--body-timeout=1", "--poll-timeout=10")
    with Conn(server.port, source=HONEST) as a, Conn(server.port, source=HONEST) as b:
        # An honest long-poll, parked before the attack starts.
        rendezvous_id, created = create(server, a, secret("slowloris"))
        path = "/" + rendezvous_id
        b.request("GET", path, [("If-None-Match", etag_of(created))])

        slow_heads = [Conn(server.port, source=ATTACKER) for _ in range(4)]
        slow_body = Conn(server.port, source=ATTACKER)
        try:
            slow_body.send(
                b"PUT " + path.encode("ascii") + b" HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 500\r\n\r\n"
            )
            # 100 bytes at 20 a second: each connection would take 5 s.
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 80
            answers = dribble_until_closed([*slow_heads, slow_body], head, 4.0)
            for answer in answers:
                assert answer is not None, "a dribbling connection was not cut"
                assert answer.startswith(b"HTTP/1.1 408 "), answer
                assert b'"errcode": "M_REQUEST_TIMEOUT"' in answer
        finally:
            for conn in [*slow_heads, slow_body]:
                conn.close()

        # Over a second has passed: the parked reader outlived every deadline.
        assert b.quiet_for(0.05), "the parked long-poll was answered or cut"
        reply = secret("reply")
        server.secrets.append(reply)
        put = a.exchange("PUT", path, [("If-Match", etag_of(created))], reply)
        assert put.status == 202
        woken = b.read_response()
        assert (woken.status, woken.body) == (200, reply)
    assert_exchange_works(server, HONEST)


def test_connection_cap_per_address(servers: list[TwistdServer], tmp_path: Path) -> None:
    """
    Past its cap of concurrent connections an address's next connection is
    answered 429 and closed, its parked long-polls are not cut, and another
    address is served.
    """
    server = start(servers, tmp_path, "--max-connections-per-address=3")
    with Conn(server.port, source=HONEST) as writer:
        rendezvous_id, created = create(server, writer, secret("capped"))
    path = "/" + rendezvous_id
    parked = [Conn(server.port, source=ATTACKER) for _ in range(3)]
    try:
        for conn in parked:
            conn.request("GET", path, [("If-None-Match", etag_of(created))])
        for conn in parked:
            assert conn.quiet_for(PARKED_PROOF_SECONDS / 3)
        with Conn(server.port, source=ATTACKER) as extra:
            # Answered after its request, as a client that sends first expects.
            extra.request("POST", "/", body=b"x")
            refused = extra.read_response()
            assert_rate_limited(refused)
            assert refused.header("Connection") == b"close"
            assert extra.read_until_closed() == b""
        reply = secret("wake")
        server.secrets.append(reply)
        assert ask(server, HONEST, "PUT", path, [], reply).status == 202
        for conn in parked:
            woken = conn.read_response()
            assert (woken.status, woken.body) == (200, reply)
    finally:
        for conn in parked:
            conn.close()
    assert_exchange_works(server, HONEST)


def test_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    servers: list[TwistdServer], tmp_path: Path
) -> None:
    """
    X-Forwarded-For and X-Forwarded-Proto from a peer that is not a trusted
    proxy are ignored: varying them does not escape the rate limit, nor
    change the Location scheme; from the trusted proxy, X-Forwarded-For
    selects the client (its rightmost untrusted entry) and the proto counts.
    """
    proxy = "127.0.0.2"
    server = start(
        servers,
        tmp_path,
        "--create-burst=2",
        "--create-per-second=0.01",
        f"--trusted-proxy={proxy}/32",
    )

    def post(source: str, headers: Headers) -> Response:
        response = ask(server, source, "POST", "/", headers, b"x")
        if response.status == 200:
            server.secrets.append(response.json()["id"].encode("ascii"))
        return response

    # The attacker, not a proxy: a new spoofed client per request.
    spoofed = [
        post("127.0.0.3", [("X-Forwarded-For", f"203.0.113.{n}"), ("X-Forwarded-Proto", "https")])
        for n in range(3)
    ]
    assert [r.status for r in spoofed] == [200, 200, 429]
    location = spoofed[0].header("Location")
    assert location is not None and location.startswith(b"http://"), spoofed[0].head

    # Through the trusted proxy, the clients it names are told apart; a
    # client-supplied entry on the left cannot make it someone else.
    via_proxy = [
        post(proxy, [("X-Forwarded-For", f"198.51.100.{n % 10}, 203.0.113.50")]) for n in range(3)
    ]
    assert [r.status for r in via_proxy] == [200, 200, 429]
    other = post(proxy, [("X-Forwarded-For", "203.0.113.51"), ("X-Forwarded-Proto", "https")])
    assert other.status == 200
    location = other.header("Location")
    assert location is not None and location.startswith(b"https://"), other.head
    # The proxy's own address is a client too (no header): its own budget.
    assert post(proxy, []).status == 200
    assert_exchange_works(server, "127.0.0.4")
