"""
HTTP/2 over TLS (ALPN "h2", with the C{http2} extra installed), tested with
the C{h2} library as the client against a real C{twistd rendezvous}:
long-polling on one multiplexed connection, a 413 that leaves the connection
usable, a graceful stop answering a parked HTTP/2 reader 304, a Host header
beside an equal :authority and OPTIONS *, the header deadline of HTTP/2
connections, and their release from the connection caps.
"""

from __future__ import annotations

import http.client
import json
import re
import select
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

h2_connection = pytest.importorskip("h2.connection", reason="the http2 extra is not installed")
import h2.config  # noqa: E402
import h2.errors  # noqa: E402
import h2.events  # noqa: E402

from .certificates import CA, cert_pem  # noqa: E402
from .test_end_to_end import (  # noqa: E402
    CLEAN_EXIT,
    HOST,
    PARKED_PROOF_SECONDS,
    TwistdServer,
    secret,
    start_tls_server,
)

Headers = dict[str, str]


class H2Client:
    """
    A blocking HTTP/2 client on one TLS connection: requests on new streams,
    responses collected per stream, every wait bounded by select().
    """

    def __init__(self, port: int, ca: CA) -> None:
        context = ssl.create_default_context(cadata=cert_pem(ca.root).decode("ascii"))
        context.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection((HOST, port), timeout=5)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.alpn = self.sock.selected_alpn_protocol()
        self.conn = h2_connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.headers: dict[int, Headers] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.closed = False
        #: The error code of the server's GOAWAY, once one came.
        self.goaway: int | None = None
        #: Whether the server closed TLS.
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def request(
        self, method: str, path: str, headers: Headers | None = None, body: bytes | None = None
    ) -> int:
        stream: int = self.conn.get_next_available_stream_id()
        fields = [
            (":method", method),
            (":path", path),
            (":scheme", "https"),
            (":authority", "localhost"),
            *(headers or {}).items(),
        ]
        if body is not None:
            fields.append(("content-length", str(len(body))))
        self.conn.send_headers(stream, fields, end_stream=body is None)
        if body is not None:
            self.conn.send_data(stream, body, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.bodies[stream] = bytearray()
        return stream

    def _pump(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not readable and not self.sock.pending():
            return False
        data = self.sock.recv(65536)
        if not data:
            self.closed = self.eof = True
            return False
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.headers[event.stream_id] = {
                    (k.decode() if isinstance(k, bytes) else k): (
                        v.decode() if isinstance(v, bytes) else v
                    )
                    for k, v in event.headers
                }
            elif isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.reset.add(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
                self.goaway = event.error_code
        self.sock.sendall(self.conn.data_to_send())
        return True

    def _pump_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """
        Read frames until C{done()} holds (True) or C{timeout} seconds pass
        (False).
        """
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            if done():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._pump(remaining)
        return done()

    def response(self, stream: int, timeout: float = 5.0) -> tuple[int, Headers, bytes]:
        self._pump_until(lambda: stream in self.ended or self.closed, timeout)
        if stream not in self.ended:
            raise AssertionError(f"no whole response on stream {stream} within {timeout}s")
        headers = self.headers[stream]
        return int(headers[":status"]), headers, bytes(self.bodies[stream])

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """
        Whether the server ends the connection (GOAWAY or a close) within
        C{timeout}.
        """
        return self._pump_until(lambda: self.closed, timeout)

    def quiet_for(self, stream: int, seconds: float) -> bool:
        """
        True when stream C{stream} gets no response within C{seconds}.
        """
        return not self._pump_until(lambda: stream in self.headers or stream in self.ended, seconds)

    def goodbye(self) -> None:
        """
        Send GOAWAY, as a client done with the connection does.
        """
        self.conn.close_connection()
        self.sock.sendall(self.conn.data_to_send())

    def wait_forgotten(self, timeout: float = 5.0) -> None:
        """
        Wait for the server to close TLS, then hang up (L{hang_up}).
        """
        deadline = time.monotonic() + timeout
        self._pump_until(lambda: self.eof, timeout)
        assert self.eof, f"the server did not close TLS within {timeout}s"
        self.hang_up(max(0.0, deadline - time.monotonic()))

    def hang_up(self, timeout: float = 5.0) -> None:
        """
        End the TCP connection (a FIN, as a client going away does), and
        wait for the server to close its side.  The server closes the socket
        just before it runs its connectionLost, in one go: anything asked of
        it after this returns is answered after that.
        """
        # SSLSocket.shutdown drops TLS: what follows reads the raw socket.
        self.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            readable, _, _ = select.select(
                [self.sock], [], [], max(0.0, deadline - time.monotonic())
            )
            if not readable:
                raise AssertionError(f"the server did not close TCP within {timeout}s")
            if self.sock.recv(65536) == b"":
                return


def start_h2_server(tmp_path: Path, *extra: str) -> tuple[TwistdServer, CA]:
    ca = CA.make("h2")
    return start_tls_server(tmp_path, ca, "--max-bytes=100", *extra), ca


@pytest.fixture
def h2_server(tmp_path: Path) -> tuple[TwistdServer, CA]:
    return start_h2_server(tmp_path, "--poll-timeout=30")


def test_long_poll_over_http2(h2_server: tuple[TwistdServer, CA]) -> None:
    """
    Over one HTTP/2 connection, a GET with a matching If-None-Match stays
    parked while other streams go on, and is answered 200 with the new
    payload and its Content-Type by a PUT on another stream; an oversize
    POST gets a JSON 413 without harming the connection; SIGTERM answers a
    parked HTTP/2 reader 304.
    """
    process, ca = h2_server
    client = H2Client(process.port, ca)
    try:
        assert client.alpn == "h2"
        payload = secret("h2")
        process.secrets.append(payload)
        created = client.request("POST", "/", {"content-type": "text/plain"}, payload)
        status, headers, body = client.response(created)
        assert status == 200, body
        rendezvous_id = json.loads(body)["id"]
        process.secrets.append(rendezvous_id.encode())
        assert headers["location"] == f"https://localhost/{rendezvous_id}"
        etag = headers["etag"]
        path = "/" + rendezvous_id

        parked = client.request("GET", path, {"if-none-match": etag})
        assert client.quiet_for(parked, PARKED_PROOF_SECONDS)
        read = client.request("GET", path)
        assert client.response(read)[2] == payload
        assert parked not in client.headers, "the long-poll was answered early"

        update = secret("h2-update")
        process.secrets.append(update)
        written = client.request("PUT", path, {"content-type": "a/b", "if-match": etag}, update)
        assert client.response(written)[0] == 202
        status, headers, body = client.response(parked)
        assert (status, body, headers["content-type"]) == (200, update, "a/b")

        big = client.request("POST", "/", {}, b"z" * 101)
        status, headers, body = client.response(big)
        assert status == 413
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["errcode"] == "M_TOO_LARGE"

        second = client.request("GET", path, {"if-none-match": headers.get("etag", '"x"')})
        # A garbage If-None-Match reads at once; the connection still works.
        assert client.response(second)[0] == 200

        new_etag = client.headers[written]["etag"]
        waiting = client.request("GET", path, {"if-none-match": new_etag})
        assert client.quiet_for(waiting, PARKED_PROOF_SECONDS)
        process.send_signal(signal.SIGTERM)
        status, headers, _ = client.response(waiting)
        assert status == 304
        assert headers["etag"] == new_etag
        # The server says goodbye with GOAWAY; a client then hangs up.
        assert client.wait_closed()
        client.close()
        code = process.stop()
    finally:
        client.close()
        process.stop()
    assert code in CLEAN_EXIT, process.text()
    assert b"shutdown timeout" not in process.output, process.text()
    assert b'"GET /~' in process.output and b"HTTP/2" in process.output
    for hidden in process.secrets:
        assert hidden not in process.output
    process.assert_no_trouble()


def test_msc4388_over_http2(h2_server: tuple[TwistdServer, CA]) -> None:
    """
    Over one HTTP/2 connection, an MSC4388 session: created with an access
    token, a read held on its sequence token while other streams go on and
    woken by a send on another stream, the send's transaction replayed, a
    stale send 409, a JSON body that is no object 400, and the delete.
    """
    process, ca = h2_server
    client = H2Client(process.port, ca)
    api = "/_matrix/client/v1/rendezvous"
    json_type = {"content-type": "application/json"}
    try:
        assert client.alpn == "h2"
        created = client.request(
            "POST", api, {**json_type, "authorization": "Bearer not-judged"}, b'{"data": "A"}'
        )
        status, _, body = client.response(created)
        assert status == 200, body
        session = json.loads(body)
        process.secrets.append(session["id"].encode())
        path = f"{api}/{session['id']}"
        token = session["sequence_token"]

        held = client.request("GET", f"{path}?sequence_token={token}")
        assert client.quiet_for(held, PARKED_PROOF_SECONDS)
        read = client.request("GET", path)
        assert json.loads(client.response(read)[2])["data"] == "A"
        sent_body = json.dumps({"sequence_token": token, "data": "B"}).encode()
        sent = client.request("PUT", f"{path}/txn-1", json_type, sent_body)
        status, _, body = client.response(sent)
        assert status == 200, body
        new_token = json.loads(body)["sequence_token"]
        status, _, body = client.response(held)
        assert (status, json.loads(body)["data"]) == (200, "B")
        assert json.loads(body)["sequence_token"] == new_token

        replayed = client.request("PUT", f"{path}/txn-1", json_type, sent_body)
        assert json.loads(client.response(replayed)[2]) == {"sequence_token": new_token}
        stale = client.request("PUT", f"{path}/txn-2", json_type, sent_body)
        assert client.response(stale)[0] == 409
        broken = client.request("PUT", f"{path}/txn-3", json_type, b"[1, 2]")
        status, headers, body = client.response(broken)
        assert (status, json.loads(body)["errcode"]) == (400, "M_BAD_JSON")
        assert headers["content-type"] == "application/json"
        deleted = client.request("DELETE", path)
        assert client.response(deleted)[:3:2] == (200, b"{}")
    finally:
        client.close()
        process.stop()
    process.assert_no_trouble()
    for hidden in process.secrets:
        assert hidden not in process.output


#: The header deadline of the servers below: short, so that the tests can
#: outlast it.
HEADER_TIMEOUT_SECONDS = 1.0
_METRICS_PORT = re.compile(rb"\bSite starting on (\d+)")


def open_connections(metrics_port: int) -> float:
    """
    The server's C{rendezvous_http_connections} gauge, scraped over HTTP.
    """
    client = http.client.HTTPConnection(HOST, metrics_port, timeout=5)
    try:
        client.request("GET", "/metrics")
        text = client.getresponse().read().decode("utf-8")
    finally:
        client.close()
    match = re.search(r"^rendezvous_http_connections (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


def test_http2_requests_keep_their_authority_as_host(tmp_path: Path) -> None:
    """
    Over HTTP/2, a request carrying :authority and an equal Host header (two Host lines to
    Twisted) is served, and OPTIONS * is answered by us.
    """
    process, ca = start_h2_server(tmp_path)
    try:
        client = H2Client(process.port, ca)
        try:
            assert client.alpn == "h2"
            payload = secret("h2-host")
            process.secrets.append(payload)
            stream = client.request("POST", "/", {"host": "localhost"}, payload)
            status, headers, body = client.response(stream)
            assert status == 200, body
            process.secrets.append(body)
            assert headers["location"].startswith("https://localhost/")
            star = client.request("OPTIONS", "*")
            status, headers, _ = client.response(star)
            assert status == 204
            assert headers["allow"] == "GET, PUT, POST, DELETE, OPTIONS"
            assert headers["server"] == "rendezvous-twisted"
        finally:
            client.close()
    finally:
        process.stop()
    process.assert_no_trouble()


def test_http2_long_poll_outlives_the_header_deadline(tmp_path: Path) -> None:
    """
    An HTTP/2 long-poll parked for longer than the header deadline is
    answered 304 at its poll timeout, and its connection goes on serving.
    """
    process, ca = start_h2_server(
        tmp_path, f"--header-timeout={HEADER_TIMEOUT_SECONDS}", "--poll-timeout=2.5"
    )
    client = H2Client(process.port, ca)
    try:
        assert client.alpn == "h2"
        payload = secret("h2-deadline")
        process.secrets.append(payload)
        status, headers, body = client.response(client.request("POST", "/", {}, payload))
        assert status == 200, body
        path = headers["location"].removeprefix("https://localhost")
        process.secrets.append(path[1:].encode())
        parked = client.request("GET", path, {"if-none-match": headers["etag"]})
        asked = time.monotonic()
        status, answered, _ = client.response(parked, timeout=10)
        waited = time.monotonic() - asked
        assert status == 304, process.text()
        assert answered["etag"] == headers["etag"]
        assert waited > HEADER_TIMEOUT_SECONDS, f"answered after {waited:.2f}s"
        assert not client.closed
        assert client.response(client.request("GET", path))[:3:2] == (200, payload)
    finally:
        client.close()
        code = process.stop()
    assert code in CLEAN_EXIT, process.text()
    assert b"Request Timeout" not in process.output
    process.assert_no_trouble()


def test_http2_connections_are_released_when_closed(tmp_path: Path) -> None:
    """
    Every closed HTTP/2 connection leaves the connection count, so that a
    client opening more of them, one after another, than
    max_connections_per_address is still served.
    """
    cap = 2
    process, ca = start_h2_server(
        tmp_path,
        f"--max-connections-per-address={cap}",
        "--metrics",
        f"tcp:0:interface={HOST}",
    )
    try:
        metrics_port = int(process.wait_for(_METRICS_PORT, 10).group(1))
        for attempt in range(cap + 2):
            client = H2Client(process.port, ca)
            try:
                assert client.alpn == "h2"
                assert client.response(client.request("OPTIONS", "/"))[0] == 204
                assert open_connections(metrics_port) == 1
                if attempt % 2:
                    # GOAWAY: the server closes the connection.
                    client.goodbye()
                    client.wait_forgotten()
                else:
                    client.hang_up()
            finally:
                client.close()
            assert open_connections(metrics_port) == 0
    finally:
        code = process.stop()
    assert code in CLEAN_EXIT, process.text()
    process.assert_no_trouble()


def test_http2_connection_without_a_request_is_closed_with_goaway(tmp_path: Path) -> None:
    """
    An HTTP/2 connection with no stream open for the idle timeout (one
    that never asks anything, or stays silent after its answers) is closed
    with a GOAWAY, not with HTTP/1.1 bytes, and leaves the connection count.
    """
    process, ca = start_h2_server(
        tmp_path,
        f"--idle-timeout={HEADER_TIMEOUT_SECONDS}",
        "--metrics",
        f"tcp:0:interface={HOST}",
    )
    opened = time.monotonic()
    silent = H2Client(process.port, ca)
    answered = H2Client(process.port, ca)
    try:
        metrics_port = int(process.wait_for(_METRICS_PORT, 10).group(1))
        assert answered.response(answered.request("OPTIONS", "/"))[0] == 204
        idle_since = time.monotonic()
        for client, since in ((silent, opened), (answered, idle_since)):
            assert client.alpn == "h2"
            assert client.wait_closed(timeout=HEADER_TIMEOUT_SECONDS + 5), process.text()
            # Not at once: at the deadline (the answered client saw its
            # answer a little after the server's deadline started).
            assert time.monotonic() - since > HEADER_TIMEOUT_SECONDS / 2
            assert client.goaway == h2.errors.ErrorCodes.NO_ERROR
            client.wait_forgotten()
        process.wait_for(
            re.compile(rb"closing an HTTP/2 connection from 127.0.0.1: no request in 1.0s"), 5
        )
        assert open_connections(metrics_port) == 0
    finally:
        silent.close()
        answered.close()
        code = process.stop()
    assert code in CLEAN_EXIT, process.text()
    process.assert_no_trouble()
