"""
The HTTP/1.1 edges of rendezvous_twisted.http.http1 against a real C{twistd
rendezvous} over loopback, where the client is an ordinary one (Python's
http.client) or raw bytes: what only showed there (a traceback and no
answer, a broken pipe at the connection cap) and what a balancer sees
(/health while saturated).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_end_to_end import (
    HOST,
    LISTEN,
    PARKED_PROOF_SECONDS,
    Conn,
    TwistdServer,
    running,
    secret,
    start_plugin_server,
    start_tls_server,
)

#: The metrics listener's start line ("RendezvousSite starting on" is the API's).
_METRICS_PORT = re.compile(rb"\bSite starting on (\d+)")


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """
    One server for the request edges, its rate limits out of the way.
    """
    yield from running(
        start_plugin_server(
            tmp_path_factory.mktemp("edges"),
            "--max-bytes=100",
            "--create-burst=10000",
            "--request-burst=100000",
            "--max-rendezvous-per-address=1000",
        )
    )


def post(port: int, content_type: str, body: bytes, source: str | None = None) -> tuple[int, bytes]:
    """
    A POST / as http.client sends it (a Host, the body after the head); its
    status and body.
    """
    client = http.client.HTTPConnection(HOST, port, timeout=5, source_address=(source or HOST, 0))
    try:
        client.request("POST", "/", body=body, headers={"Content-Type": content_type})
        response = client.getresponse()
        return response.status, response.read()
    finally:
        client.close()


@pytest.mark.parametrize("control", ["\x0b", "\x0c", "\x1c"])
def test_a_content_type_twisted_choked_on_gets_a_json_400(
    edges: TwistdServer, control: str
) -> None:
    """
    A POST whose Content-Type holds \\x0b, \\x0c or \\x1c gets a JSON 400 at once (it got no answer
    and logged a traceback), and nothing is logged as trouble.
    """
    mark = edges.mark()
    status, body = post(edges.port, f"text/plain{control}x", b"payload")
    assert status == 400
    assert b"M_INVALID_PARAM" in body
    edges.assert_no_trouble(mark)


def test_obs_text_in_content_type_is_stored(edges: TwistdServer) -> None:
    """A POST whose Content-Type holds \\x85 (obs-text) is created, and read back byte for byte."""
    mark = edges.mark()
    with Conn(edges.port) as conn:
        payload = secret("obs-text")
        created = conn.exchange("POST", "/", [("Content-Type", b"text/plain\x85x")], payload)
        assert created.status == 200, created.body
        rendezvous_id = created.json()["id"]
        edges.secrets += [payload, rendezvous_id.encode("ascii")]
        read = conn.exchange("GET", "/" + rendezvous_id)
    assert (read.body, read.header("Content-Type")) == (payload, b"text/plain\x85x")
    edges.assert_no_trouble(mark)


def test_options_asterisk_and_absolute_form(edges: TwistdServer) -> None:
    """
    OPTIONS * is answered by us (Server: rendezvous-twisted, CORS), a POST in absolute-form creates,
    and a request without Host gets a JSON 400, all on one kept-alive connection.
    """
    with Conn(edges.port) as conn:
        conn.send(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        star = conn.read_response()
        assert star.status == 204
        assert star.header("Server") == b"rendezvous-twisted"
        assert star.header("Access-Control-Allow-Origin") == b"*"
        payload = secret("absolute")
        conn.send(
            b"POST http://rendezvous.example/ HTTP/1.1\r\nHost: rendezvous.example\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        created = conn.read_response()
        assert created.status == 200, created.body
        edges.secrets += [payload, created.json()["id"].encode("ascii")]
        assert (created.header("Location") or b"").startswith(b"http://rendezvous.example/")
        conn.send(b"GET / HTTP/1.1\r\n\r\n")
        conn.read_response().assert_error(400, "M_BAD_REQUEST")


def test_an_absurd_chunk_size_is_413_at_once(edges: TwistdServer) -> None:
    """
    A chunk size of fffffffffffffffffff gets a JSON 413 and a close at once, not a 408 at the body
    deadline.
    """
    started = time.monotonic()
    with Conn(edges.port) as conn:
        conn.send(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"fffffffffffffffffff\r\n"
        )
        conn.read_response(timeout=3).assert_error(413, "M_TOO_LARGE")
        assert conn.read_until_closed() == b""
    assert time.monotonic() - started < 3


# Connections refused at the caps.


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[TwistdServer]:
    """
    A server with two connections in all, one per address, and metrics.
    """
    yield from running(
        TwistdServer(
            [
                "rendezvous",
                "--listen",
                LISTEN,
                "--metrics",
                f"tcp:0:interface={HOST}",
                "--max-connections=2",
                "--max-connections-per-address=1",
            ],
            tmp_path,
        )
    )


def wait_refused(server: TwistdServer, count: int) -> None:
    """
    Wait until the server has logged C{count} refused connections.
    """
    deadline = time.monotonic() + 5
    for _ in range(10_000):
        if server.output.count(b"refusing a connection from") >= count:
            return
        assert time.monotonic() < deadline, server.text()
        server.pump(deadline - time.monotonic())


def test_an_ordinary_client_gets_its_refusal_not_a_broken_pipe(capped: TwistdServer) -> None:
    """
    A client past the per-address cap, then past the global one, that connects and sends its
    request only once the server has accepted (and, before, refused) it reads a JSON 429, then a
    503, with Retry-After, and the connection's end: never a broken pipe.
    """
    with Conn(capped.port, source="127.0.0.2"):
        ask_refused(capped, "127.0.0.2", 1, 429)
        with Conn(capped.port, source="127.0.0.4"):
            ask_refused(capped, "127.0.0.3", 2, 503)


def ask_refused(server: TwistdServer, source: str, refusals: int, expected: int) -> None:
    """
    Connect from C{source}, wait until the server has refused the
    connection, then POST as http.client does: the answer is C{expected}.
    """
    client = http.client.HTTPConnection(HOST, server.port, timeout=5, source_address=(source, 0))
    try:
        client.connect()
        wait_refused(server, refusals)
        # Give the server time to do all it does before the request (it
        # once wrote its answer and closed here); now it stays silent.
        assert client.sock is not None
        select.select([client.sock], [], [], PARKED_PROOF_SECONDS)
        # http.client sends the head, then (past 2000 bytes) the body: the
        # second send is what failed with EPIPE when the refusal came first.
        client.request("POST", "/", body=b"x" * 5000)
        response = client.getresponse()
        body = response.read()
        assert response.status == expected, body
        assert response.getheader("Retry-After") == "1"
        assert response.getheader("Connection") == "close"
        assert b"M_LIMIT_EXCEEDED" in body
    finally:
        client.close()


def test_a_refused_connection_is_half_closed_after_its_answer(capped: TwistdServer) -> None:
    """
    Once its refusal is written the server shuts its side at once, so a client reading to the end
    gets the whole answer and the end, while what it still sends is taken without a reset.
    """
    with Conn(capped.port, source="127.0.0.2"), Conn(capped.port, source="127.0.0.2") as refused:
        refused.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        answer = refused.read_response()
        assert answer.status == 429
        refused.send(b"z" * 100000)
        assert refused.read_until_closed(timeout=3) == b""


def get(port: int, path: str) -> tuple[int, bytes]:
    client = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        client.request("GET", path)
        response = client.getresponse()
        return response.status, response.read()
    finally:
        client.close()


def test_health_is_503_saturated_while_the_cap_is_reached(capped: TwistdServer) -> None:
    """
    /health answers 503 "saturated" while every connection the cap allows is open (and new ones
    are refused), and 200 "serving" once they close; /metrics shows it.
    """
    metrics_port = int(capped.wait_for(_METRICS_PORT, 10).group(1))
    assert get(metrics_port, "/health") == (200, b"serving\n")
    first = Conn(capped.port, source="127.0.0.2")
    second = Conn(capped.port, source="127.0.0.3")
    try:
        first.exchange("OPTIONS", "/")
        second.exchange("OPTIONS", "/")
        assert get(metrics_port, "/health") == (503, b"saturated\n")
        _, page = get(metrics_port, "/metrics")
        assert re.search(rb"^rendezvous_http_saturated 1\.0$", page, re.MULTILINE), page
        assert re.search(rb"^rendezvous_http_connections_max 2\.0$", page, re.MULTILINE)
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + 5
    for _ in range(1000):
        if get(metrics_port, "/health") == (200, b"serving\n"):
            break
        assert time.monotonic() < deadline, "still saturated"
        select.select([], [], [], 0.01)


def test_a_silent_refused_connection_is_answered_at_the_header_deadline(tmp_path: Path) -> None:
    """A refused connection that sends nothing gets its 503 at the header deadline, then its end."""
    server = TwistdServer(
        [
            "rendezvous",
            "--listen",
            LISTEN,
            "--max-connections=1",
            "--max-connections-per-address=1",
            "--header-timeout=1",
        ],
        tmp_path,
    )
    try:
        with Conn(server.port, source="127.0.0.2"), Conn(server.port) as silent:
            started = time.monotonic()
            silent.read_response(timeout=5).assert_error(503, "M_LIMIT_EXCEEDED")
            assert 0.5 < time.monotonic() - started < 4
            assert silent.read_until_closed() == b""
    finally:
        server.stop()
    server.assert_no_trouble()


def test_a_refused_tls_client_reads_its_refusal_every_time(tmp_path: Path) -> None:
    """
    A TLS client speaking HTTP/1.1, refused at the cap, that sends its head and its body apart (as
    curl does) reads its whole JSON 503 every time, then TLS's close; nothing is logged as trouble
    (the server half-closed the TCP under TLS: the answer was lost, "Empty reply from server", and
    Twisted's TLS logged an Unhandled Error when the client closed).
    """
    from .certificates import CA, cert_pem

    ca = CA.make("refusals")
    server = start_tls_server(
        tmp_path, ca, "--max-connections=1", "--max-connections-per-address=1"
    )
    context = ssl.create_default_context(cadata=cert_pem(ca.root).decode("ascii"))
    context.set_alpn_protocols(["http/1.1"])

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection((HOST, server.port), timeout=5)
        return context.wrap_socket(raw, server_hostname="localhost")

    try:
        with connect():
            for attempt in range(10):
                with connect() as refused:
                    refused.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
                    refused.sendall(b"x")
                    answer = b""
                    with contextlib.suppress(ssl.SSLError, OSError):
                        for _ in range(100):
                            data = refused.recv(65536)
                            if not data:
                                break
                            answer += data
                        # As curl does: TLS's close_notify.
                        refused.unwrap()
                assert answer.startswith(b"HTTP/1.1 503 "), (attempt, answer)
                assert answer.endswith(b'"the server has too many connections"}')
    finally:
        server.stop()
    server.assert_no_trouble()
