"""
Tests for L{rendezvous_twisted.http.tokens} and L{rendezvous_twisted.http.whoami}:
MSC4388's create policy judged by a homeserver, against a real HTTP server on
loopback standing in for the homeserver's whoami (on the real reactor), with
the verdicts' clock a Clock.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from rendezvous_twisted.core import budget
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.http.answers import error_body
from rendezvous_twisted.http.tokens import (
    MAX_TOKEN_BYTES,
    HomeserverPolicy,
    HomeserverUnavailableError,
    InvalidTokenError,
    OpenPolicy,
    bearer_token,
    create_policy,
)
from rendezvous_twisted.http.whoami import Invalid, failure_kind
from rendezvous_twisted.ops.tls import CertificateFiles, ReloadableContext

from .certificates import CA
from .conftest import answered, fired, on_reactor, reactor_fixture
from .test_budget import measured

#: How long a test waits on the real reactor for what should come sooner.
PATIENCE_SECONDS = 5.0


def real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def within(d: Deferred[Any], seconds: float = PATIENCE_SECONDS) -> Deferred[Any]:
    """
    C{d}, failing with TimeoutError if it has not fired within C{seconds}:
    a broken policy fails its test rather than hanging it.
    """
    return d.addTimeout(seconds, real_reactor())


def json_answer(request: Request, code: int, body: object) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode()


class Whoami(Resource):
    """
    A homeserver's C{/_matrix/client/v3/account/whoami}: its answer depends
    on the token's kind, the part before its first dot (C{held.1} and
    C{held.2} are two tokens of one kind).  It counts its calls.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.authorizations: list[bytes] = []
        self.held: list[Request] = []
        self.lost: list[Request] = []
        self._on_loss: list[Deferred[None]] = []
        self._arrivals: list[tuple[int, Deferred[None]]] = []

    @property
    def calls(self) -> int:
        return len(self.authorizations)

    def arrived(self, count: int) -> Deferred[None]:
        """
        Fires once C{count} calls in all have arrived.
        """
        d: Deferred[None] = Deferred()
        if self.calls >= count:
            d.callback(None)
        else:
            self._arrivals.append((count, d))
        return within(d)

    def _lose(self, request: Request) -> None:
        self.lost.append(request)
        waiting, self._on_loss = self._on_loss, []
        for d in waiting:
            d.callback(None)

    def connection_lost(self) -> Deferred[None]:
        """
        Fires once a call held unanswered has lost its connection.
        """
        d: Deferred[None] = Deferred()
        if self.lost:
            d.callback(None)
        else:
            self._on_loss.append(d)
        return within(d)

    def release(self) -> None:
        """
        Answer every held call: a valid user.
        """
        held, self.held = self.held, []
        for request in held:
            request.write(json_answer(request, 200, {"user_id": "@held:example.org"}))
            request.finish()

    def render_GET(self, request: Request) -> bytes | int:
        (authorization,) = request.requestHeaders.getRawHeaders(b"authorization", [b""])
        self.authorizations.append(authorization)
        kind = authorization.removeprefix(b"Bearer ").split(b".")[0].decode()
        answer = getattr(self, f"answer_{kind}")
        result: bytes | int = answer(request)
        # Once answered (or held): a waiting test goes on at once.
        for count, d in list(self._arrivals):
            if self.calls >= count:
                self._arrivals.remove((count, d))
                d.callback(None)
        return result

    def answer_alice(self, request: Request) -> bytes:
        return json_answer(request, 200, {"user_id": "@alice:example.org", "device_id": "D"})

    def answer_guest(self, request: Request) -> bytes:
        return json_answer(request, 200, {"user_id": "@g:example.org", "is_guest": True})

    def answer_forbidden(self, request: Request) -> bytes:
        return json_answer(request, 403, {"errcode": "M_FORBIDDEN", "error": "suspended"})

    def answer_expired(self, request: Request) -> bytes:
        body = {"errcode": "M_UNKNOWN_TOKEN", "error": "expired", "soft_logout": True}
        return json_answer(request, 401, body)

    def answer_missing(self, request: Request) -> bytes:
        return json_answer(request, 401, {"errcode": "M_MISSING_TOKEN", "error": "?"})

    def answer_odd401(self, request: Request) -> bytes:
        return json_answer(request, 401, {"errcode": "M_WEIRD", "soft_logout": "yes"})

    def answer_broken(self, request: Request) -> bytes:
        return json_answer(request, 500, {"errcode": "M_UNKNOWN", "error": "oops"})

    def answer_ratelimited(self, request: Request) -> bytes:
        return json_answer(request, 429, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down"})

    def answer_html(self, request: Request) -> bytes:
        return b"<html>not a homeserver</html>"

    def answer_nouser(self, request: Request) -> bytes:
        return json_answer(request, 200, {"device_id": "D"})

    def answer_huge(self, request: Request) -> bytes:
        # Valid, had it been read whole: only the bound refuses it.
        body = {"user_id": "@alice:example.org", "padding": "x" * 65536}
        return json_answer(request, 200, body)

    def answer_hugelength(self, request: Request) -> int:
        # Says it is huge, and never sends it: refused on its head.
        request.setHeader(b"Content-Length", b"10000000")
        request.write(b'{"user_id": ')
        return NOT_DONE_YET

    def answer_hugechunked(self, request: Request) -> int:
        request.setHeader(b"Content-Type", b"application/json")
        request.write(b'{"user_id": "@alice:example.org", "padding": "')
        for _ in range(16):
            request.write(b"x" * 4096)
        request.write(b'"}')
        request.finish()
        return NOT_DONE_YET

    def answer_gzip(self, request: Request) -> bytes:
        request.setHeader(b"Content-Encoding", b"gzip")
        return gzip.compress(json_answer(request, 200, {"user_id": "@alice:example.org"}))

    def answer_redirect(self, request: Request) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"Location", b"http://127.0.0.1:1/_matrix/client/v3/account/whoami")
        return b""

    def answer_held(self, request: Request) -> int:
        self.held.append(request)
        return NOT_DONE_YET

    def answer_slow(self, request: Request) -> int:
        request.notifyFinish().addErrback(lambda _: self._lose(request))
        return NOT_DONE_YET

    def answer_stalled(self, request: Request) -> int:
        # The head and a first part of the body, then nothing.
        request.notifyFinish().addErrback(lambda _: self._lose(request))
        request.setHeader(b"Content-Length", b"100")
        request.write(b'{"user_id": ')
        return NOT_DONE_YET


class Homeserver:
    """
    The stand-in homeserver listening on loopback, and the policies a test
    made against it (closed after it).
    """

    def __init__(self, whoami: Whoami, port: IListeningPort) -> None:
        self.whoami = whoami
        self.port = port
        self.url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        self.clock = Clock()
        self.policies: list[HomeserverPolicy] = []

    def policy(self, url: str | None = None, **kw: Any) -> HomeserverPolicy:
        kw.setdefault("timeout_seconds", PATIENCE_SECONDS / 2)
        kw.setdefault("cache_seconds", 30.0)
        policy = HomeserverPolicy(url or self.url, real_reactor(), clock=self.clock, **kw)
        self.policies.append(policy)
        return policy


class QuietSite(Site):
    """The stand-in homeserver's site, with no access log: a test's log is the policy's."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def site(whoami: Whoami) -> Site:
    root = Resource()
    node = root
    for segment in (b"_matrix", b"client", b"v3", b"account"):
        child = Resource()
        node.putChild(segment, child)
        node = child
    node.putChild(b"whoami", whoami)
    return QuietSite(root)  # type: ignore[no-untyped-call]


@reactor_fixture
async def homeserver() -> AsyncIterator[Homeserver]:
    whoami = Whoami()
    port = real_reactor().listenTCP(0, site(whoami), interface="127.0.0.1")
    server = Homeserver(whoami, port)
    yield server
    for policy in server.policies:
        await within(policy.close())
    whoami.release()
    await port.stopListening()


async def verdict(policy: HomeserverPolicy, token: str) -> bool | BaseException:
    """
    The policy's answer for C{Authorization: Bearer <token>}: a boolean, or
    the error it failed with.
    """
    try:
        result: bool = await within(policy.may_create([b"Bearer " + token.encode()]))
    except (InvalidTokenError, HomeserverUnavailableError) as e:
        return e
    return result


def summary(result: bool | BaseException) -> object:
    """
    What a client is told: the boolean, or the error's status, errcode and extra fields.
    """
    if isinstance(result, InvalidTokenError | HomeserverUnavailableError):
        return (type(result), result.code, result.errcode, result.extra)
    return result


# The header, judged without the homeserver.


def memory_policy(**kw: Any) -> tuple[HomeserverPolicy, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    return HomeserverPolicy("https://hs.example.org", reactor, 5.0, 30.0, **kw), reactor


def test_no_authorization_header_is_refused_without_asking() -> None:
    """Without an Authorization header a requester may not create, and nobody is asked."""
    policy, reactor = memory_policy()
    assert fired(policy.may_create(None)) is False
    assert fired(policy.may_create([])) is False
    assert reactor.tcpClients == []
    policy.may_create([b"Bearer abc"])
    assert len(reactor.tcpClients) == 1


@pytest.mark.parametrize(
    "values",
    [
        [b"Basic YWxhZGRpbjpvcGVuc2VzYW1l"],
        [b"Bearer"],
        [b"Bearer "],
        [b"Bearertoken"],
        [b"Bearer abc def"],
        [b"Bearer abc, Bearer def"],
        [b"Bearer abc", b"Bearer abc"],
        [b"Bearer abc", b"Basic x"],
        [b"Bearer a=b"],
        [b"Bearer ab\xc3\xa9"],
        [b'Bearer "abc"'],
        [b"Bearer " + b"a" * (MAX_TOKEN_BYTES + 1)],
    ],
)
def test_a_malformed_header_is_401_without_asking(values: Sequence[bytes]) -> None:
    """
    A header that is not one 'Bearer <b64token>' value is 401 M_MISSING_TOKEN, and the homeserver
    is not asked.
    """
    policy, reactor = memory_policy()
    with pytest.raises(InvalidTokenError) as raised:
        fired(policy.may_create(values))
    assert (raised.value.code, raised.value.errcode) == (401, "M_MISSING_TOKEN")
    assert reactor.tcpClients == []


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer abc", b"abc"),
        (b"BEARER abc", b"abc"),
        (b"Bearer   abc", b"abc"),
        (b" Bearer abc\t", b"abc"),
        (b"Bearer syt_YWxpY2U_AbCdEfGhIj_0aBcDe", b"syt_YWxpY2U_AbCdEfGhIj_0aBcDe"),
        (b"Bearer a-b.c~d+e/f==", b"a-b.c~d+e/f=="),
        (b"Bearer " + b"a" * MAX_TOKEN_BYTES, b"a" * MAX_TOKEN_BYTES),
    ],
)
def test_a_bearer_token_is_read(value: bytes, token: bytes) -> None:
    """The scheme is read in any case, and the token is RFC 6750's b64token, up to the bound."""
    assert bearer_token([value]) == token


# Each verdict, from a real homeserver.


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("alice", True), ("guest", False), ("forbidden", False)],
)
@on_reactor
async def test_the_homeserver_decides(homeserver: Homeserver, kind: str, expected: bool) -> None:
    """A user may create; a guest, or a requester the homeserver forbids (403), may not."""
    policy = homeserver.policy()
    assert await verdict(policy, f"{kind}.1") is expected
    assert homeserver.whoami.authorizations == [f"Bearer {kind}.1".encode()]


@pytest.mark.parametrize(
    ("kind", "errcode", "extra"),
    [
        ("expired", "M_UNKNOWN_TOKEN", {"soft_logout": True}),
        ("missing", "M_MISSING_TOKEN", None),
        ("odd401", "M_UNKNOWN_TOKEN", None),
    ],
)
@on_reactor
async def test_a_token_the_homeserver_refuses_is_401(
    homeserver: Homeserver, kind: str, errcode: str, extra: dict[str, bool] | None
) -> None:
    """
    A 401 of the homeserver is a 401 with its errcode (a known one) and its soft_logout (a
    boolean), never a requester treated as anonymous.
    """
    refused = await verdict(homeserver.policy(), f"{kind}.1")
    assert isinstance(refused, InvalidTokenError)
    assert (refused.code, refused.errcode, refused.extra) == (401, errcode, extra)
    body = json.loads(error_body(refused.errcode, str(refused), refused.extra))
    assert body["errcode"] == errcode
    assert body.get("soft_logout") == (extra or {}).get("soft_logout")


@pytest.mark.parametrize(
    ("kind", "logged"),
    [
        ("broken", "answered 500"),
        ("ratelimited", "rate limited by the homeserver (429)"),
        ("html", "answer not a JSON object"),
        ("nouser", "answer without a user_id"),
        ("huge", "answer over 4096 bytes"),
        ("hugechunked", "answer over 4096 bytes"),
        ("hugelength", "answer over 4096 bytes"),
        ("gzip", "answer not a JSON object"),
        ("redirect", "answered 302"),
    ],
)
@on_reactor
async def test_no_verdict_is_503(homeserver: Homeserver, kind: str, logged: str) -> None:
    """
    An answer that is no verdict (an error status, a redirect, a body that is not a whoami or
    too large, a compressed body, which is not inflated) is 503 with Retry-After, and logged.
    """
    with capturedLogs() as events:
        refused = await verdict(homeserver.policy(), f"{kind}.1")
    assert isinstance(refused, HomeserverUnavailableError)
    assert (refused.code, refused.headers) == (503, ((b"Retry-After", b"5"),))
    lines = [formatEvent(e) for e in events]
    assert any(logged in line and homeserver.url in line for line in lines), lines


# The cache.


@pytest.mark.parametrize("kind", ["alice", "guest", "expired"])
@on_reactor
async def test_a_verdict_is_remembered_until_it_expires(homeserver: Homeserver, kind: str) -> None:
    """
    A verdict (yes, no, invalid) is remembered for cache_seconds on the clock: the homeserver is
    asked once for two lookups, and again once it has expired.
    """
    policy = homeserver.policy(cache_seconds=30.0)
    first = await verdict(policy, f"{kind}.1")
    again = await verdict(policy, f"{kind}.1")
    assert summary(first) == summary(again)
    assert homeserver.whoami.calls == 1
    homeserver.clock.advance(29.9)
    await verdict(policy, f"{kind}.1")
    assert homeserver.whoami.calls == 1
    homeserver.clock.advance(0.1)
    await verdict(policy, f"{kind}.1")
    assert homeserver.whoami.calls == 2


@on_reactor
async def test_no_verdict_is_not_remembered(homeserver: Homeserver) -> None:
    """A homeserver that gave no verdict is asked again on the next lookup."""
    policy = homeserver.policy()
    for _ in range(2):
        assert isinstance(await verdict(policy, "broken.1"), HomeserverUnavailableError)
    assert homeserver.whoami.calls == 2
    assert policy.cached == 0


@on_reactor
async def test_the_cache_keeps_the_most_recently_used(homeserver: Homeserver) -> None:
    """Past max_cached verdicts the least recently used is forgotten, and only it."""
    policy = homeserver.policy(max_cached=2)
    await verdict(policy, "alice.a")
    await verdict(policy, "alice.b")
    await verdict(policy, "alice.a")  # used again: b is now the oldest
    await verdict(policy, "alice.c")
    assert (policy.cached, homeserver.whoami.calls) == (2, 3)
    await verdict(policy, "alice.a")
    assert homeserver.whoami.calls == 3
    await verdict(policy, "alice.b")
    assert homeserver.whoami.calls == 4


def test_the_cache_is_keyed_by_a_hash_of_the_token() -> None:
    """The cache holds the SHA-256 of each token, never the token."""
    policy, _ = memory_policy()
    policy._remember(hashlib.sha256(b"secret").digest(), True)
    assert fired(policy.may_create([b"Bearer secret"])) is True
    assert list(policy._verdicts) == [hashlib.sha256(b"secret").digest()]


# Sharing and bounding the questions.


@on_reactor
async def test_concurrent_lookups_of_a_token_share_one_question(homeserver: Homeserver) -> None:
    """Two lookups of one token while it is asked make one call, and both get its verdict."""
    policy = homeserver.policy()
    first = policy.may_create([b"Bearer held.1"])
    second = policy.may_create([b"Bearer held.1"])
    await homeserver.whoami.arrived(1)
    assert not answered(first) and not answered(second)
    homeserver.whoami.release()
    assert await within(first) is True
    assert await within(second) is True
    assert homeserver.whoami.calls == 1


@on_reactor
async def test_a_cancelled_lookup_leaves_the_question_to_the_others(
    homeserver: Homeserver,
) -> None:
    """Cancelling one requester's lookup fails only it: the others get the verdict, remembered."""
    policy = homeserver.policy()
    first = policy.may_create([b"Bearer held.1"])
    second = policy.may_create([b"Bearer held.1"])
    await homeserver.whoami.arrived(1)
    first.cancel()
    with pytest.raises(CancelledError):
        fired(first)
    (lookup,) = policy._lookups.values()
    assert lookup.waiters == [second]  # the cancelled one is not held
    homeserver.whoami.release()
    assert await within(second) is True
    assert await verdict(policy, "held.1") is True
    assert homeserver.whoami.calls == 1


@on_reactor
async def test_questions_in_flight_are_bounded(homeserver: Homeserver) -> None:
    """
    Past max_in_flight questions a token that needs one is 503 at once without a call; a token
    being asked or remembered is still answered.
    """
    policy = homeserver.policy(max_in_flight=2)
    await verdict(policy, "alice.1")
    held = [policy.may_create([b"Bearer held.1"]), policy.may_create([b"Bearer held.2"])]
    await homeserver.whoami.arrived(3)
    with capturedLogs() as events:
        third = policy.may_create([b"Bearer held.3"])
    with pytest.raises(HomeserverUnavailableError):
        fired(third)
    assert any("over 2 questions in flight" in formatEvent(e) for e in events)
    joined = policy.may_create([b"Bearer held.1"])
    assert fired(policy.may_create([b"Bearer alice.1"])) is True
    assert homeserver.whoami.calls == 3
    homeserver.whoami.release()
    assert [await within(d) for d in [*held, joined]] == [True, True, True]
    assert policy.lookups_in_flight == 0
    assert await verdict(policy, "alice.3") is True
    assert homeserver.whoami.calls == 4


# A homeserver out of reach.


@pytest.mark.parametrize("kind", ["slow", "stalled"])
@on_reactor
async def test_a_homeserver_that_does_not_answer_is_503_in_time(
    homeserver: Homeserver, kind: str
) -> None:
    """
    A homeserver that never answers, or stops in the middle of its answer, is 503 after
    timeout_seconds, and the connection to it is closed rather than left waiting.
    """
    policy = homeserver.policy(timeout_seconds=0.3)
    started = real_reactor().seconds()
    with capturedLogs() as events:
        refused = await verdict(policy, f"{kind}.1")
    assert isinstance(refused, HomeserverUnavailableError)
    assert 0.25 < real_reactor().seconds() - started < 2.0
    assert policy.lookups_in_flight == 0
    assert any("no answer within 0.3 s" in formatEvent(e) for e in events)
    await homeserver.whoami.connection_lost()
    assert len(homeserver.whoami.lost) == 1


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@on_reactor
async def test_a_refused_connection_is_503(homeserver: Homeserver) -> None:
    """A homeserver whose port refuses connections is 503, logged as such."""
    policy = homeserver.policy(url=f"http://127.0.0.1:{closed_port()}")
    with capturedLogs() as events:
        refused = await verdict(policy, "alice.1")
    assert isinstance(refused, HomeserverUnavailableError)
    assert any("connection refused" in formatEvent(e) for e in events), [
        formatEvent(e) for e in events
    ]
    assert policy.cached == 0


@on_reactor
async def test_an_untrusted_certificate_is_503(homeserver: Homeserver, tmp_path: Path) -> None:
    """An https homeserver whose certificate the system does not trust is 503: TLS failed."""
    CA.make("untrusted").write_leaf(tmp_path)
    context = ReloadableContext(
        CertificateFiles(tmp_path / "fullchain.pem", tmp_path / "key.pem"), alpn=(b"http/1.1",)
    )
    port = real_reactor().listenSSL(0, site(homeserver.whoami), context, interface="127.0.0.1")
    try:
        policy = homeserver.policy(url=f"https://localhost:{port.getHost().port}")
        with capturedLogs() as events:
            refused = await verdict(policy, "alice.1")
    finally:
        await port.stopListening()
    assert isinstance(refused, HomeserverUnavailableError)
    assert any("TLS failed" in formatEvent(e) for e in events), [formatEvent(e) for e in events]
    assert homeserver.whoami.calls == 0


def test_failures_are_told_apart_for_the_log() -> None:
    """The log names the kind of failure: refused, DNS, connect timeout, TLS, or its type."""

    def wrapped(e: BaseException) -> Failure:
        return Failure(ResponseNeverReceived([Failure(e)]))

    assert failure_kind(Failure(error.ConnectionRefusedError())) == "connection refused"
    assert failure_kind(Failure(error.DNSLookupError("hs.example"))) == "DNS lookup failed"
    assert failure_kind(Failure(error.TimeoutError())) == "connection timed out"
    assert failure_kind(wrapped(SSL.Error("certificate verify failed"))) == "TLS failed"
    assert failure_kind(wrapped(error.ConnectionLost())) == "no verdict (ResponseNeverReceived)"


# The log.


@on_reactor
async def test_failures_are_logged_once_a_minute_per_kind(homeserver: Homeserver) -> None:
    """A failing homeserver costs a line a minute per kind of failure, counting the rest."""
    policy = homeserver.policy()
    with capturedLogs() as events:
        for _ in range(3):
            await verdict(policy, "broken.1")
        await verdict(policy, "ratelimited.1")
        homeserver.clock.advance(60)
        await verdict(policy, "broken.1")
    lines = [formatEvent(e) for e in events]
    assert [line for line in lines if "answered 500" in line] == [
        f"the homeserver {homeserver.url} cannot judge access tokens (answered 500): answering 503",
        f"the homeserver {homeserver.url} cannot judge access tokens (answered 500): "
        "answering 503 (2 more since the last line)",
    ]
    assert len([line for line in lines if "(429)" in line]) == 1


@on_reactor
async def test_connections_to_the_homeserver_log_nothing(homeserver: Homeserver) -> None:
    """
    A question on a new connection logs nothing (Twisted's connection pool would log its
    factory starting and stopping); a failed one logs its one line.
    """
    refusing = homeserver.policy(url=f"http://127.0.0.1:{closed_port()}")
    with capturedLogs() as events:
        assert await verdict(homeserver.policy(), "alice.1") is True
        await verdict(refusing, "alice.2")
    lines = [formatEvent(e) for e in events]
    assert len(lines) == 1 and "connection refused" in lines[0], lines


@on_reactor
async def test_tokens_never_reach_the_log(homeserver: Homeserver) -> None:
    """No token appears in any logged event, whatever its verdict."""
    tokens = ["alice.S3cr3t1", "expired.S3cr3t2", "broken.S3cr3t3", "slow.S3cr3t4", "huge.S3cr3t5"]
    policy = homeserver.policy(timeout_seconds=0.3, max_in_flight=8)
    with capturedLogs() as events:
        for token in tokens:
            await verdict(policy, token)
        await verdict(homeserver.policy(url=f"http://127.0.0.1:{closed_port()}"), "alice.S3cr3t6")
        policy.may_create([b"Basic S3cr3t7"]).addErrback(lambda _: None)
    assert len(events) >= 4
    for event in events:
        text = formatEvent(event) + repr(event)
        assert "S3cr3t" not in text, text


# Lifecycle and construction.


@on_reactor
async def test_close_ends_the_questions_in_flight(homeserver: Homeserver) -> None:
    """Closing answers the questions in flight 503, and any later question; verdicts remain."""
    policy = homeserver.policy()
    assert await verdict(policy, "alice.1") is True
    held = policy.may_create([b"Bearer held.1"])
    await homeserver.whoami.arrived(2)
    await within(policy.close())
    with pytest.raises(HomeserverUnavailableError):
        await within(held)
    assert isinstance(await verdict(policy, "alice.2"), HomeserverUnavailableError)
    assert await verdict(policy, "alice.1") is True
    assert homeserver.whoami.calls == 2


def test_create_policy_follows_the_configuration() -> None:
    """--msc4388 authenticated asks the homeserver's whoami; open and off let anyone create."""
    reactor = MemoryReactorClock()
    for mode in ("open", "off"):
        policy = create_policy(Config(msc4388=mode), reactor)
        assert isinstance(policy, OpenPolicy)
        assert fired(policy.may_create([b"Bearer anything"])) is True
        assert fired(policy.close()) is None
    config = Config(
        msc4388="authenticated",
        homeserver="https://matrix.example.org/base/",
        homeserver_timeout_seconds=2.0,
        token_cache_seconds=10.0,
    )
    judged = create_policy(config, reactor)
    assert isinstance(judged, HomeserverPolicy)
    assert judged._whoami == b"https://matrix.example.org/base/_matrix/client/v3/account/whoami"
    assert (judged._timeout_seconds, judged._cache_seconds) == (2.0, 10.0)
    assert fired(judged.close()) is None


# Memory.


def test_a_remembered_verdict_costs_less_than_its_price() -> None:
    """
    One remembered verdict (key, expiry, an invalid verdict of its own, its place in the LRU)
    costs less than the budget's price for it.
    """
    count = 5000
    policy, _ = memory_policy(max_cached=count)
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(count)]
    per_verdict = measured(
        count, lambda i: policy._remember(keys[i], Invalid("M_UNKNOWN_TOKEN", bool(i % 2)))
    )
    assert policy.cached == count
    assert per_verdict < budget.TOKEN_VERDICT_BYTES
    print(f"per remembered verdict: {per_verdict:.0f} B")


@on_reactor
async def test_a_question_in_flight_costs_less_than_its_price(homeserver: Homeserver) -> None:
    """
    A question the homeserver holds unanswered (the policy's connection, request and Deferreds,
    and the stand-in homeserver's own side of it, counted too) costs less than the budget's price
    for its objects.
    """
    count = 16
    policy = homeserver.policy(max_in_flight=count)
    await verdict(policy, "alice.warm")  # the modules' lazy state, made once
    waiting: list[Deferred[bool]] = []
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        waiting += [policy.may_create([b"Bearer held.%d" % i]) for i in range(count)]
        await homeserver.whoami.arrived(count + 1)
        gc.collect()
        per_question = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    homeserver.whoami.release()
    await within(Deferred.fromCoroutine(_all(waiting)))
    objects = budget.HOMESERVER_LOOKUP_BYTES - budget.SOCKET_READ_BYTES - budget.MAX_WHOAMI_BYTES
    print(f"per question in flight: {per_question:.0f} B")
    assert per_question < objects


async def _all(ds: list[Deferred[bool]]) -> None:
    for d in ds:
        assert await d is True


def test_the_budget_counts_the_token_cache_when_tokens_are_judged() -> None:
    """With --msc4388 authenticated the budget counts the verdicts and questions; otherwise not."""
    judged = Config(msc4388="authenticated", homeserver="https://matrix.example.org")
    items = {item.name: item for item in budget.worst_case_memory(judged).items}
    assert items["access-token verdicts"].count == budget.MAX_TOKEN_VERDICTS
    assert items["homeserver lookups"].count == (
        budget.MAX_HOMESERVER_LOOKUPS + budget.MAX_HOMESERVER_IDLE_CONNECTIONS
    )
    assert budget.worst_case_memory(judged).total_bytes == (
        budget.worst_case_memory(Config()).total_bytes
        + sum(item.total_bytes for item in budget.token_memory(judged))
    )
    assert budget.token_memory(Config()) == ()
