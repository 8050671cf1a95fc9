"""
Shared test harness: the real Klein resource over an in-memory store, driven
through treq's StubTreq, with time on a task.Clock.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.core.metrics import Metrics
from rendezvous_twisted.core.store import RendezvousStore
from rendezvous_twisted.http.guard import Guard
from rendezvous_twisted.http.site import RendezvousSite
from rendezvous_twisted.http.tokens import CreatePolicy
from rendezvous_twisted.protocols import RendezvousAPI

# A real redis-server for the tests that need one: redis_server (shared),
# redis_url (emptied per test), own_redis (private, for the fault tests).
from .redis_server import own_redis, redis_server, redis_url

__all__ = ["own_redis", "redis_server", "redis_url"]

#: Where StubTreq requests go; Location follows this Host without --public-url.
BASE = "http://rendezvous.test"
#: The Clock starts here (2024-01-01T00:00:00Z), so HTTP-dates are realistic.
EPOCH = 1704067200.0


@pytest.fixture(autouse=True)
def _unfrozen_heap() -> Iterator[None]:
    """
    A server started in the test process freezes the heap (ops.service's
    FrozenHeap): give it back to the collector after each test.
    """
    yield
    gc.unfreeze()


P = ParamSpec("P")


def make_site(
    store: RendezvousStore,
    config: Config,
    reactor: Any,
    metrics: Metrics | None = None,
    access_log: bool = True,
) -> RendezvousSite:
    """
    The site of both protocols over C{store}, as makeService composes it,
    with time on C{reactor}.
    """
    api = RendezvousAPI(store, config, reactor, Guard(config, reactor, metrics or Metrics()))
    return RendezvousSite(
        api.resource(), api.guard, reactor, access_log, public_paths=api.public_paths
    )


def on_reactor(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, Any]:
    """
    Run an async test on the real reactor (pytest-twisted), typed.
    """
    wrapped: Callable[P, Any] = pytest_twisted.ensureDeferred(test)
    return wrapped


def reactor_fixture(
    fixture: Callable[P, AsyncIterator[Any]],
) -> Callable[P, Any]:
    """
    An async yield fixture on the real reactor (pytest-twisted), typed.
    """
    wrapped: Callable[P, Any] = pytest_twisted.async_yield_fixture(fixture)
    return wrapped


@dataclass
class Answer:
    """
    A whole response: status, headers (names lower-cased) and body.
    """

    code: int
    headers: dict[str, list[bytes]]
    body: bytes
    #: The framed length: Content-Length as Twisted's client parsed it (it
    #: keeps that header apart from the others), None for chunked framing.
    length: int | None = None

    def header(self, name: str) -> bytes | None:
        """
        The one value of a header, None if absent; fails if it repeats.
        """
        values = self.headers.get(name.lower())
        if values is None:
            return None
        assert len(values) == 1, f"{name} sent {len(values)} times: {values}"
        return values[0]

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def fired(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has already fired; fails the test if it
    has not, and re-raises a failure.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def answered(d: Deferred[Any]) -> bool:
    """
    Whether a Deferred has a result now.  (C{Deferred.called} is not that: a
    Deferred chained on another that is still waiting is "called".)
    """
    results: list[object] = []

    def peek(result: object) -> object:
        results.append(result)
        return result

    d.addBoth(peek)
    return bool(results)


class Harness:
    """
    One server: a store on a Clock, the real API resource, and a StubTreq
    client talking HTTP to it in memory.
    """

    def __init__(
        self,
        store: Callable[[Config, Clock], RendezvousStore] = MemoryStore,
        policy: CreatePolicy | None = None,
        **config: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.config = Config(**config)
        self.store = store(self.config, self.clock)
        self.api = RendezvousAPI(self.store, self.config, self.clock, policy=policy)
        # StubTreq copies treq's functions onto itself at run time: Any.
        self.client: Any = StubTreq(self.api.resource())  # type: ignore[no-untyped-call]
        # StubTreq serves through a plain Site; serve through ours, so that
        # our channel and request classes (body limits, JSON 400s) are in
        # the path too.
        agent = self.client._agent
        agent._serverFactory = site = self.site(agent._memoryReactor)
        site.doStart()  # type: ignore[no-untyped-call]  # as a listening port would

    def site(self, reactor: Any = None) -> RendezvousSite:
        """
        A site serving this harness' API (its guard, limits and metrics), its
        connections' time on C{reactor}.
        """
        api = self.api
        return RendezvousSite(api.resource(), api.guard, reactor, public_paths=api.public_paths)

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str | bytes | list[str | bytes]] | None = None,
    ) -> Deferred[Answer]:
        """
        Start a request; the Deferred fires with the whole Answer once the
        server has answered (after L{flush}).
        """
        raw: dict[bytes, list[bytes]] = {}
        for name, value in (headers or {}).items():
            values = value if isinstance(value, list) else [value]
            raw[name.encode("ascii")] = [
                v.encode("latin-1") if isinstance(v, str) else v for v in values
            ]
        d: Deferred[IResponse] = self.client.request(method, BASE + path, data=body, headers=raw)

        def collect(response: IResponse) -> Deferred[Answer]:
            headers = {
                name.decode("ascii").lower(): list(values)
                for name, values in response.headers.getAllRawHeaders()
            }
            length = None if response.length is UNKNOWN_LENGTH else response.length
            content: Deferred[bytes] = self.client.content(response)
            return content.addCallback(
                lambda content: Answer(response.code, headers, content, length)
            )

        answer: Deferred[Answer] = d.addCallback(collect)
        self.flush()
        return answer

    def flush(self) -> None:
        self.client.flush()

    def call(self, method: str, path: str, body: bytes | None = None, **kw: Any) -> Answer:
        """
        A request that the server answers at once (not parked).
        """
        d = self.send(method, path, body, **kw)
        self.flush()
        answer: Answer = fired(d)
        return answer

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def create(self, body: bytes = b"hello", **kw: Any) -> tuple[str, Answer]:
        answer = self.call("POST", "/", body, **kw)
        assert answer.code == 200, answer
        rendezvous_id: str = answer.json()["id"]
        return rendezvous_id, answer


@pytest.fixture
def harness() -> Harness:
    return Harness()


class PeerTransport(StringTransport):
    """
    A StringTransport from C{peer}, typed.
    """

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)  # type: ignore[no-untyped-call]

    def value(self) -> bytes:
        data: bytes = self.io.getvalue()
        return data


class BufferingTransport(PeerTransport):
    """
    A transport that, as a TCP one, tells its producer to pause once
    more than C{buffer_size} bytes wait to be written, and to resume once
    the peer has read them all (L{read}).
    """

    def __init__(self, peer: IPv4Address, buffer_size: int = 4096) -> None:
        super().__init__(peer)
        self.buffer_size = buffer_size
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)  # type: ignore[no-untyped-call]
        if len(self.value()) > self.buffer_size and not self.paused and self.producer:
            self.paused = True
            self.producer.pauseProducing()

    def read(self) -> bytes:
        data = self.value()
        self.io.seek(0)
        self.io.truncate()
        if self.paused and self.producer:
            self.paused = False
            self.producer.resumeProducing()
        return data
