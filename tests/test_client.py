"""
The Python client (L{rendezvous_twisted.client.rendezvous}): against the real server
over loopback sockets on the real reactor, and, for its timing rules, against
the in-memory server on a Clock (the reactor and HTTP client it is given).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.web.http import stringToDatetime

from rendezvous_twisted.client.rendezvous import (
    FALLBACK_POLL_INTERVAL_SECONDS,
    GoneWhileWaitingError,
    NotFoundError,
    PreconditionFailedError,
    ReceiveTimeout,
    Rendezvous,
    RendezvousClient,
    ServerError,
)
from rendezvous_twisted.core.conditions import Condition
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.core.store import Wakeup

from .conftest import BASE, Harness, answered, fired, make_site

P = ParamSpec("P")


def in_reactor(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """
    Run an async test on the real reactor (pytest-twisted, which is untyped).
    """
    return cast(Callable[P, None], pytest_twisted.ensureDeferred(test))


def real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class SignallingStore(MemoryStore):
    """
    A MemoryStore that says when a reader asks to wait, so that a test can
    write only once the reader is parked, without sleeping.
    """

    def __init__(self, config: Config, clock: IReactorTime) -> None:
        super().__init__(config, clock)
        self._on_wait: list[Deferred[None]] = []

    def next_wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._on_wait.append(d)
        return d

    def wait_for_change(
        self, rendezvous_id: str, if_none_match: Condition, timeout_seconds: float
    ) -> Deferred[Wakeup]:
        d = super().wait_for_change(rendezvous_id, if_none_match, timeout_seconds)
        waiting, self._on_wait = self._on_wait, []
        for signal in waiting:
            signal.callback(None)
        return d


class LiveServer:
    def __init__(self, store: SignallingStore, port: IListeningPort) -> None:
        self.store = store
        self.port = port
        self.url = f"http://127.0.0.1:{port.getHost().port}/"  # type: ignore[attr-defined]


@asynccontextmanager
async def live_server(**config: Any) -> AsyncIterator[LiveServer]:
    """
    The real site on a loopback port of the real reactor, for one test.
    """
    reactor = real_reactor()
    settings = Config(**config)
    store = SignallingStore(settings, reactor)
    site = make_site(store, settings, reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        yield LiveServer(store, port)
    finally:
        store.shutdown()
        await port.stopListening()


def client() -> RendezvousClient:
    return RendezvousClient(real_reactor(), request_timeout_seconds=10)


_T = TypeVar("_T")


async def parked(server: LiveServer, receive: Callable[[], Deferred[_T]]) -> Deferred[_T]:
    """
    Start a receive (C{receive()}) and return it once the server holds it
    and it has not been answered.
    """
    waiting = server.store.next_wait()
    receiving = receive()
    await waiting
    assert server.store.parked_count == 1
    assert not answered(receiving)
    return receiving


# Over loopback, on the real reactor.


@in_reactor
async def test_create_reads_location_etag_expires_and_max_bytes() -> None:
    """create() returns the Location URL, the ETag, the expiry and the payload limit."""
    async with live_server(ttl_seconds=60, max_bytes=2000) as server:
        before = real_reactor().seconds()
        rendezvous = await client().create(server.url, b"hello", "text/plain")
        assert rendezvous.url.startswith(server.url)
        assert len(rendezvous.url) > len(server.url) + 16
        assert rendezvous.etag is not None and rendezvous.etag.startswith('"')
        assert rendezvous.expires is not None
        assert before + 58 <= rendezvous.expires <= before + 62
        assert rendezvous.max_bytes == 2000


@in_reactor
async def test_read_returns_the_payload_and_its_exact_content_type() -> None:
    """read() returns the bytes and the Content-Type exactly as the writer sent them."""
    async with live_server() as server:
        created = await client().create(server.url, b"\x00\xffbytes", "Application/X-Odd;a=b")
        message = await client().read(created.url)
        assert message.body == b"\x00\xffbytes"
        assert message.content_type == "Application/X-Odd;a=b"
        assert message.rendezvous.url == created.url
        assert message.rendezvous.etag == created.etag


@in_reactor
async def test_receive_long_polls_until_the_other_side_sends() -> None:
    """receive() is parked by the server and returns the payload the other side sends."""
    async with live_server() as server:
        a, b = client(), client()
        created = await a.create(server.url, b"offer", "text/plain")
        receiving = await parked(server, lambda: a.receive(created, timeout_seconds=10))
        seen = await b.read(created.url)
        sent = await b.send(seen.rendezvous, b"answer", "text/plain")
        message = await receiving
        assert message.body == b"answer"
        assert message.content_type == "text/plain"
        assert message.rendezvous.etag == sent.etag != created.etag


@in_reactor
async def test_send_is_conditional_by_default() -> None:
    """send() carries If-Match: a stale ETag fails with the server's 412 error."""
    async with live_server() as server:
        created = await client().create(server.url, b"one")
        await client().send(created, b"two")
        with pytest.raises(PreconditionFailedError) as caught:
            await client().send(created, b"three")
        error = caught.value
        assert error.status == 412
        assert error.errcode == "M_CONCURRENT_WRITE"
        assert error.error
        assert error.current_etag is not None and error.current_etag != created.etag
        assert (await client().read(created.url)).body == b"two"
        # Unconditional on request.
        await client().send(created, b"four", if_match=False)
        assert (await client().read(created.url)).body == b"four"


@in_reactor
async def test_cancel_then_everything_is_not_found() -> None:
    """cancel() deletes; afterwards read, send and cancel fail with NotFoundError M_NOT_FOUND."""
    async with live_server() as server:
        created = await client().create(server.url, b"x")
        await client().cancel(created)
        for attempt in (
            lambda: client().read(created.url),
            lambda: client().send(created, b"y"),
            lambda: client().cancel(created.url),
        ):
            with pytest.raises(NotFoundError) as caught:
                await attempt()
            assert caught.value.status == 404
            assert caught.value.errcode == "M_NOT_FOUND"


@in_reactor
async def test_a_parked_receive_fails_when_the_rendezvous_is_cancelled() -> None:
    """A receive() parked on a rendezvous that is then cancelled fails with NotFoundError."""
    async with live_server() as server:
        created = await client().create(server.url, b"x")
        receiving = await parked(server, lambda: client().receive(created, timeout_seconds=10))
        await client().cancel(created)
        with pytest.raises(NotFoundError):
            await receiving


def test_a_receive_outlived_by_its_rendezvous_says_nobody_wrote() -> None:
    """
    A receive() whose rendezvous expires before anyone writes (the README's
    lone example, TTL and bound both 60 s) fails with GoneWhileWaitingError,
    a NotFoundError saying the other device must write in time.
    """
    harness = Harness(ttl_seconds=60, poll_timeout_seconds=20)
    _, rendezvous = created_on(harness)
    harness.advance(1)  # showing the QR code
    receiving = RendezvousClient(harness.clock, harness.client).receive(rendezvous, 60)
    harness.flush()
    for _ in range(61):
        harness.advance(1)
    failure = cast(Any, receiving).result
    receiving.addErrback(lambda _: None)
    assert isinstance(failure.value, GoneWhileWaitingError), failure
    assert isinstance(failure.value, NotFoundError)
    message = str(failure.value)
    assert message.startswith("404 M_NOT_FOUND: ")
    assert "expired or was cancelled before the other device wrote to it" in message


@in_reactor
async def test_other_refusals_carry_status_errcode_and_retry_after() -> None:
    """A 413 and a 429 become ServerError with the status, errcode and Retry-After."""
    async with live_server(max_bytes=10, max_rendezvous=1, max_rendezvous_per_address=1) as server:
        with pytest.raises(ServerError) as caught:
            await client().create(server.url, b"x" * 11)
        assert (caught.value.status, caught.value.errcode) == (413, "M_TOO_LARGE")
        await client().create(server.url, b"x")
        with pytest.raises(ServerError) as caught:
            await client().create(server.url, b"x")
        assert (caught.value.status, caught.value.errcode) == (429, "M_LIMIT_EXCEEDED")
        assert caught.value.retry_after_seconds is not None
        assert caught.value.retry_after_seconds >= 1


# On a Clock, through the in-memory server: the reactor and HTTP client given.


def created_on(harness: Harness) -> tuple[str, Rendezvous]:
    rendezvous_id, answer = harness.create(b"x")
    etag = answer.header("etag")
    assert etag is not None
    return rendezvous_id, Rendezvous(f"{BASE}/{rendezvous_id}", etag.decode())


def test_receive_polls_again_after_a_304_and_gives_up_at_its_bound() -> None:
    """receive() polls again after the server's 304 and fails with ReceiveTimeout at its bound."""
    harness = Harness(poll_timeout_seconds=20)
    _, rendezvous = created_on(harness)
    receiver = RendezvousClient(harness.clock, harness.client)
    receiving = receiver.receive(rendezvous, timeout_seconds=30)
    harness.flush()
    assert harness.store.parked_count == 1
    harness.advance(20)  # the server's poll timeout: 304; polled again at once
    harness.flush()
    assert not answered(receiving)
    assert harness.store.parked_count == 1
    harness.advance(9.9)
    assert not answered(receiving)
    harness.advance(0.2)  # the client's own bound: the poll is dropped
    with pytest.raises(ReceiveTimeout):
        fired(receiving)
    harness.flush()
    assert harness.store.parked_count == 0


def test_receive_asks_the_server_not_to_wait_past_its_bound() -> None:
    """receive() sends Prefer: wait with what is left of its bound, so the server answers first."""
    harness = Harness(poll_timeout_seconds=20)
    _, rendezvous = created_on(harness)
    sent: list[dict[str, list[str]]] = []
    real = harness.client

    class Recording:
        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            sent.append(kwargs["headers"])
            d: Deferred[Any] = real.request(method, url, **kwargs)
            return d

    receiving = RendezvousClient(harness.clock, Recording()).receive(rendezvous, 5)
    harness.flush()
    assert sent == [{"If-None-Match": [rendezvous.etag], "Prefer": ["wait=5"]}]
    harness.advance(5)
    with pytest.raises(ReceiveTimeout):
        fired(receiving)
    harness.flush()
    assert harness.store.parked_count == 0


def test_receive_falls_back_to_polling_once_a_second_on_immediate_304s() -> None:
    """Against a server that answers 304 at once, receive() polls once a second, not in a loop."""
    harness = Harness()
    rendezvous_id, rendezvous = created_on(harness)
    requests: list[dict[str, Any]] = []
    real = harness.client

    class NoLongPoll:
        """The server behind a proxy that strips Prefer and answers every poll at once."""

        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            requests.append(kwargs["headers"])
            headers = dict(kwargs["headers"])
            if "If-None-Match" in headers:
                headers["Prefer"] = ["wait=0"]
            kwargs["headers"] = headers
            d: Deferred[Any] = real.request(method, url, **kwargs)
            return d

    receiving = RendezvousClient(harness.clock, NoLongPoll()).receive(rendezvous, 10)
    harness.flush()
    assert len(requests) == 1
    harness.advance(FALLBACK_POLL_INTERVAL_SECONDS * 0.9)
    assert len(requests) == 1
    harness.advance(FALLBACK_POLL_INTERVAL_SECONDS * 0.2)
    assert len(requests) == 2
    harness.call("PUT", f"/{rendezvous_id}", b"new")
    harness.advance(FALLBACK_POLL_INTERVAL_SECONDS)
    assert fired(receiving).body == b"new"


def test_create_without_location_is_an_error() -> None:
    """A create answer without Location fails: the client never guesses the URL."""

    class NoLocation:
        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            from treq.testing import StubTreq
            from twisted.web.resource import Resource

            class Created(Resource):
                isLeaf = True

                def render_POST(self, request: Any) -> bytes:
                    request.setResponseCode(201)
                    return json.dumps({"id": "x" * 22}).encode()

            stub: Any = StubTreq(Created())  # type: ignore[no-untyped-call]
            d: Deferred[Any] = stub.request(method, url, **kwargs)
            stub.flush()
            return d

    harness = Harness()
    d = RendezvousClient(harness.clock, NoLocation()).create("http://rendezvous.test/", b"x")
    with pytest.raises(ServerError, match="Location"):
        fired(d)


def test_an_error_page_that_is_not_json_still_gives_the_status() -> None:
    """A non-JSON error (a proxy's page) is a ServerError with the status and no errcode."""

    class BadGateway:
        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            from treq.testing import StubTreq
            from twisted.web.pages import errorPage

            stub: Any = StubTreq(errorPage(502, "Bad Gateway", "upstream"))  # type: ignore[no-untyped-call]
            d: Deferred[Any] = stub.request(method, url, **kwargs)
            stub.flush()
            return d

    harness = Harness()
    d = RendezvousClient(harness.clock, BadGateway()).cancel("http://rendezvous.test/abc")
    with pytest.raises(ServerError) as caught:
        fired(d)
    assert (caught.value.status, caught.value.errcode) == (502, None)


def test_expires_is_parsed_from_the_http_date() -> None:
    """The Rendezvous' expires is the Expires header as seconds since the epoch."""
    harness = Harness(ttl_seconds=45)
    d = RendezvousClient(harness.clock, harness.client).create("http://rendezvous.test/", b"x")
    harness.flush()
    rendezvous = fired(d)
    assert rendezvous.expires == stringToDatetime(b"Mon, 01 Jan 2024 00:00:45 GMT")
