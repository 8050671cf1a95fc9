"""
Tests for L{rendezvous_twisted.core.budget}: the worst-case memory is the caps
times honest prices, and it is logged when the service starts.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent

from rendezvous_twisted.core import budget
from rendezvous_twisted.core.conditions import ANY
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.core.ratelimit import RateLimiter
from rendezvous_twisted.ops.service import StoreService
from rendezvous_twisted.redis.store import RedisStore
from rendezvous_twisted.redis.url import parse_store_url

from .conftest import BufferingTransport, fired, make_site


def test_budget_at_the_defaults() -> None:
    """At the defaults, the budget is every cap times its price, about 1.1 GiB in all."""
    config = Config()
    items = {item.name: item for item in budget.worst_case_memory(config).items}
    assert items["rendezvous"].count == 10000
    assert items["rendezvous"].bytes_each == 10240 + 255 + budget.RECORD_OVERHEAD_BYTES
    assert items["transactions"].count == 10000
    assert items["transactions"].bytes_each == budget.TRANSACTION_TABLE_BYTES + 32 * (
        255 + 26 + budget.TRANSACTION_OVERHEAD_BYTES
    )
    assert items["parked readers"].count == config.max_connections
    assert items["rate buckets"].count == 2 * config.max_rate_buckets
    assert items["connections"].count == config.max_connections
    assert items["refused connections waiting"].count == config.max_waiting_refusals
    total = budget.worst_case_memory(config).total_bytes
    assert total == sum(item.count * item.bytes_each for item in items.values())
    assert 1000 * 2**20 < total < 1200 * 2**20


def test_budget_grows_with_each_cap() -> None:
    """Raising any cap raises the budget: none is left out of it."""
    base = budget.worst_case_memory(Config()).total_bytes
    for change in [
        {"max_rendezvous": 20000},
        {"max_bytes": 20000},
        {"max_rate_buckets": 200000},
        {"max_connections": 8192},
        {"max_header_bytes": 32768},
        {"max_waiting_refusals": 128},
        {"max_transactions_per_rendezvous": 64},
    ]:
        assert budget.worst_case_memory(Config(**change)).total_bytes > base, change  # type: ignore[arg-type]


def test_budget_is_logged_at_start() -> None:
    """Starting the store service logs the worst-case memory in MiB."""
    config = Config()
    service = StoreService(MemoryStore(config, Clock()), config, Clock())
    with capturedLogs() as events:
        service.startService()
    lines = [formatEvent(e) for e in events]
    assert any(
        line.startswith("worst-case memory at these limits: ")
        and budget.worst_case_memory(config).describe() in line
        for line in lines
    ), lines


def measured(count: int, make: Callable[[int], object]) -> float:
    """
    Bytes allocated per item, under tracemalloc, making C{count} of them.
    """
    kept: list[object] = []
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            kept.append(make(i))
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / count


def client_address(i: int) -> IPv4Address:
    """
    The C{i}th of many clients' addresses, each its own.
    """
    return IPv4Address("TCP", f"10.0.{i // 250}.{i % 250}", 1234)


def connected(site: Any, transport: StringTransport, data: bytes) -> tuple[Any, StringTransport]:
    """
    A connection of C{site} over C{transport}, from its peer, which has sent C{data}.
    """
    channel = site.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return channel, transport


def test_prices_bound_what_is_measured() -> None:
    """
    A rendezvous record, a parked reader and a rate bucket each cost less than the budget's price
    for it.
    """
    count = 500
    clock = Clock()
    config = Config(max_rendezvous=count, max_rendezvous_per_address=1, max_parked=count)
    store = MemoryStore(config, clock)
    content_type = b"t" * config.max_content_type_bytes
    record = measured(count, lambda i: store.create(b"", content_type, f"2001:db8:{i:x}::/64"))
    assert record < budget.RECORD_OVERHEAD_BYTES + config.max_content_type_bytes
    ids = [fired(store.read(rid)).rendezvous_id for rid in list(store._records)]
    parked = measured(count, lambda i: store.wait_for_change(ids[i], ANY, 30))
    assert parked < budget.PARKED_READER_BYTES
    limiter = RateLimiter(10, 1.0, count, clock)
    bucket = measured(count, lambda i: limiter.take(f"2001:db8:{i:x}::/64"))
    assert bucket < budget.BUCKET_BYTES


@pytest.mark.parametrize("count", [1, 32])
def test_transaction_price_bounds_what_is_measured(count: int) -> None:
    """
    The transactions a rendezvous records, each with the longest id, cost
    less than the budget's price for them: one, or as many as the default cap.
    """
    rendezvous = 300
    clock = Clock()
    config = Config(
        max_rendezvous=rendezvous,
        max_rendezvous_per_address=rendezvous,
        max_transactions_per_rendezvous=count,
    )
    store = MemoryStore(config, clock)
    ids = [
        fired(store.create(b"x", b"text/plain", "owner")).rendezvous_id for _ in range(rendezvous)
    ]

    def transactions(i: int) -> None:
        for n in range(count):
            # A str of its own, as parsed from a request's path.
            transaction = "".join(f"{n:04d}".ljust(budget.TRANSACTION_ID_MAX_BYTES, "T"))
            assert fired(store.send(ids[i], b"y", b"text/plain", ANY, transaction)).etag

    per_rendezvous = measured(rendezvous, transactions)
    assert per_rendezvous < budget.transactions_bytes(
        config, budget.TRANSACTION_TABLE_BYTES, budget.TRANSACTION_OVERHEAD_BYTES
    )


def test_connection_price_bounds_a_parked_connection() -> None:
    """
    A connection holding a parked GET costs less than the budget's price for a connection's objects.
    """
    count = 150
    reactor = MemoryReactorClock()
    config = Config(max_parked_per_rendezvous=count, max_parked=count, request_burst=count * 2)
    store = MemoryStore(config, reactor)
    site = make_site(store, config, reactor)
    version = fired(store.create(b"x", b"text/plain", "owner"))
    request = (
        b"GET /%s HTTP/1.1\r\nHost: rendezvous.example.org\r\nIf-None-Match: %s\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
        b"Origin: https://app.element.io\r\nAccept: */*\r\n\r\n"
    ) % (version.rendezvous_id.encode("ascii"), version.etag)

    per_connection = measured(
        count, lambda i: connected(site, StringTransport(peerAddress=client_address(i)), request)
    )
    assert store.parked_count == count
    assert per_connection < budget.CONNECTION_OVERHEAD_BYTES


def test_connection_price_bounds_a_peer_that_pipelines_and_reads_nothing() -> None:
    """
    A connection whose peer sent a socket read's worth of pipelined GETs for a payload of max_bytes,
    and reads none of the answers, costs less than the budget's price for an HTTP/1.1 connection.
    """
    count = 20
    reactor = MemoryReactorClock()
    config = Config(request_burst=100000, max_connections_per_address=count)
    store = MemoryStore(config, reactor)
    site = make_site(store, config, reactor)
    version = fired(store.create(b"p" * config.max_bytes, b"text/plain", "owner"))
    request = b"GET /%s HTTP/1.1\r\nHost: rendezvous.example.org\r\n\r\n" % (
        version.rendezvous_id.encode("ascii")
    )
    pipelined = request * (budget.SOCKET_READ_BYTES // len(request))

    def connection(i: int) -> object:
        # A TCP transport's buffer: it pauses its producer past 64 KiB.
        transport = BufferingTransport(client_address(i), buffer_size=65536)
        opened = connected(site, transport, pipelined)
        assert transport.paused
        return opened

    per_connection = measured(count, connection)
    assert per_connection < budget.http11_connection_bytes(config)


def test_waiting_refusal_price_bounds_a_refused_connection() -> None:
    """
    A connection refused at the cap, waiting for the rest of its request's head, costs less than
    the budget's price for it, and keeps none of what it was sent.
    """
    count = 300
    reactor = MemoryReactorClock()
    config = Config(max_connections=1, max_connections_per_address=1, max_waiting_refusals=count)
    site = make_site(MemoryStore(config, reactor), config, reactor)
    admitted = IPv4Address("TCP", "10.9.9.9", 1)
    site.buildProtocol(admitted).makeConnection(StringTransport(peerAddress=admitted))
    head = b"GET / HTTP/1.1\r\nHost: rendezvous.example.org\r\nUser-Agent: " + b"y" * 2000

    per_connection = measured(
        count, lambda i: connected(site, StringTransport(peerAddress=client_address(i)), head)
    )
    assert site.admission.waiting_refusals == count
    assert per_connection < budget.WAITING_REFUSAL_BYTES


def test_too_few_file_descriptors_are_warned_about() -> None:
    """
    When the process may open fewer files than max_connections needs, the
    start is logged with a warning saying what to raise.
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 10**8:
        pytest.skip("no finite descriptor limit to exceed")
    config = Config(max_connections=soft, max_connections_per_address=1)
    service = StoreService(MemoryStore(config, Clock()), config, Clock())
    with capturedLogs() as events:
        service.startService()
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert "ulimit -n" in formatEvent(warnings[0])
    # The refused connections that wait for their request hold descriptors too.
    for waiting, warned in ((8, 0), (9, 1)):
        config = Config(
            max_connections=max(1, soft - 64 - 8),
            max_connections_per_address=1,
            max_waiting_refusals=waiting,
        )
        service = StoreService(MemoryStore(config, Clock()), config, Clock())
        with capturedLogs() as events:
            service.startService()
        assert len([e for e in events if e["log_level"] == LogLevel.warn]) == warned


def test_rendezvous_in_redis_leave_the_process_budget() -> None:
    """With --store redis the process' budget has no rendezvous, and Redis' has them all."""
    config = Config()
    in_process = {item.name for item in budget.worst_case_memory(config, in_redis=True).items}
    assert "rendezvous" not in in_process
    assert "parked readers" in in_process
    assert "transactions" not in in_process
    item, transactions = budget.redis_memory(config).items
    assert item.count == transactions.count == config.max_rendezvous
    assert item.bytes_each >= config.max_bytes + config.max_content_type_bytes
    assert transactions.bytes_each >= config.max_transactions_per_rendezvous * (255 + 26)


def test_transactions_are_budgeted_only_while_msc4388_may_record_them() -> None:
    """
    Each rendezvous may record as many transactions as the cap allows, each
    with the longest id and an ETag; with MSC4388 off, none.
    """
    config = Config(max_transactions_per_rendezvous=5)
    for items, name in (
        (budget.worst_case_memory(config).items, "transactions"),
        (budget.redis_memory(config).items, "transactions in Redis"),
    ):
        [item] = [item for item in items if item.name == name]
        assert item.count == config.max_rendezvous
        assert item.bytes_each > 5 * (budget.TRANSACTION_ID_MAX_BYTES + budget.ETAG_BYTES)
    off = Config(msc4388="off")
    assert (
        budget.worst_case_memory(off).total_bytes < budget.worst_case_memory(Config()).total_bytes
    )
    assert all("transactions" not in item.name for item in budget.worst_case_memory(off).items)
    assert all("transactions" not in item.name for item in budget.redis_memory(off).items)


def test_a_redis_stores_start_logs_both_budgets() -> None:
    """
    Starting the service of a Redis store logs the process' budget without
    the rendezvous, and the Redis one that holds them for every process.
    """
    config = Config(max_rendezvous=500)
    # Its connections are tried on a reactor that only records them.
    reactor = MemoryReactorClock()
    store = RedisStore(config, reactor, reactor, parse_store_url("unix:///nonexistent/redis.sock"))
    service = StoreService(store, config, reactor)
    with capturedLogs() as events:
        service.startService()
    lines = [formatEvent(e) for e in events]
    process = budget.worst_case_memory(config, in_redis=True).describe()
    shared = budget.redis_memory(config).describe()
    assert f"worst-case memory at these limits: {process}" in lines, lines
    assert f"worst-case memory in Redis, for all processes together: {shared}" in lines, lines
    assert [path for path, *_ in reactor.unixClients] == ["/nonexistent/redis.sock"] * 2


def test_http2_connections_are_priced_at_their_limits() -> None:
    """
    With HTTP/2, each connection is priced at its stream cap, header and
    body limits, and parked readers may be the connections times their streams.
    """
    config = Config(max_streams_per_connection=4, max_parked=10**6)
    items = {item.name: item for item in budget.worst_case_memory(config, http2=True).items}
    h2 = items["HTTP/2 connections"]
    assert h2.count == config.max_connections
    assert h2.bytes_each == budget.http2_connection_bytes(config)
    assert h2.bytes_each > 4 * (config.max_header_bytes + config.max_bytes)
    assert items["parked readers"].count == 4 * config.max_connections
    more = Config(max_streams_per_connection=8, max_parked=10**6)
    assert budget.http2_connection_bytes(more) > h2.bytes_each
    assert budget.worst_case_memory(config, http2=True).total_bytes > (
        budget.worst_case_memory(config).total_bytes
    )


def test_the_budget_window_is_the_connections() -> None:
    """The budget's body window per HTTP/2 connection is the one the connection advertises."""
    http2 = pytest.importorskip("rendezvous_twisted.http.http2")
    for max_bytes in (1, 10240, 65534, 65535, 10**6):
        config = Config(max_bytes=max_bytes)
        assert budget.h2_window(config) == http2.connection_window(max_bytes)


def h2_connections(
    count: int, streams: int, header_bytes: int = 0, body: int = 0
) -> tuple[float, int]:
    """
    Bytes per HTTP/2 connection (measured under tracemalloc) with C{streams}
    streams open on each: parked GETs with a browser's headers, or POSTs
    with C{body} bytes of a body still coming; C{header_bytes} of extra
    header fields (60 of them) on each.  Also the streams left open.
    """
    h2_connection = pytest.importorskip("h2.connection")
    import h2.config

    reactor = MemoryReactorClock()
    config = Config(
        max_parked_per_rendezvous=count * 8,
        max_parked=count * 8,
        request_burst=10**6,
        max_streams_per_connection=max(streams, 1),
        max_header_bytes=max(16384, header_bytes + 1024),
    )
    store = MemoryStore(config, reactor)
    site = make_site(store, config, reactor)
    version = fired(store.create(b"x", b"text/plain", "owner"))
    padding = [(f"x-h{k}", "v" * (header_bytes // 60 - 40)) for k in range(60)] * bool(header_bytes)
    browser = [
        ("if-none-match", version.etag.decode()),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
        ("origin", "https://app.element.io"),
        ("accept", "*/*"),
    ]

    def connection(i: int) -> tuple[Any, StringTransport]:
        peer = IPv4Address("TCP", f"10.0.{i // 250}.{i % 250}", 1234)
        protocol = site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        client = h2_connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        protocol.dataReceived(client.data_to_send())
        client.receive_data(transport.value())
        transport.clear()
        for _ in range(streams):
            stream = client.get_next_available_stream_id()
            fields = [
                (":method", "POST" if body else "GET"),
                (":path", "/" if body else "/" + version.rendezvous_id),
                (":scheme", "https"),
                (":authority", "rendezvous.example.org"),
                *([("content-length", str(body + 1))] if body else browser),
                *padding,
            ]
            client.send_headers(stream, fields, end_stream=not body)
            if body:
                client.send_data(stream, b"b" * body)
        protocol.dataReceived(client.data_to_send())
        reactor.advance(0)
        transport.clear()
        return protocol, transport

    kept: list[tuple[Any, StringTransport]] = []

    def make(i: int) -> object:
        kept.append(connection(i))
        return None

    # One connection first, unmeasured: what its first request imports
    # (encodings.idna and stringprep, for the Host check) is the process',
    # once, not a connection's.
    make(count)
    kept.clear()
    per_connection = measured(count, make)
    open_streams = sum(len(protocol.http2.streams) for protocol, _ in kept)
    return per_connection, open_streams


def test_http2_prices_bound_what_is_measured() -> None:
    """
    An HTTP/2 connection, each parked stream on it, and a stream's header
    list at the header limit cost less than the budget's prices for them.
    """
    empty, _ = h2_connections(30, 0)
    assert empty < budget.H2_CONNECTION_OVERHEAD_BYTES
    parked, open_streams = h2_connections(30, 4)
    assert open_streams == 30 * 4
    assert (parked - empty) / 4 < budget.H2_STREAM_OVERHEAD_BYTES
    header_bytes = 15000
    headers, open_streams = h2_connections(15, 4, header_bytes=header_bytes)
    assert open_streams == 15 * 4
    per_stream = (headers - empty) / 4
    assert per_stream < budget.H2_STREAM_OVERHEAD_BYTES + budget.H2_HEADER_FACTOR * header_bytes
    bodies, open_streams = h2_connections(15, 4, body=10000)
    assert open_streams == 15 * 4
    config = Config(max_streams_per_connection=4)
    assert bodies < budget.http2_connection_bytes(config)
