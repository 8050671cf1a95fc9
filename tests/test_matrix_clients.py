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

from .test_end_to_end import HOST, TwistdServer, running, start_plugin_server

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
    yield from running(
        start_plugin_server(
            tmp_path_factory.mktemp("twistd"), f"--poll-timeout={POLL_TIMEOUT_SECONDS}"
        )
    )


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
            self.server.secrets.append(self.uri.rsplit("/", 1)[1].encode("ascii"))

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


# MSC4108: what Element Web, Element X (matrix-rust-sdk) and Synapse speak today.

MSC4108_CREATE = "/_matrix/client/unstable/org.matrix.msc4108/rendezvous"


class MSC4108Session:
    """
    Today's clients' session transport, as SPEC.md's appendix records it:
    create is a C{POST} of C{text/plain} answered C{201} with C{{"url"}};
    a write is a C{PUT} with C{If-Match}; a receive is a C{GET} with
    C{If-None-Match} that accepts a message only on a C{200} whose
    C{Content-Type} is exactly C{text/plain} and whose body is not empty,
    polls again on C{304} (which must carry ETag, Expires, Last-Modified,
    Cache-Control and Pragma, or matrix-rust-sdk refuses it), and takes any
    other status as the end of the session.
    """

    def __init__(self, server: TwistdServer, url: str | None = None) -> None:
        self.server = server
        self.url = url
        self.etag: str | None = None

    def _request(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(HOST, self.server.port, timeout=10)
        try:
            connection.request(method, urlsplit(target).path, body=body, headers=headers)
            response = connection.getresponse()
            return (
                response.status,
                {name.lower(): value for name, value in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()

    def create(self, base: str, body: bytes) -> None:
        self.server.secrets.append(body)
        status, headers, content = self._request(
            "POST", base + MSC4108_CREATE.lstrip("/"), body, {"Content-Type": "text/plain"}
        )
        assert status == 201, (status, content)
        assert headers["content-type"] == "application/json"
        self.url = json.loads(content)["url"]
        self.etag = headers["etag"]
        assert self.url is not None
        self.server.secrets.append(self.url.rsplit("/", 1)[1].encode("ascii"))

    def send(self, body: bytes) -> tuple[int, dict[str, Any]]:
        assert self.url is not None and self.etag is not None
        self.server.secrets.append(body)
        status, headers, content = self._request(
            "PUT", self.url, body, {"Content-Type": "text/plain", "If-Match": self.etag}
        )
        if status == 202:
            self.etag = headers["etag"]
            return status, {}
        return status, json.loads(content)

    def poll(self) -> bytes | None:
        """
        One GET: the message, or None for "poll again" (a 304).
        """
        assert self.url is not None
        headers = {"If-None-Match": self.etag} if self.etag else {}
        status, answer, content = self._request("GET", self.url, None, headers)
        if status == 304:
            for name in ("etag", "expires", "last-modified", "cache-control", "pragma"):
                assert name in answer, f"a 304 without {name}: {answer}"
            assert "no-store" in answer["cache-control"] and answer["pragma"] == "no-cache"
            self.etag = answer["etag"]
            return None
        assert status == 200, (status, content)
        self.etag = answer["etag"]
        if answer.get("content-type") == "text/plain" and content:
            return content
        return None

    def receive(self) -> bytes:
        for _ in range(MAX_POLLS):
            message = self.poll()
            if message is not None:
                return message
        raise AssertionError(f"no message after {MAX_POLLS} polls")


def test_an_msc4108_login_exchange_as_todays_clients_run_it(server: TwistdServer) -> None:
    """Today's MSC4108 clients complete an exchange: 201 url, 304s with headers, a 412, delete."""
    base = f"http://{HOST}:{server.port}/"
    new_device = MSC4108Session(server)
    new_device.create(base, b"MSC4108 hello from A")
    assert new_device.url is not None and new_device.url.startswith(base)
    existing = MSC4108Session(server, new_device.url)  # from the QR code
    assert existing.receive() == b"MSC4108 hello from A"

    # Nothing new for the new device until the poll timeout: a 304 with
    # every header the clients need.
    assert new_device.poll() is None
    assert new_device.etag == existing.etag

    # Turn by turn.
    assert existing.send(b"MSC4108 hello from B") == (202, {})
    assert new_device.receive() == b"MSC4108 hello from B"
    assert new_device.send(b"MSC4108 again from A") == (202, {})
    assert existing.receive() == b"MSC4108 again from A"

    # A write on a stale ETag is a 412 with the unstable error code.
    stale = MSC4108Session(server, new_device.url)
    stale.etag = '"stale"'
    status, error = stale.send(b"MSC4108 too late")
    assert status == 412
    assert error["errcode"] == "M_UNKNOWN"
    assert error["org.matrix.msc4108.errcode"] == "M_CONCURRENT_WRITE"

    status, _, _ = existing._request("DELETE", new_device.url, None, {})
    assert status == 204
    status, _, content = existing._request("GET", new_device.url, None, {})
    assert status == 404 and json.loads(content)["errcode"] == "M_NOT_FOUND"
