"""
The Redis store's own parts: --store URLs, and failing fast (503) when
Redis cannot answer.  Its behaviour against a real Redis is pinned, beside
the memory store's, in test_store.py, test_multinode.py and
test_redis_faults.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent

from rendezvous_twisted.core import budget
from rendezvous_twisted.core.conditions import ANY
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.store import NotFound, StoreUnavailable
from rendezvous_twisted.redis.store import RedisStore
from rendezvous_twisted.redis.url import StoreURL, parse_store_url
from tests.conftest import BASE, Answer, Harness, fired, on_reactor
from tests.redis_server import RedisServer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://localhost", StoreURL("tcp", host="localhost")),
        ("redis://10.0.0.5:6380/3", StoreURL("tcp", host="10.0.0.5", port=6380, db=3)),
        (
            "redis://app:s%40cret@[::1]:7000/1?prefix=rv:",
            StoreURL(
                "tcp", host="::1", port=7000, db=1, username="app", password="s@cret", prefix="rv:"
            ),
        ),
        ("redis://:pw@h/0", StoreURL("tcp", host="h", password="pw")),
        (
            "rediss://redis.example:6390/2?ca=/etc/ca.pem",
            StoreURL("tls", host="redis.example", port=6390, db=2, ca="/etc/ca.pem"),
        ),
        (
            "unix:///run/redis/redis.sock?db=4&password=pw",
            StoreURL("unix", path="/run/redis/redis.sock", db=4, password="pw"),
        ),
        (
            "unix:///s.sock?user=rendezvous&password=pw",
            StoreURL("unix", path="/s.sock", username="rendezvous", password="pw"),
        ),
    ],
)
def test_store_urls_parse(text: str, expected: StoreURL) -> None:
    """Every documented --store form parses to where and how to connect."""
    assert parse_store_url(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "memcached://h",
        "redis://",
        "redis://h:notaport",
        "redis://h/db",
        "redis://h/0?ca=/x.pem",
        "redis://h/0?colour=blue",
        "redis://h/0?user=u",
        "unix://relative/path",
        "unix://",
        "/run/redis.sock",
    ],
)
def test_bad_store_urls_are_refused(text: str) -> None:
    """A --store value that names no Redis is refused, naming --store, never guessed at."""
    with pytest.raises(ValueError, match="--store"):
        parse_store_url(text)


def test_url_in_logs_has_no_password() -> None:
    """The URL as logged leaves out the password."""
    assert "pw" not in str(parse_store_url("redis://user:pw@h:1/2"))
    assert "pw" not in str(parse_store_url("unix:///s?password=pw"))


def unreachable(config: Config, clock: Clock) -> RedisStore:
    """
    A Redis store that has no connection (never connected).
    """
    from twisted.internet import reactor

    return RedisStore(config, clock, reactor, parse_store_url("redis://127.0.0.1:1/0"))


def test_every_operation_fails_at_once_without_redis() -> None:
    """Without a connection to Redis every operation fails at once with StoreUnavailable."""
    store = unreachable(Config(), Clock())
    rendezvous_id = "A" * 22
    operations: list[Deferred[Any]] = [
        store.create(b"x", b"text/plain", "owner"),
        store.read(rendezvous_id),
        store.write(rendezvous_id, b"x", b"text/plain", ANY),
        store.delete(rendezvous_id),
        store.wait_for_change(rendezvous_id, ANY, 20),
    ]
    for d in operations:
        with pytest.raises(StoreUnavailable):
            fired(d)
    assert store.parked_count == 0


def test_web_answers_503_json_with_retry_after_when_redis_is_down() -> None:
    """Each route answers 503, JSON M_UNKNOWN and Retry-After: 1 while the store is unavailable."""
    harness = Harness(store=unreachable)
    path = "/" + "A" * 22
    for method, target, headers in [
        ("POST", "/", {}),
        ("GET", path, {}),
        ("GET", path, {"If-None-Match": '"x"'}),
        ("PUT", path, {}),
        ("DELETE", path, {}),
    ]:
        answer = harness.call(
            method, target, b"x" if method in ("POST", "PUT") else None, headers=headers
        )
        assert answer.code == 503, (method, answer)
        assert answer.header("Retry-After") == b"1"
        assert answer.header("Content-Type") == b"application/json"
        assert answer.json()["errcode"] == "M_UNKNOWN"
        assert answer.header("Access-Control-Allow-Origin") == b"*"


@on_reactor
async def test_connecting_to_nothing_fails_fast_and_keeps_trying() -> None:
    """A store aimed where nothing listens fails at once with StoreUnavailable."""
    from twisted.internet import reactor

    store = RedisStore(
        Config(store_timeout_seconds=0.2),
        Clock(),
        reactor,
        parse_store_url("redis://127.0.0.1:1/0"),
    )
    store.connect()
    try:
        started = reactor.seconds()
        with pytest.raises(StoreUnavailable):
            await store.create(b"x", b"text/plain", "owner")
        assert reactor.seconds() - started < 0.1
        assert not store.available
    finally:
        await store.close()


async def connected(url: str, clock: Clock | None = None, **config: Any) -> RedisStore:
    """
    A Redis store on the real reactor, both connections up.
    """
    from twisted.internet import reactor

    store = RedisStore(Config(**config), clock or Clock(), reactor, parse_store_url(url))
    store.connect()
    await store.ready().addTimeout(5, reactor)
    return store


@on_reactor
async def test_a_password_is_sent_and_a_wrong_one_keeps_the_store_unavailable(
    own_redis: RedisServer,
) -> None:
    """With requirepass set, the URL's password connects; a wrong one is logged and answers 503."""
    from twisted.internet import reactor

    own_redis.command("CONFIG", "SET", "requirepass", "s3cret")
    right = own_redis.url.replace("redis://", "redis://:s3cret@")
    store = await connected(right)
    try:
        version = await store.create(b"x", b"text/plain", "owner")
        assert (await store.read(version.rendezvous_id)).body == b"x"
    finally:
        await store.close()
    wrong = RedisStore(
        Config(),
        Clock(),
        reactor,
        parse_store_url(own_redis.url.replace("redis://", "redis://:no@")),
    )
    with capturedLogs() as events:
        wrong.connect()
        try:
            await wait_for(lambda: any("refused" in formatEvent(e) for e in events))
            assert not wrong.available
            with pytest.raises(StoreUnavailable):
                await wrong.create(b"x", b"text/plain", "owner")
        finally:
            await wrong.close()
    assert any("WRONGPASS" in formatEvent(e) for e in events)


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """
    Let the reactor run until C{condition()} holds; fail after C{seconds}.
    """
    from twisted.internet import reactor

    deadline = reactor.seconds() + seconds
    while not condition():
        assert reactor.seconds() < deadline, "condition not met in time"
        await deferLater(reactor, 0.01)


@on_reactor
async def test_a_redis_that_writes_to_disk_is_warned_about(own_redis: RedisServer) -> None:
    """Connecting to a Redis that snapshots or keeps an append-only file logs a warning."""
    own_redis.command("CONFIG", "SET", "save", "3600 1")
    with capturedLogs() as events:
        store = await connected(own_redis.url)
        try:
            await wait_for(lambda: any("to disk" in formatEvent(e) for e in events))
        finally:
            await store.close()
    [warning] = [e for e in events if "to disk" in formatEvent(e)]
    assert warning["log_level"] == LogLevel.warn
    assert "3600 1" in formatEvent(warning)


@on_reactor
async def test_a_redis_in_memory_only_is_not_warned_about(redis_url: str) -> None:
    """The test Redis (save "" and appendonly no) connects without a warning about disks."""
    with capturedLogs() as events:
        store = await connected(redis_url)
        try:
            # The check's two replies come before this create's.
            await store.create(b"x", b"text/plain", "owner")
        finally:
            await store.close()
    assert not [e for e in events if "disk" in formatEvent(e)]


@on_reactor
async def test_scripts_are_sent_again_after_redis_forgot_them(
    redis_url: str, redis_server: RedisServer
) -> None:
    """After SCRIPT FLUSH (as after a restart) create, write and delete work: scripts are resent."""
    store = await connected(redis_url)
    try:
        version = await store.create(b"one", b"text/plain", "owner")
        redis_server.command("SCRIPT", "FLUSH")
        written = await store.write(version.rendezvous_id, b"two", b"text/plain", ANY)
        redis_server.command("SCRIPT", "FLUSH")
        assert (await store.read(version.rendezvous_id)).etag == written.etag
        await store.delete(version.rendezvous_id)
        redis_server.command("SCRIPT", "FLUSH")
        await store.create(b"three", b"text/plain", "owner")
    finally:
        await store.close()


@on_reactor
async def test_redis_price_bounds_what_redis_measures(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Full-size rendezvous from distinct addresses take less Redis memory than budget.py says."""
    config = Config()
    store = await connected(redis_url)
    count = 300

    def used() -> int:
        info = redis_server.command("INFO", "memory").decode()
        return int(info.split("used_memory:")[1].split()[0])

    try:
        before = used()
        body, content_type = b"x" * config.max_bytes, b"t" * config.max_content_type_bytes
        for i in range(count):
            await store.create(body, content_type, f"2001:db8:{i:x}::/64")
        each = (used() - before) / count
    finally:
        await store.close()
    [item] = [item for item in budget.redis_memory(config).items if item.name.startswith("rend")]
    assert config.max_bytes < each <= item.bytes_each, each


@pytest.mark.parametrize("body", [5, 10240])
@pytest.mark.parametrize("count", [1, 32])
@on_reactor
async def test_redis_transaction_price_bounds_what_redis_measures(
    redis_url: str, redis_server: RedisServer, count: int, body: int
) -> None:
    """
    The transactions a rendezvous records in Redis, each with the longest
    id, take less of its key's memory than budget.py says: one or as many
    as the default cap, on a small record (which they turn from a listpack
    into a hash table) or a full-size one.
    """
    rendezvous = 100
    config = Config(
        max_rendezvous=rendezvous,
        max_rendezvous_per_address=rendezvous,
        max_transactions_per_rendezvous=count,
    )
    store = await connected(
        redis_url,
        max_rendezvous=rendezvous,
        max_rendezvous_per_address=rendezvous,
        max_transactions_per_rendezvous=count,
    )

    def usage(rendezvous_id: str) -> int:
        key = "rendezvous:r:" + rendezvous_id
        size: int = redis_server.command("MEMORY", "USAGE", key, "SAMPLES", "0")
        return size

    try:
        made = [await store.create(b"x" * body, b"text/plain", "owner") for _ in range(rendezvous)]
        before = sum(usage(version.rendezvous_id) for version in made)
        for version in made:
            for n in range(count):
                transaction = f"{n:04d}".ljust(budget.TRANSACTION_ID_MAX_BYTES, "T")
                sent = await store.send(
                    version.rendezvous_id, b"y" * body, b"text/plain", ANY, transaction
                )
                assert sent.etag is not None
        each = (sum(usage(version.rendezvous_id) for version in made) - before) / rendezvous
    finally:
        await store.close()
    price = budget.transactions_bytes(
        config, budget.REDIS_TRANSACTION_TABLE_BYTES, budget.REDIS_TRANSACTION_OVERHEAD_BYTES
    )
    assert count * (budget.TRANSACTION_ID_MAX_BYTES + budget.ETAG_BYTES) < each <= price, each


@on_reactor
async def test_an_untrusted_certificate_is_named_and_never_counts_as_connected() -> None:
    """rediss:// with an untrusted CA logs the certificate error; never "connected"."""
    with RedisServer(tls=True) as server:
        untrusted = server.tls_url.split("?")[0]  # the system's CAs only
        with capturedLogs() as events:
            store = await _started(untrusted)
            try:
                await wait_for(lambda: any("certificate" in formatEvent(e) for e in events))
                # Tried again, and what was dropped dropped cleanly.
                await wait_for(lambda: store._commands._failures >= 2)
                assert not store.available
            finally:
                await store.close()
    assert not [e for e in events if "connected to Redis" in formatEvent(e)]
    assert not [e for e in events if "log_failure" in e]
    assert len([e for e in events if "certificate" in formatEvent(e)]) <= 2  # one per connection


class _NotRedis(Protocol):
    """
    Something that is not Redis (an HTTP server) on the port --store names.
    """

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


@on_reactor
async def test_a_port_that_is_not_redis_is_complained_about_once_not_per_retry() -> None:
    """When --store names something else than Redis, its replies are named once, not per retry."""
    from twisted.internet import reactor

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(_NotRedis)
    )
    with capturedLogs() as events:
        store = await _started(f"redis://127.0.0.1:{port.getHost().port}/0")
        try:
            await wait_for(lambda: store._commands._failures >= 3)
            assert not store.available
        finally:
            await store.close()
            await port.stopListening()
    complaints = [e for e in events if "unparseable" in formatEvent(e)]
    assert len(complaints) == 2  # once for each of the two connections
    assert not [e for e in events if "log_failure" in e]


async def _started(url: str) -> RedisStore:
    """
    A Redis store on the real reactor, connecting (maybe never up).
    """
    from twisted.internet import reactor

    store = RedisStore(Config(), Clock(), reactor, parse_store_url(url))
    store.connect()
    return store


def test_failed_set_ups_back_off_although_tcp_connected() -> None:
    """Each set-up that fails in a row waits longer before the next try, up to about 2 s."""
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from rendezvous_twisted.redis.resp import RedisConnection

    clock = Clock()
    connection = RedisConnection(
        TCP4ClientEndpoint(clock, "127.0.0.1", 1), clock, 1.0, lambda p: succeed(None)
    )
    delays = []
    for failures in range(12):
        connection._failures = failures
        delays.append(connection._retry_delay(1))
    assert delays[0] < 0.2 < delays[5]
    assert all(d <= 2.1 for d in delays) and delays[-1] >= 2.0  # 2 s and a jitter


@on_reactor
async def test_a_redis_at_its_maxmemory_refuses_writes_but_serves_reads_and_deletes(
    own_redis: RedisServer,
) -> None:
    """At maxmemory creates, writes and sends are refused before they run; reads, deletes work."""

    def used() -> int:
        info = own_redis.command("INFO", "memory").decode()
        return int(info.split("used_memory:")[1].split()[0])

    store = await connected(own_redis.url)
    try:
        kept = await store.create(b"kept", b"text/plain", "owner")
        await store.send(kept.rendezvous_id, b"kept", b"text/plain", ANY, "before")
        limit = used() + 200_000
        own_redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        own_redis.command("CONFIG", "SET", "maxmemory", str(limit))
        body = b"x" * 10240
        refusal = None
        for i in range(100):  # 1.4 MB, were they all let in
            try:
                await store.create(body, b"text/plain", f"owner{i}")
            except StoreUnavailable as e:
                refusal = e
                break
        assert refusal is not None and "OOM" in str(refusal)
        # Refused before the script ran: past the limit by a record or two
        # of Redis' own accounting, not by every create that came.
        assert used() < limit + 50_000
        own_redis.command("CONFIG", "SET", "maxmemory", str(used() // 2))
        with pytest.raises(StoreUnavailable, match="OOM"):
            await store.write(kept.rendezvous_id, b"new", b"text/plain", ANY)
        # A send too, even a replay (Redis refuses a script that may write
        # before it runs it): it records nothing.
        for transaction in ("txn", "before"):
            with pytest.raises(StoreUnavailable, match="OOM"):
                await store.send(kept.rendezvous_id, b"new", b"text/plain", ANY, transaction)
        assert (await store.read(kept.rendezvous_id)).body == b"kept"
        key = "rendezvous:r:" + kept.rendezvous_id
        assert own_redis.command("HEXISTS", key, "t:txn") == 0
        await store.delete(kept.rendezvous_id)
        with pytest.raises(NotFound):
            await store.read(kept.rendezvous_id)
    finally:
        await store.close()


class _OldRedis(Protocol):
    """
    A "Redis 6.2" that answers the commands a store sends on connecting.
    """

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        for command in data.split(b"*")[1:]:
            if b"SUBSCRIBE" in command:
                self.transport.write(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n")
            elif b"PING" in command:
                self.transport.write(b"+PONG\r\n")
            elif b"INFO" in command:
                info = b"# Server\r\nredis_version:6.2.14\r\n"
                self.transport.write(b"$%d\r\n%s\r\n" % (len(info), info))
            elif b"CONFIG" in command:
                self.transport.write(b"*0\r\n")


@on_reactor
async def test_a_redis_older_than_7_is_named_in_an_error() -> None:
    """Connecting to a Redis older than 7.0 logs an error naming its version and what fails."""
    from twisted.internet import reactor

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(_OldRedis)
    )
    with capturedLogs() as events:
        store = await connected(f"redis://127.0.0.1:{port.getHost().port}/0")
        try:
            await wait_for(lambda: any("6.2.14" in formatEvent(e) for e in events))
        finally:
            await store.close()
            await port.stopListening()
    [error] = [e for e in events if "6.2.14" in formatEvent(e)]
    assert error["log_level"] == LogLevel.error
    assert "7.0 or newer" in formatEvent(error)


@on_reactor
async def test_a_shorter_ttl_never_shortens_the_caps_sets(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Processes with other --ttl values share the caps; a short TTL never cuts their expiry."""
    long, short = (
        await connected(redis_url, ttl_seconds=60),
        await connected(redis_url, ttl_seconds=5),
    )
    try:
        await long.create(b"x", b"text/plain", "owner")
        await short.create(b"x", b"text/plain", "owner")
        for key in ("rendezvous:live", "rendezvous:owner:owner"):
            assert redis_server.command("PTTL", key) > 50_000, key
    finally:
        await long.close()
        await short.close()


@on_reactor
async def test_an_acl_user_connects_over_the_unix_socket(own_redis: RedisServer) -> None:
    """unix:///path?user=U&password=P authenticates as that ACL user, whose keys are its own."""
    own_redis.command(
        "ACL", "SETUSER", "rendezvous", "on", ">pw", "resetkeys", "~rendezvous:*",
        "resetchannels", "&rendezvous:*", "+@all",
    )  # fmt: skip
    store = await connected(
        own_redis.unix_url.replace("?db=0", "?db=0&user=rendezvous&password=pw")
    )
    try:
        version = await store.create(b"x", b"text/plain", "owner")
        assert (await store.read(version.rendezvous_id)).body == b"x"
        clients = own_redis.command("CLIENT", "LIST").decode()
        # Both connections, and the harness' own as the default user.
        assert clients.count(" user=rendezvous ") == 2, clients
    finally:
        await store.close()


async def served(harness: Harness, answer: Deferred[Answer]) -> Answer:
    """
    The Answer of a request to a Harness on a Redis store: its server
    answers once Redis has, on the real reactor, so pump until then.
    """
    from twisted.internet import reactor

    done: list[Answer] = []

    def keep(result: Answer) -> Answer:
        done.append(result)
        return result

    answer.addCallback(keep)
    deadline = reactor.seconds() + 5
    while not done:
        assert reactor.seconds() < deadline, "no answer in time"
        await deferLater(reactor, 0.001)
        harness.flush()
    return done[0]


@on_reactor
async def test_only_a_parked_reader_that_a_write_woke_counts_as_a_wake(redis_url: str) -> None:
    """A reader answered at once with a payload it had not seen is no wake in the wake metric."""
    from twisted.internet import reactor

    harness = Harness(
        store=lambda config, clock: RedisStore(config, clock, reactor, parse_store_url(redis_url))
    )
    store = harness.store
    assert isinstance(store, RedisStore)
    store.connect()
    await store.ready().addTimeout(5, reactor)

    def wakes() -> float | None:
        count: float | None = harness.api.metrics.registry.get_sample_value(
            "rendezvous_wake_latency_seconds_count"
        )
        return count

    try:
        created = await served(harness, harness.send("POST", "/", b"one"))
        path = created.header("Location").decode().removeprefix(BASE)  # type: ignore[union-attr]
        old = created.header("ETag")
        assert old is not None
        written = await served(harness, harness.send("PUT", path, b"two"))
        harness.clock.advance(30)  # the payload is 30 s old when read
        stale = await served(harness, harness.send("GET", path, headers={"If-None-Match": old}))
        assert (stale.code, stale.body) == (200, b"two")
        assert wakes() == 0
        # A reader that did park, and a write that woke it, is one.
        current = written.header("ETag")
        assert current is not None
        parked = harness.send("GET", path, headers={"If-None-Match": current})
        await wait_for(lambda: store.parked_count == 1)
        await served(harness, harness.send("PUT", path, b"three"))
        assert (await served(harness, parked)).body == b"three"
        assert wakes() == 1
    finally:
        store.shutdown()
        await store.close()
