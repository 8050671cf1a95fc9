"""
Redis failing under real server processes: stopped while readers are
parked and requests keep arriving, frozen (SIGSTOP, as a hung Redis), and
absent when the server starts.  Every request gets an answer, 503 with a
JSON error or correct data, within a bound; the processes live on; and once
Redis is back they serve whole exchanges again without a restart.

Each test has a private redis-server (C{own_redis}).  Nothing sleeps: every
wait is on a socket, a pipe or a process, with a deadline.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from rendezvous_twisted.redis.connections import HEARTBEAT_TIMEOUTS

from .redis_server import RedisServer, SilentLink
from .test_end_to_end import Conn, Headers, Response, create, etag_of
from .test_multinode import (
    Node,
    exchange_across,
    hidden,
    hide,
    start_nodes,
    wait_parked,
    wait_until,
)

#: The nodes' --store-timeout-seconds: a Redis slower than this is a 503.
STORE_TIMEOUT_SECONDS = 0.3
#: Every answer while Redis is down comes within this (a disconnected store
#: fails at once; a hung one after the store timeout).
ANSWER_BOUND_SECONDS = 1.0
#: How long the nodes may take to reconnect once Redis is back.
RECOVERY_BOUND_SECONDS = 10.0
#: How often a process PINGs each connection to Redis: one that went
#: silent is found out and replaced within this and a store timeout.
HEARTBEAT_SECONDS = HEARTBEAT_TIMEOUTS * STORE_TIMEOUT_SECONDS


def assert_unavailable(response: Response) -> None:
    """
    The store's 503: JSON, M_UNKNOWN, and Retry-After: 1.
    """
    response.assert_error(503, "M_UNKNOWN")
    assert response.header("Retry-After") == b"1", response.head


def requests_of_every_kind(path: str, etag: bytes) -> list[tuple[str, str, Headers, bytes | None]]:
    """
    One request of each kind that needs the store.
    """
    return [
        ("POST", "/", (), b"new"),
        ("GET", path, (), None),
        ("GET", path, [("If-None-Match", etag)], None),
        ("PUT", path, [("If-Match", etag)], b"update"),
        ("DELETE", path, (), None),
    ]


def ask_all_at_once(
    node: Node, requests: list[tuple[str, str, Headers, bytes | None]]
) -> list[tuple[Response, float]]:
    """
    Send every request, each on its own connection, before reading any
    answer; each answer with the seconds it took from the last send.
    """
    with ExitStack() as stack:
        conns = [stack.enter_context(Conn(node.port)) for _ in requests]
        for conn, (method, target, headers, body) in zip(conns, requests, strict=True):
            conn.request(method, target, headers, body)
        sent = time.monotonic()
        answers = []
        for conn in conns:
            response = conn.read_response(timeout=ANSWER_BOUND_SECONDS + 5)
            answers.append((response, time.monotonic() - sent))
        return answers


@dataclass
class Load:
    """
    A thread that reads one rendezvous over and over, alternating between
    the nodes, one request at a time, recording every answer and how long
    it took, until told to stop.
    """

    nodes: list[Node]
    path: str
    answers: list[tuple[int, bytes, float]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with ExitStack() as stack:
                conns = [stack.enter_context(Conn(node.port)) for node in self.nodes]
                deadline = time.monotonic() + 30
                for turn in range(20_000):
                    if self.done.is_set() or time.monotonic() > deadline:
                        return
                    started = time.monotonic()
                    response = conns[turn % len(conns)].exchange("GET", self.path)
                    if response.status == 503:
                        assert_unavailable(response)
                    self.answers.append(
                        (response.status, response.body, time.monotonic() - started)
                    )
        except BaseException as e:  # re-raised by the test, in its thread
            self.errors.append(e)

    def count(self, status: int) -> int:
        return sum(1 for answer in self.answers if answer[0] == status)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]


def test_redis_stopping_under_parked_readers_and_arriving_requests(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """
    When Redis stops, the readers parked on two nodes are answered 503 at
    once, requests that keep arriving get the payload or a 503 within a
    bound, both processes live on, and once Redis is back on the same port
    they serve whole exchanges again.
    """
    timeout = f"--store-timeout-seconds={STORE_TIMEOUT_SECONDS}"
    with start_nodes([own_redis.url] * 2, tmp_path, timeout) as nodes, ExitStack() as stack:
        a, b = nodes
        offer = hidden(nodes, "offer")
        with Conn(a.port) as writer:
            rendezvous_id, created = create(a.server, writer, offer)
        hide(nodes, rendezvous_id)
        path, etag = "/" + rendezvous_id, etag_of(created)
        parked = []
        for node in nodes:
            conn = stack.enter_context(Conn(node.port))
            conn.request("GET", path, [("If-None-Match", etag), ("Prefer", "wait=10")])
            wait_parked(node, 1)
            parked.append(conn)

        with Load(nodes, path) as load:
            wait_until(lambda: load.count(200) >= 10, "reading", nodes)
            stopping = time.monotonic()
            own_redis.stop()
            for conn in parked:
                assert_unavailable(conn.read_response(timeout=ANSWER_BOUND_SECONDS + 5))
            parked_answered = time.monotonic() - stopping
            wait_until(lambda: load.count(503) >= 10, "refusing", nodes)
        assert {status for status, _, _ in load.answers} == {200, 503}
        assert all(body == offer for status, body, _ in load.answers if status == 200)
        slowest = max(seconds for _, _, seconds in load.answers)

        for node in nodes:
            for response, seconds in ask_all_at_once(node, requests_of_every_kind(path, etag)):
                assert_unavailable(response)
                assert seconds < ANSWER_BOUND_SECONDS
            assert node.health() == 503
            assert node.alive()

        own_redis.start()
        recovered = wait_until(
            lambda: all(node.health() == 200 for node in nodes),
            "healthy again",
            nodes,
            RECOVERY_BOUND_SECONDS,
        )
        exchange_across(a, b, nodes)
        exchange_across(b, a, nodes)
        # Redis came back empty (it keeps nothing on disk): the rendezvous
        # from before the outage is gone, on every node.
        for node in nodes:
            with Conn(node.port) as conn:
                conn.exchange("GET", path).assert_error(404, "M_NOT_FOUND")
    print(
        f"Redis stopped: parked readers answered in {parked_answered * 1000:.0f} ms; "
        f"{len(load.answers)} reads during the stop ({load.count(503)} refused), "
        f"slowest {slowest * 1000:.0f} ms; healthy {recovered * 1000:.0f} ms after the restart"
    )
    assert parked_answered < ANSWER_BOUND_SECONDS
    assert slowest < ANSWER_BOUND_SECONDS


def test_hung_redis_gives_503_within_the_store_timeout(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """
    While Redis is frozen (it accepts but never answers), every request gets
    a 503 after about --store-timeout-seconds, never hangs; once Redis is
    thawed the same process reads what Redis holds and serves a whole
    exchange.
    """
    timeout = f"--store-timeout-seconds={STORE_TIMEOUT_SECONDS}"
    with start_nodes([own_redis.url], tmp_path, timeout) as nodes:
        [node] = nodes
        with Conn(node.port) as writer:
            offer = hidden(nodes, "offer")
            rendezvous_id, created = create(node.server, writer, offer)
        hide(nodes, rendezvous_id)
        path, etag = "/" + rendezvous_id, etag_of(created)

        own_redis.pause()
        answers = ask_all_at_once(node, requests_of_every_kind(path, etag))
        for response, seconds in answers:
            assert_unavailable(response)
            assert seconds < STORE_TIMEOUT_SECONDS + 0.5, seconds
        assert node.alive()
        own_redis.resume()
        # The first command after the thaw gets its own reply, not a late
        # one meant for a request that was already refused.
        with Conn(node.port) as conn:
            read = conn.exchange("GET", path)
        assert (read.status, read.body, etag_of(read)) == (200, offer, etag)

        wait_until(lambda: node.health() == 200, "healthy again", nodes, RECOVERY_BOUND_SECONDS)
        exchange_across(node, node, nodes)
    slowest = max(seconds for _, seconds in answers)
    print(f"Redis frozen: {len(answers)} requests refused, slowest in {slowest * 1000:.0f} ms")


def test_server_started_while_redis_is_down(own_redis: RedisServer, tmp_path: Path) -> None:
    """
    A server started while Redis is down starts anyway, answers 503 (and
    /health 503), and serves once Redis comes up, without a restart.
    """
    own_redis.stop()
    timeout = f"--store-timeout-seconds={STORE_TIMEOUT_SECONDS}"
    with start_nodes([own_redis.url], tmp_path, timeout, healthy=False) as nodes:
        [node] = nodes
        for response, seconds in ask_all_at_once(
            node, requests_of_every_kind("/" + "A" * 22, b'"e"')
        ):
            assert_unavailable(response)
            assert seconds < ANSWER_BOUND_SECONDS
        assert node.health() == 503
        own_redis.start()
        wait_until(lambda: node.health() == 200, "healthy", nodes, RECOVERY_BOUND_SECONDS)
        exchange_across(node, node, nodes)


def test_connections_to_redis_that_go_silent_are_replaced(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """
    When a process' connections to Redis go silent while Redis itself is
    fine (a partition, a NAT that forgot the flows, a failover that moved
    the address), its requests get 503 within the store timeout, its parked
    reader a 503 by the next heartbeat PING, and then it connects anew and
    serves again, wakes included.
    """
    timeout = f"--store-timeout-seconds={STORE_TIMEOUT_SECONDS}"
    found_out = HEARTBEAT_SECONDS + STORE_TIMEOUT_SECONDS + ANSWER_BOUND_SECONDS
    with (
        SilentLink(own_redis) as link,
        start_nodes([link.url, own_redis.url], tmp_path, timeout) as nodes,
        Conn(nodes[0].port) as parked,
    ):
        linked, direct = nodes
        exchange_across(direct, linked, nodes)
        with Conn(direct.port) as writer:
            rendezvous_id, created = create(direct.server, writer, hidden(nodes, "offer"))
            hide(nodes, rendezvous_id)
            path, etag = "/" + rendezvous_id, etag_of(created)
            parked.request("GET", path, [("If-None-Match", etag), ("Prefer", "wait=30")])
            wait_parked(linked, 1)

            link.go_silent()
            silent = time.monotonic()
            [(refused, seconds)] = ask_all_at_once(linked, [("POST", "/", (), b"offer")])
            assert_unavailable(refused)
            assert seconds < STORE_TIMEOUT_SECONDS + 0.5
            # The change reaches Redis, but not the silent subscription.
            assert writer.exchange("PUT", path, [("If-Match", etag)], b"x").status == 202
        assert_unavailable(parked.read_response(timeout=found_out))
        answered = time.monotonic() - silent

        def serves() -> bool:
            if linked.health() != 200:  # both connections up
                return False
            [(answer, _)] = ask_all_at_once(linked, [("POST", "/", (), b"probe")])
            return answer.status == 200

        wait_until(serves, "serving again", nodes, found_out)
        recovered = time.monotonic() - silent
        exchange_across(direct, linked, nodes)
        exchange_across(linked, direct, nodes)
    print(
        f"silent connections: parked reader answered after {answered:.2f} s, "
        f"serving again after {recovered:.2f} s (heartbeat {HEARTBEAT_SECONDS} s)"
    )
