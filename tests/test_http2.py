"""
HTTP/2 over TLS (ALPN "h2", with the C{http2} extra installed), tested with
the C{h2} library as the client against a real C{twistd rendezvous}:
long-polling on one multiplexed connection, a 413 that leaves the connection
usable, and a graceful stop answering a parked HTTP/2 reader 304.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest

h2_connection = pytest.importorskip("h2.connection", reason="the http2 extra is not installed")
import h2.config  # noqa: E402
import h2.events  # noqa: E402

from .certificates import CA, cert_pem  # noqa: E402
from .test_end_to_end import (  # noqa: E402
    CLEAN_EXIT,
    HOST,
    PARKED_PROOF_SECONDS,
    TwistdServer,
    secret,
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
            self.closed = True
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
        self.sock.sendall(self.conn.data_to_send())
        return True

    def response(self, stream: int, timeout: float = 5.0) -> tuple[int, Headers, bytes]:
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            if stream in self.ended:
                headers = self.headers[stream]
                return int(headers[":status"]), headers, bytes(self.bodies[stream])
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                break
            self._pump(remaining)
        raise AssertionError(f"no whole response on stream {stream} within {timeout}s")

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """
        Whether the server ends the connection (GOAWAY or a close) within
        C{timeout}.
        """
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            if self.closed:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._pump(remaining)
        return False

    def quiet_for(self, stream: int, seconds: float) -> bool:
        """
        True when stream C{stream} gets no response within C{seconds}.
        """
        deadline = time.monotonic() + seconds
        for _ in range(100_000):
            if stream in self.headers or stream in self.ended:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._pump(remaining)
        return True


@pytest.fixture
def h2_server(tmp_path: Path) -> tuple[TwistdServer, CA]:
    ca = CA.make("h2")
    ca.write_leaf(tmp_path / "tls")
    process = TwistdServer(
        [
            "rendezvous",
            "--listen",
            f"ssl:0:interface={HOST}",
            f"--tls-cert={tmp_path / 'tls' / 'fullchain.pem'}",
            f"--tls-key={tmp_path / 'tls' / 'key.pem'}",
            "--max-bytes=100",
            "--poll-timeout=30",
        ],
        tmp_path,
        port_line=__import__("re").compile(rb"RendezvousSite \(TLS\) starting on (\d+)"),
    )
    return process, ca


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
