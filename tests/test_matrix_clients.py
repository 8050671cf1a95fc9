"""
The Matrix clients that spoke MSC3886, replayed: a scripted transport that
behaves exactly as SPEC.md records matrix-js-sdk's
C{MSC3886SimpleHttpRendezvousTransport} and Element Android's
C{SimpleHttpRendezvousTransport} behave, running a whole login-style exchange
against the real server (C{twistd rendezvous}) over loopback.

What those clients do, and so what this transport does:
  - create is a C{POST} of C{application/json}; the status is not looked at
    (200 and 201 alike), but C{Location} is required (resolved against the
    server URL, as C{new URL(location, base)} does), and C{ETag} and
    C{Expires} are read from it;
  - every later write is a C{PUT} with C{If-Match} on the ETag last seen,
    and its answer's C{ETag} is taken whatever the status;
  - a receive is a C{GET} with C{If-None-Match} on the ETag last seen; a
    C{404} means cancelled; the answer's C{Content-Type} is compared with
    C{==} to C{application/json} (no parsing: a C{; charset=} appended by a
    server would make the client poll forever); C{ETag} is read on every
    answer, C{304} included; anything but a C{200} of that exact type means
    "poll again" (after a second, in the clients; at once here, which the
    server cannot tell apart);
  - a declined login is a C{DELETE}.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from .test_end_to_end import CLEAN_EXIT, HOST, TwistdServer, start_plugin_server

TYPE = "application/json"
#: The server's poll timeout in this module: short, so that a 304 comes soon.
POLL_TIMEOUT_SECONDS = 1
#: Bound on any one answer; far above the poll timeout.
ANSWER_TIMEOUT_SECONDS = 10.0
#: The clients poll until expiry; this replay gives up after this many polls.
MAX_POLLS = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """
    One C{twistd rendezvous} with a short poll timeout.
    """
    process = start_plugin_server(
        tmp_path_factory.mktemp("twistd"), f"--poll-timeout={POLL_TIMEOUT_SECONDS}"
    )
    try:
        yield process
    finally:
        code = process.stop()
    assert code in CLEAN_EXIT, process.text()
    process.assert_no_trouble()


class Cancelled(Exception):
    """The transport saw a 404: the other side cancelled, or the rendezvous expired."""


class PendingPoll:
    """A GET sent and not yet answered: a long-poll in flight."""

    def __init__(self, connection: http.client.HTTPConnection) -> None:
        self.connection = connection


class MSC3886Transport:
    """
    The clients' transport, rule for rule (see the module docstring).
    """

    def __init__(self, server: TwistdServer, base: str | None = None) -> None:
        self.server = server
        self.base = base
        self.uri: str | None = None
        self.etag: str | None = None
        self.expires: str | None = None
        #: Every answer seen, as (method, status, headers): for the checks.
        self.seen: list[tuple[str, int, dict[str, str]]] = []

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.server.port, timeout=ANSWER_TIMEOUT_SECONDS)

    def _finish(
        self, method: str, connection: http.client.HTTPConnection
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        # Header names as fetch() and OkHttp present them: case-insensitive.
        headers = {name.lower(): value for name, value in response.getheaders()}
        self.seen.append((method, response.status, headers))
        return response.status, headers, body

    def send(self, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode("utf-8")
        self.server.secrets.append(body)
        headers = {"Content-Type": TYPE}
        if self.uri is None:
            assert self.base is not None
            method, target = "POST", self.base
        else:
            method, target = "PUT", self.uri
            if self.etag is not None:
                headers["If-Match"] = self.etag
        connection = self._connection()
        connection.request(method, urlsplit(target).path, body=body, headers=headers)
        status, answer, _ = self._finish(method, connection)
        if status == 404:
            raise Cancelled()
        # The status is never checked: the ETag is taken from any answer.
        self.etag = answer.get("etag")
        if method == "POST":
            location = answer.get("location")
            if location is None:
                raise AssertionError("No rendezvous URI given")  # the clients' own failure
            self.expires = answer.get("expires")
            base = target if target.endswith("/") else target + "/"
            self.uri = urljoin(base, location)

    def start_receive(self) -> PendingPoll:
        assert self.uri is not None, "Rendezvous not set up"
        headers = {}
        if self.etag is not None:
            headers["If-None-Match"] = self.etag
        connection = self._connection()
        connection.request("GET", urlsplit(self.uri).path, headers=headers)
        return PendingPoll(connection)

    def finish_receive(self, poll: PendingPoll) -> dict[str, Any] | None:
        """
        The message, or None for "poll again".
        """
        status, headers, body = self._finish("GET", poll.connection)
        if status == 404:
            raise Cancelled()
        if headers.get("content-type") != TYPE:
            self.etag = headers.get("etag", self.etag)
            return None
        if status == 200:
            self.etag = headers.get("etag")
            message: dict[str, Any] = json.loads(body)
            return message
        # SPEC.md: the clients read ETag on every answer, 304 included.
        self.etag = headers.get("etag", self.etag)
        return None

    def receive(self) -> dict[str, Any]:
        for _ in range(MAX_POLLS):
            message = self.finish_receive(self.start_receive())
            if message is not None:
                return message
        raise AssertionError(f"no message after {MAX_POLLS} polls: {self.seen[-MAX_POLLS:]}")

    def cancel(self) -> None:
        assert self.uri is not None
        connection = self._connection()
        connection.request("DELETE", urlsplit(self.uri).path)
        self._finish("DELETE", connection)


def test_a_whole_login_exchange_as_the_matrix_clients_run_it(server: TwistdServer) -> None:
    """The replayed MSC3886 clients complete a login-style exchange, a 304 and a decline."""
    base = f"http://{HOST}:{server.port}/"
    # The new device (say Element Web) shows the QR code; the signed-in one
    # (say Element Android) scans it.
    new_device = MSC3886Transport(server, base)
    new_device.send({"algorithm": "org.matrix.msc3903.rendezvous.v2.curve25519-aes-sha256"})
    assert new_device.uri is not None and new_device.uri.startswith(base)
    assert new_device.etag is not None and new_device.expires is not None
    signed_in = MSC3886Transport(server)
    signed_in.uri = new_device.uri  # from the QR code

    # The scanner reads the offer, then answers with its key.
    offer = signed_in.receive()
    assert offer["algorithm"].endswith("curve25519-aes-sha256")
    assert signed_in.etag == new_device.etag

    # The new device long-polls; the scanner's PUT answers it.
    waiting = new_device.start_receive()
    signed_in.send({"key": "c2Nhbm5lcg", "ciphertext": "cHJvdG9jb2xz"})
    assert new_device.finish_receive(waiting) == {
        "key": "c2Nhbm5lcg",
        "ciphertext": "cHJvdG9jb2xz",
    }
    assert new_device.etag == signed_in.etag

    # Turn by turn: each side writes on the ETag it last saw, the other
    # receives by long-poll.
    script = [
        (new_device, signed_in, {"ciphertext": "cHJvdG9jb2w", "type": "m.login.protocol"}),
        (signed_in, new_device, {"ciphertext": "bG9naW5fdG9rZW4", "type": "m.login.approved"}),
        (new_device, signed_in, {"ciphertext": "ZGV2aWNl", "type": "m.login.success"}),
    ]
    for writer, reader, message in script:
        waiting = reader.start_receive()
        writer.send(message)
        assert reader.finish_receive(waiting) == message
        assert reader.etag == writer.etag

    # Nothing new within the server's poll timeout: a 304 that carries the
    # ETag the client reads; it polls again and is answered by the next write.
    assert signed_in.finish_receive(signed_in.start_receive()) is None
    method, status, headers = signed_in.seen[-1]
    assert (method, status) == ("GET", 304)
    assert headers["etag"] == signed_in.etag == new_device.etag
    waiting = signed_in.start_receive()
    new_device.send({"ciphertext": "ZG9uZQ", "type": "m.login.verified"})
    assert signed_in.finish_receive(waiting) == {"ciphertext": "ZG9uZQ", "type": "m.login.verified"}

    # Every answer but the 404s carried an ETag, and every 200 and 304 the
    # exact Content-Type the clients compare with ==.
    for transport in (new_device, signed_in):
        for method, status, headers in transport.seen:
            assert "etag" in headers, (method, status, headers)
            assert headers.get("expires") and headers.get("last-modified"), (method, status)
            if method == "GET":
                assert headers["content-type"] == TYPE, (status, headers)
    # The create answer was a success whose status the clients never read.
    assert new_device.seen[0][1] in (200, 201)

    # The scanner declines: DELETE; the other side's long-poll sees 404.
    waiting = new_device.start_receive()
    signed_in.cancel()
    assert signed_in.seen[-1][:2] == ("DELETE", 204)
    with pytest.raises(Cancelled):
        new_device.finish_receive(waiting)
    with pytest.raises(Cancelled):
        new_device.send({"ciphertext": "dG9vIGxhdGU"})
