"""
MSC4388's Python client (L{rendezvous_twisted.client.msc4388}): against the
real server over loopback sockets on the real reactor; and its retry rules
on a Clock, against requesters that lose answers.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.resource import Resource

from rendezvous_twisted.client import (
    STABLE_PREFIX,
    UNSTABLE_PREFIX,
    ConcurrentWriteError,
    GoneWhileWaitingError,
    MSC4388Client,
    NotFoundError,
    ReceiveTimeout,
    ServerError,
    Session,
    UnrecognizedError,
)
from rendezvous_twisted.client.msc4388 import SEND_RETRY_PAUSE_SECONDS
from rendezvous_twisted.core.config import MSC4388_STABLE_PATH, MSC4388_UNSTABLE_PATH

from .conftest import answered, fired
from .test_client import in_reactor, live_server, parked, real_reactor

#: The errcode of a stale token under each prefix (SPEC.md's MSC4388 appendix).
CONFLICT_ERRCODES = {
    UNSTABLE_PREFIX: "IO_ELEMENT_MSC4388_CONCURRENT_WRITE",
    STABLE_PREFIX: "M_CONCURRENT_WRITE",
}


class Recording:
    """
    A real HTTP client on the real reactor that notes every request made.
    """

    def __init__(self) -> None:
        self.real = HTTPClient(Agent(real_reactor()))
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests.append((method, url, kwargs["headers"]))
        d: Deferred[Any] = self.real.request(method, url, **kwargs)
        return d

    def made(self, method: str) -> list[str]:
        """
        The URLs of the requests made with C{method}.
        """
        return [url for m, url, _ in self.requests if m == method]


class LosesFirstAnswer(Recording):
    """
    The first PUT reaches the server, which answers it; the answer is read
    off the wire and then lost, as when a connection drops on its way back.
    """

    lost = False

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        d = super().request(method, url, **kwargs)
        if method != "PUT" or self.lost:
            return d
        self.lost = True

        async def lose() -> Any:
            response = await d
            await treq.content(response)
            raise ResponseNeverReceived([Failure(ConnectionLost("dropped on its way back"))])

        return Deferred.fromCoroutine(lose())


def msc4388(
    server_url: str, http: Any = None, prefix: str = UNSTABLE_PREFIX, **kwargs: Any
) -> MSC4388Client:
    return MSC4388Client(
        real_reactor(), server_url, http, prefix=prefix, request_timeout_seconds=10, **kwargs
    )


def test_the_prefixes_are_the_servers() -> None:
    """The client's two prefixes are the paths the server serves MSC4388 at."""
    assert (UNSTABLE_PREFIX, STABLE_PREFIX) == (MSC4388_UNSTABLE_PATH, MSC4388_STABLE_PATH)


# Over loopback, on the real reactor.


@in_reactor
async def test_a_whole_exchange_between_two_devices() -> None:
    """
    A discovers and creates; B reads by id and answers; A's receive returns
    the answer; A replies and B receives it; A deletes, and the id is gone.
    """
    async with live_server() as server:
        a, b = msc4388(server.url), msc4388(server.url.rstrip("/"))
        assert await a.discover() is True
        before = real_reactor().seconds()
        created = await a.create("offer")
        assert len(created.id) >= 16 and created.sequence_token
        assert created.expires is not None and before + 110 <= created.expires <= before + 310

        offer = await b.read(created.id)
        assert (offer.data, offer.session.sequence_token) == ("offer", created.sequence_token)
        answered_by_b = await b.send(offer.session, "answer")
        assert answered_by_b.sequence_token not in (None, created.sequence_token)

        answer = await a.receive(created, timeout_seconds=10)
        assert answer.data == "answer"
        assert answer.session.sequence_token == answered_by_b.sequence_token
        replied = await a.send(answer.session, "done")
        done = await b.receive(answered_by_b, timeout_seconds=10)
        assert (done.data, done.session.sequence_token) == ("done", replied.sequence_token)

        await a.delete(created)
        with pytest.raises(NotFoundError) as caught:
            await b.read(created.id)
        assert (caught.value.status, caught.value.errcode) == (404, "M_NOT_FOUND")
        assert not isinstance(caught.value, UnrecognizedError)


@in_reactor
async def test_receive_long_polls_and_wakes_on_the_other_sides_send() -> None:
    """
    receive() sends ?sequence_token= (and Prefer: wait, its bound), is held
    by the server, and returns the other side's data with one GET: no
    polling loop.
    """
    async with live_server() as server:
        recording = Recording()
        a, b = msc4388(server.url, recording), msc4388(server.url)
        created = await a.create("offer")
        receiving = await parked(server, lambda: a.receive(created, timeout_seconds=10))
        seen = await b.read(created.id)
        sent = await b.send(seen.session, "answer")
        payload = await receiving
        assert (payload.data, payload.session.sequence_token) == ("answer", sent.sequence_token)
        [(_, poll, headers)] = [r for r in recording.requests if r[0] == "GET"]
        assert poll == f"{a.session_url(created)}?sequence_token={created.sequence_token}"
        assert headers == {"Prefer": ["wait=10"]}


@in_reactor
async def test_a_send_repeated_with_its_txn_id_gets_the_same_answer_and_writes_once() -> None:
    """Two sends with one txnId: the second is answered the first's token, and writes nothing."""
    async with live_server() as server:
        client = msc4388(server.url)
        created = await client.create("offer")
        first = await client.send(created, "answer", txn_id="txn-1")
        again = await client.send(created, "something else", txn_id="txn-1")
        assert again.sequence_token == first.sequence_token
        now = await client.read(created.id)
        assert (now.data, now.session.sequence_token) == ("answer", first.sequence_token)
        # The same data again, in a new transaction, is a new write: a new token.
        same = await client.send(first, "answer")
        assert same.sequence_token != first.sequence_token
        # Transaction ids are the session's own: another session's txn-1 is new there.
        other = await client.create("other offer")
        await client.send(other, "other answer", txn_id="txn-1")
        assert (await client.read(other.id)).data == "other answer"


@in_reactor
async def test_a_conflict_is_recorded_and_replayed_for_its_txn_id() -> None:
    """
    A send refused as stale is refused again when repeated with its txnId,
    even with the token now current: a retry never writes what was refused.
    """
    async with live_server() as server:
        client = msc4388(server.url)
        created = await client.create("offer")
        current = await client.send(created, "answer")
        with pytest.raises(ConcurrentWriteError):
            await client.send(created, "late", txn_id="txn-late")
        with pytest.raises(ConcurrentWriteError):
            await client.send(current, "late", txn_id="txn-late")
        assert (await client.read(created.id)).data == "answer"


@in_reactor
async def test_a_send_whose_answer_was_lost_is_retried_with_the_same_txn_id() -> None:
    """
    When the answer to a PUT is lost, send() repeats it with the same txnId
    and gets the recorded answer: the write happened once (a second
    evaluation of the stale token would have been a 409).
    """
    async with live_server() as server:
        losing = LosesFirstAnswer()
        client = msc4388(server.url, losing)
        created = await client.create("offer")
        started = real_reactor().seconds()
        sent = await client.send(created, "answer")
        assert real_reactor().seconds() - started >= SEND_RETRY_PAUSE_SECONDS * 0.9
        first, second = losing.made("PUT")
        assert first == second
        txn_id = first.rsplit("/", 1)[1]
        assert len(txn_id) == 22  # 128 random bits, URL-safe base64
        now = await client.read(created.id)
        assert (now.data, now.session.sequence_token) == ("answer", sent.sequence_token)
        # A new send is a new transaction.
        await client.send(sent, "again")
        assert losing.made("PUT")[2].rsplit("/", 1)[1] != txn_id


@pytest.mark.parametrize("prefix", [UNSTABLE_PREFIX, STABLE_PREFIX])
@in_reactor
async def test_a_stale_sequence_token_is_a_concurrent_write_error(prefix: str) -> None:
    """A send on a token someone wrote after fails with ConcurrentWriteError: 409, its errcode."""
    async with live_server() as server:
        a, b = msc4388(server.url, prefix=prefix), msc4388(server.url, prefix=prefix)
        created = await a.create("offer")
        await b.send(created, "b was first")
        with pytest.raises(ConcurrentWriteError) as caught:
            await a.send(created, "a was second")
        assert (caught.value.status, caught.value.errcode) == (409, CONFLICT_ERRCODES[prefix])
        assert caught.value.error
        assert (await a.read(created.id)).data == "b was first"


@in_reactor
async def test_the_access_token_goes_to_discovery_and_create_only() -> None:
    """Authorization: Bearer is sent on discovery and create, never on a session's URL."""
    async with live_server() as server:
        recording = Recording()
        client = msc4388(server.url, recording, access_token="secret-token")
        await client.discover()
        created = await client.create("offer")
        read = await client.read(created.id)
        sent = await client.send(read.session, "answer")
        await client.receive(created, timeout_seconds=5)
        await client.delete(sent)
        authorized = [
            (method, url)
            for method, url, headers in recording.requests
            if "Authorization" in headers
        ]
        assert authorized == [("GET", client.endpoint), ("POST", client.endpoint)]
        assert all(
            headers["Authorization"] == ["Bearer secret-token"]
            for _, _, headers in recording.requests
            if "Authorization" in headers
        )
        assert len(recording.requests) == 6


@in_reactor
async def test_a_parked_receive_fails_when_the_session_is_deleted() -> None:
    """A receive() held on a session that is then deleted fails with GoneWhileWaitingError."""
    async with live_server() as server:
        client = msc4388(server.url)
        created = await client.create("offer")
        receiving = await parked(server, lambda: client.receive(created, timeout_seconds=10))
        await client.delete(created.id)
        with pytest.raises(GoneWhileWaitingError):
            await receiving


@in_reactor
async def test_an_unknown_session_is_not_found_everywhere() -> None:
    """read, receive, send and delete of an id the server never gave fail with NotFoundError."""
    async with live_server() as server:
        client = msc4388(server.url)
        unknown = Session("no-such-session-id", "1")
        for attempt in (
            lambda: client.read(unknown),
            lambda: client.receive(unknown, timeout_seconds=5),
            lambda: client.send(unknown, "x"),
            lambda: client.delete(unknown),
        ):
            with pytest.raises(NotFoundError) as caught:
                await attempt()
            assert (caught.value.status, caught.value.errcode) == (404, "M_NOT_FOUND")


@in_reactor
async def test_a_server_with_msc4388_off_is_unrecognized() -> None:
    """With the API switched off, discovery fails with UnrecognizedError, 404 M_UNRECOGNIZED."""
    async with live_server(msc4388="off") as server:
        with pytest.raises(UnrecognizedError) as caught:
            await msc4388(server.url).discover()
        assert (caught.value.status, caught.value.errcode) == (404, "M_UNRECOGNIZED")


# On a Clock, with requesters that lose answers.


class Unreachable:
    """Every request fails: no connection."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.urls.append(url)
        return fail(ConnectionRefusedError())


def test_send_gives_up_after_its_attempts_with_one_txn_id() -> None:
    """With no answer at all, send() tries send_attempts times, one pause apart, then fails."""
    clock = Clock()
    unreachable = Unreachable()
    client = MSC4388Client(clock, "https://example.org", unreachable, send_attempts=3)
    sending = client.send(Session("abc", "1"), "x")
    assert len(unreachable.urls) == 1
    clock.advance(SEND_RETRY_PAUSE_SECONDS)
    assert len(unreachable.urls) == 2
    assert not answered(sending)
    clock.advance(SEND_RETRY_PAUSE_SECONDS)
    with pytest.raises(ConnectionRefusedError):
        fired(sending)
    assert len(set(unreachable.urls)) == 1 and len(unreachable.urls) == 3
    assert unreachable.urls[0].startswith(f"https://example.org{UNSTABLE_PREFIX}/abc/")
    # Another send is another transaction.
    client.send(Session("abc", "1"), "x").addErrback(lambda _: None)
    assert unreachable.urls[3] != unreachable.urls[0]


class Gateway(Resource):
    """
    A proxy that loses the first answer (502), then passes the next: the
    canned answer of a server.
    """

    isLeaf = True
    paths: list[bytes]

    def __init__(self) -> None:
        Resource.__init__(self)
        self.paths = []

    def render_PUT(self, request: Any) -> bytes:
        self.paths.append(request.path)
        request.setHeader(b"Content-Type", b"application/json")
        if len(self.paths) == 1:
            request.setResponseCode(502)
            return b"<html>Bad Gateway</html>"
        return json.dumps({"sequence_token": "2"}).encode()


def test_send_retries_a_gateway_error_with_the_same_txn_id() -> None:
    """A 502 (the answer lost behind a proxy) is tried again with the same txnId."""
    clock = Clock()
    gateway = Gateway()
    stub: Any = StubTreq(gateway)  # type: ignore[no-untyped-call]
    client = MSC4388Client(clock, "http://rendezvous.test/", stub)
    sending = client.send(Session("abc", "1"), "x")
    stub.flush()
    clock.advance(SEND_RETRY_PAUSE_SECONDS)
    stub.flush()
    assert fired(sending) == Session("abc", "2")
    first, second = gateway.paths
    assert first == second


def test_an_answer_without_msc4388_fields_is_an_error() -> None:
    """A 200 whose JSON lacks a field the proposal requires fails with ServerError naming it."""

    class Odd(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            return json.dumps({"id": "abc", "expires_in_ms": 1000}).encode()

    stub: Any = StubTreq(Odd())  # type: ignore[no-untyped-call]
    d = MSC4388Client(Clock(), "http://rendezvous.test/", stub).create("x")
    stub.flush()
    with pytest.raises(ServerError, match="'sequence_token'"):
        fired(d)


def test_send_needs_a_sequence_token() -> None:
    """send() of a session whose token is not known yet is a ValueError: read it first."""
    client = MSC4388Client(Clock(), "http://rendezvous.test/", Unreachable())
    with pytest.raises(ValueError, match="read it first"):
        client.send(Session("abc", None), "x")


def test_receive_gives_up_at_its_bound() -> None:
    """
    Against a server that answers at once, receive() polls once a second
    with ?sequence_token=, and fails with ReceiveTimeout at its bound.
    """

    polls: list[bytes] = []

    class Unchanging(Resource):
        """A server that does not long-poll: the same data at once."""

        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            polls.append(request.uri)
            return json.dumps({"data": "x", "sequence_token": "1", "expires_in_ms": 9}).encode()

    clock = Clock()
    stub: Any = StubTreq(Unchanging())  # type: ignore[no-untyped-call]
    receiving = MSC4388Client(clock, "http://rendezvous.test/", stub).receive(
        Session("abc", "1"), timeout_seconds=3
    )
    for _ in range(4):
        stub.flush()
        clock.advance(1)
    with pytest.raises(ReceiveTimeout):
        fired(receiving)
    assert (
        polls
        == [b"/_matrix/client/unstable/io.element.msc4388/rendezvous/abc?sequence_token=1"] * 3
    )
