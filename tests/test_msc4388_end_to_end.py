"""
Whole MSC4388 exchanges over real sockets, by a client written from the
proposal (tests/msc4388_client.py): against the server as users start it
(C{twistd -n rendezvous}) in memory, and against two such processes sharing
a real redis-server, each device on its own process; expiry on both stores.
Every form: discovery, create, read and long-poll, both PUT forms, replays,
conflicts, delete, expiry.  The create policies with a real homeserver
stand-in are tests/test_tokens_end_to_end.py's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore

from .conftest import make_site, on_reactor
from .msc4388_client import (
    STABLE_PREFIX,
    UNSTABLE_PREFIX,
    MatrixError,
    ProposalClient,
    new_txn_id,
)
from .redis_server import RedisServer
from .test_client import real_reactor
from .test_end_to_end import HOST, TwistdServer, running, start_plugin_server
from .test_multinode import Node, start_nodes

PREFIXES = [UNSTABLE_PREFIX, STABLE_PREFIX]
#: How long a reader must stay unanswered to count as held.
HELD_PROOF_SECONDS = 0.3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    cwd = tmp_path_factory.mktemp("msc4388")
    yield from running(start_plugin_server(cwd, "--poll-timeout=10"))


@pytest.fixture(scope="module")
def nodes(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Node]]:
    redis_server.flushall()
    with start_nodes([redis_server.url] * 2, tmp_path_factory.mktemp("nodes")) as started:
        yield started


def conflict_code(prefix: str) -> str:
    if prefix == STABLE_PREFIX:
        return "M_CONCURRENT_WRITE"
    return "IO_ELEMENT_MSC4388_CONCURRENT_WRITE"


def expect_error(status: int, errcode: str, call: Any, *args: Any) -> None:
    with pytest.raises(MatrixError) as raised:
        call(*args)
    assert (raised.value.status, raised.value.errcode) == (status, errcode)


def whole_exchange(a: ProposalClient, b: ProposalClient) -> None:
    """
    The proposal's flow between device A (generating the QR code) and
    device B (scanning it), with the failures a real network adds: a lost
    answer retried, a stale write, and the cancel.
    """
    prefix = a.prefix
    assert a.discover() is True
    # "Device G creates a rendezvous session ... with an empty payload."
    created = a.create("")
    assert 290_000 < created.expires_in_ms <= 300_000
    # B scans the QR code (id and base URL) and reads.
    seen = b.receive(created.id)
    assert (seen.data, seen.sequence_token) == ("", created.sequence_token)
    # A waits for B's message, naming the token it has; B sends it.
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(a.receive, created.id, created.sequence_token)
        done, _ = wait([waiting], timeout=HELD_PROOF_SECONDS)
        assert not done, "the read naming the current token was not held"
        txn = new_txn_id()
        t1 = b.send(created.id, seen.sequence_token, "LoginInitiateMessage", txn)
        woken = waiting.result(timeout=10)
    assert (woken.data, woken.sequence_token) == ("LoginInitiateMessage", t1)
    assert t1 != created.sequence_token
    # B never got its answer, and repeats the same PUT: the recorded answer,
    # and no second write (the token stays t1).
    assert b.send(created.id, seen.sequence_token, "LoginInitiateMessage", txn) == t1
    assert a.receive(created.id).sequence_token == t1
    # A answers in the earlier form, without a transaction id.
    t2 = a.send_without_txn(created.id, t1, "LoginOkMessage")
    # B, behind, sends on t1: a conflict, recorded for its txnId.
    stale_txn = new_txn_id()
    expect_error(409, conflict_code(prefix), b.send, created.id, t1, "too early", stale_txn)
    expect_error(409, conflict_code(prefix), b.send, created.id, t2, "too early", stale_txn)
    # B catches up, then sends with a new txnId.
    caught_up = b.receive(created.id, t1)
    assert (caught_up.data, caught_up.sequence_token) == ("LoginOkMessage", t2)
    t3 = b.send(created.id, t2, "secure channel message")
    assert a.receive(created.id, t2).data == "secure channel message"
    # Done: B cancels, and the session is gone for both.
    b.cancel(created.id)
    expect_error(404, "M_NOT_FOUND", a.receive, created.id)
    expect_error(404, "M_NOT_FOUND", a.send, created.id, t3, "late")
    expect_error(404, "M_NOT_FOUND", b.cancel, created.id)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_whole_exchange_in_memory(server: TwistdServer, prefix: str) -> None:
    a = ProposalClient(HOST, server.port, prefix)
    b = ProposalClient(HOST, server.port, prefix)
    whole_exchange(a, b)
    server.assert_no_trouble()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_whole_exchange_across_two_processes_on_redis(nodes: list[Node], prefix: str) -> None:
    """Each device talks to its own process; the two share one Redis."""
    a = ProposalClient(HOST, nodes[0].port, prefix)
    b = ProposalClient(HOST, nodes[1].port, prefix)
    whole_exchange(a, b)


def test_a_retried_send_racing_across_processes_is_evaluated_once(nodes: list[Node]) -> None:
    """The same txnId sent to both processes at once: one write, one token for both."""
    a = ProposalClient(HOST, nodes[0].port)
    b = ProposalClient(HOST, nodes[1].port)
    for _ in range(10):
        created = a.create("start")
        txn = new_txn_id()
        with ThreadPoolExecutor(2) as pool:
            sends = [
                pool.submit(client.send, created.id, created.sequence_token, "once", txn)
                for client in (a, b)
            ]
            tokens = {send.result(timeout=10) for send in sends}
        assert len(tokens) == 1
        assert a.receive(created.id).sequence_token in tokens
        a.cancel(created.id)


def session_key(redis_server: RedisServer, session_id: str) -> bytes:
    keys = redis_server.command("KEYS", f"*{session_id}")
    assert isinstance(keys, list) and len(keys) == 1, keys
    key = keys[0]
    assert isinstance(key, bytes)
    return key


def test_expiry_on_redis_ends_the_session_and_its_transactions(
    nodes: list[Node], redis_server: RedisServer
) -> None:
    """At the end of its life a session is 404 on every process, and its records go with it."""
    a = ProposalClient(HOST, nodes[0].port)
    b = ProposalClient(HOST, nodes[1].port)
    created = a.create("hello")
    txn = new_txn_id()
    b.send(created.id, created.sequence_token, "reply", txn)
    key = session_key(redis_server, created.id)
    remaining = redis_server.command("PTTL", key)
    assert isinstance(remaining, int) and remaining > 290_000
    # Its lifetime runs out: Redis keeps its own time, which no test can
    # advance, but an expiry time already past ends a key at once.
    assert redis_server.command("PEXPIREAT", key, 1) == 1
    assert redis_server.command("EXISTS", key) == 0
    for client in (a, b):
        expect_error(404, "M_NOT_FOUND", client.receive, created.id)
    expect_error(404, "M_NOT_FOUND", b.send, created.id, created.sequence_token, "reply", txn)
    assert redis_server.command("KEYS", f"*{created.id}*") == []


@asynccontextmanager
async def served_on_a_clock(**config: Any) -> AsyncIterator[tuple[int, Clock]]:
    """
    The real site on a loopback port of the real reactor, its store's time
    on a Clock.
    """
    reactor = real_reactor()
    clock = Clock()
    clock.advance(time.time())
    settings = Config(**config)
    site = make_site(MemoryStore(settings, clock), settings, clock)
    port = reactor.listenTCP(0, site, interface=HOST)
    try:
        yield port.getHost().port, clock
    finally:
        await port.stopListening()


@on_reactor
async def test_expiry_in_memory_over_real_sockets() -> None:
    """A session lives --msc4388-lifetime on the server's clock, then every call is 404."""
    async with served_on_a_clock(msc4388_lifetime_seconds=120) as (port, clock):
        a = ProposalClient(HOST, port, STABLE_PREFIX)
        created = await deferToThread(a.create, "hello")
        assert created.expires_in_ms == 120_000
        clock.advance(119)
        payload = await deferToThread(a.receive, created.id)
        assert payload.expires_in_ms == 1000
        clock.advance(1)
        for call, args in (
            (a.receive, (created.id,)),
            (a.send, (created.id, created.sequence_token, "late")),
            (a.cancel, (created.id,)),
        ):
            failure: Deferred[Any] = deferToThread(call, *args)
            with pytest.raises(MatrixError) as raised:
                await failure
            assert (raised.value.status, raised.value.errcode) == (404, "M_NOT_FOUND")


def test_switched_off_the_api_answers_404_unrecognized(tmp_path: Path) -> None:
    with contextmanager(running)(start_plugin_server(tmp_path, "--msc4388=off")) as off:
        client = ProposalClient(HOST, off.port)
        expect_error(404, "M_UNRECOGNIZED", client.discover)
        expect_error(404, "M_UNRECOGNIZED", client.create, "x")
