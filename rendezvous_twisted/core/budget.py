"""
The worst-case memory of a server with a given L{Config}: what every cap
allows at once, priced per item.

The prices are upper bounds of what CPython 3.11 measured under
C{tracemalloc} (tests/test_budget.py measures them again and fails if one
is exceeded), rounded up for headroom.  Kernel socket buffers are not
counted: they are the kernel's, sized by its own settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from rendezvous_twisted.core.config import Config

#: One rendezvous without its payload and content type: record, version,
#: id, ETag, expiry timer and the per-address index (measured ~1.3 KiB).
RECORD_OVERHEAD_BYTES = 2048
#: One rendezvous in Redis without its payload and content type: the hash,
#: its entries in the live and per-address sorted sets, and a per-address
#: set of its own (measured ~3.0 KiB with redis-server 7.0 and jemalloc).
REDIS_RECORD_OVERHEAD_BYTES = 4096
#: The longest transaction id MSC4388 lets a client send (its txnId is
#: validated as [0-9A-Za-z._~-]{1,255} before it reaches a store).
TRANSACTION_ID_MAX_BYTES = 255
#: An ETag as the stores mint them: 24 hex digits in quotes.
ETAG_BYTES = 26
#: What one rendezvous' transactions cost in a MemoryStore besides each
#: id's and ETag's bytes: per transaction, the id's str header, the ETag's
#: bytes header (it outlives the write that made it) and its entry in the
#: record's dict of transactions; per rendezvous that records any, that
#: dict.  Measured under tracemalloc on 300 rendezvous with 255-character
#: ids (tests/test_budget.py): 628 to 677 B in all for one transaction
#: (~350 to 400 B besides its id and ETag, ~230 B of them the dict), 393 B
#: each for 32 and 398 B each for 100 (~115 B besides).
TRANSACTION_OVERHEAD_BYTES = 192
TRANSACTION_TABLE_BYTES = 512
#: The same in Redis: per transaction, a field t:<id> of the rendezvous'
#: hash; per rendezvous that records any, the count n beside them, the
#: hash table's growth, and a small record's conversion from a listpack to
#: a hash table (the id is longer than a listpack's entries may be).
#: Measured with MEMORY USAGE on 100 to 200 records before and after
#: adding transactions of 255-byte ids (redis-server 7.0, jemalloc;
#: tests/test_redis_store.py): one costs 384 B on a full-size record and
#: 712 to 720 B on a 5-byte one (the conversion); 32 cost 390 to 401 B
#: each, 100 cost 386 B each (~110 to 120 B besides the id and ETag).
REDIS_TRANSACTION_OVERHEAD_BYTES = 192
REDIS_TRANSACTION_TABLE_BYTES = 512
#: One parked reader in the store: waiter, Deferred, poll timer
#: (measured ~1.4 KiB).
PARKED_READER_BYTES = 2048
#: One token bucket and its key (measured ~210 bytes).
BUCKET_BYTES = 320
#: One connection's objects with a request in it: channel, transport,
#: request, headers, Klein's state (measured ~12 KiB with a parked GET).
CONNECTION_OVERHEAD_BYTES = 16384
#: What a connection can buffer besides its request: one socket read
#: (Twisted reads 64 KiB at a time) and the pipelined bytes Twisted keeps
#: while a request is handled before it stops reading (16 KiB).
CONNECTION_BUFFER_BYTES = 65536 + 16384
#: The answers a transport holds for a peer that does not read them before
#: it tells its connection to pause (Twisted's buffer, 64 KiB): from then
#: on the HTTP/1.1 channel answers no further pipelined request until the
#: transport has written what it holds.  The answer that filled it may pass
#: it by a whole answer, priced apart (its head and --max-bytes).
TRANSPORT_WRITE_BYTES = 65536
#: An answer's status line and headers (measured ~0.7 KiB).
ANSWER_HEAD_BYTES = 2048
#: One connection refused at a connection cap while it waits for its
#: request: protocol, channel, the deadline and the last bytes it looked
#: at, never the request itself (measured ~2.2 KiB).
WAITING_REFUSAL_BYTES = 4096
#: One socket read, which is all a waiting refusal holds of what it is sent.
SOCKET_READ_BYTES = 65536

# HTTP/2 (TLS with ALPN "h2"; rendezvous_twisted/http/http2.py bounds each term).
#: One HTTP/2 connection with no stream open: the switch, the HTTP/1.1
#: channel it started with, Twisted's connection, h2's state machine with
#: its HPACK tables and closed-stream memory (measured ~22 KiB).
H2_CONNECTION_OVERHEAD_BYTES = 32768
#: One open stream without its header block: Twisted's stream, the request,
#: Klein's state, a parked reader's waiter (measured ~12.6 KiB on 2026-12-07 with
#: Twisted 26.10.0, h2 4.4.1 and Klein 24.8.0, whose render holds some 2.4 KiB
#: of Deferreds per request; ~8.8 KiB before requests went through it).
H2_STREAM_OVERHEAD_BYTES = 16384
#: A header list held by a stream costs this many times its bytes as Python
#: objects (measured 1.5 at --max-header-bytes with 60 fields).
H2_HEADER_FACTOR = 2
#: One frame being assembled (SETTINGS_MAX_FRAME_SIZE stays HTTP/2's 16 KiB)
#: and the control frames Twisted buffers for a peer that does not read
#: before it gives up on it (17 KiB).
H2_BUFFER_BYTES = 16384 + 9 + 17 * 1024
#: HTTP/2's initial connection window; one body may ask for more.
H2_DEFAULT_WINDOW = 65535

# MSC4388's access tokens, judged by a homeserver with --msc4388
# authenticated (rendezvous_twisted/http/tokens.py enforces these bounds;
# they are defined here, where they are priced, as core imports nothing
# from http).
#: Verdicts on access tokens remembered at once; past it the least recently
#: used is dropped.
MAX_TOKEN_VERDICTS = 10000
#: One remembered verdict: its SHA-256 key, expiry and verdict, and its
#: place in the LRU (measured ~210 bytes).
TOKEN_VERDICT_BYTES = 320
#: Questions to the homeserver in flight at once; past it a token that
#: needs one is answered 503 at once.
MAX_HOMESERVER_LOOKUPS = 32
#: Idle connections to the homeserver kept for the next question.
MAX_HOMESERVER_IDLE_CONNECTIONS = 4
#: The largest answer of the homeserver read; past it, 503.
MAX_WHOAMI_BYTES = 4096
#: One question in flight, or one idle connection: the connection, request
#: and response objects (measured ~18 KiB, with the stand-in homeserver's
#: side of the connection in the same process), one socket read and the
#: answer being read.
HOMESERVER_LOOKUP_BYTES = 24576 + SOCKET_READ_BYTES + MAX_WHOAMI_BYTES


@dataclass(frozen=True, slots=True)
class Item:
    """
    One line of the budget: what, how many at most, bytes each at most.
    """

    name: str
    count: int
    bytes_each: int

    @property
    def total_bytes(self) -> int:
        return self.count * self.bytes_each


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """
    The worst case, item by item.
    """

    items: tuple[Item, ...]

    @property
    def total_bytes(self) -> int:
        return sum(item.total_bytes for item in self.items)

    def describe(self) -> str:
        """
        One line for the log: the total and each item, in MiB.
        """
        parts = ", ".join(
            f"{item.name} {item.count} x {item.bytes_each} B = {_mib(item.total_bytes)}"
            for item in self.items
        )
        return f"{_mib(self.total_bytes)} ({parts})"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def h2_window(config: Config) -> int:
    """
    The body bytes one HTTP/2 connection may hold at once: its receive
    window (L{rendezvous_twisted.http.http2.connection_window}).
    """
    return max(H2_DEFAULT_WINDOW, config.max_bytes + 1)


def http11_connection_bytes(config: Config) -> int:
    """
    One HTTP/1.1 connection with the largest request it may send, and a
    transport full of answers its peer has not read, the last of them the
    largest.
    """
    return (
        CONNECTION_OVERHEAD_BYTES
        + CONNECTION_BUFFER_BYTES
        + config.max_header_bytes
        + config.max_bytes
        + TRANSPORT_WRITE_BYTES
        + ANSWER_HEAD_BYTES
        + config.max_bytes
    )


def http2_connection_bytes(config: Config) -> int:
    """
    One HTTP/2 connection at its limits: every stream it may open holding a
    header list of --max-header-bytes and an answer of --max-bytes queued, a
    header block being assembled, its whole window of bodies in progress,
    and its buffers.
    """
    per_stream = (
        H2_STREAM_OVERHEAD_BYTES + H2_HEADER_FACTOR * config.max_header_bytes + config.max_bytes
    )
    return (
        H2_CONNECTION_OVERHEAD_BYTES
        + CONNECTION_BUFFER_BYTES
        + H2_BUFFER_BYTES
        + config.max_header_bytes
        + h2_window(config)
        + config.max_streams_per_connection * per_stream
    )


def token_memory(config: Config) -> tuple[Item, ...]:
    """
    What judging MSC4388's access tokens holds (only with --msc4388
    authenticated): the verdicts remembered, and the questions to the
    homeserver in flight with the connections kept for them.
    """
    if config.msc4388 != "authenticated":
        return ()
    return (
        Item("access-token verdicts", MAX_TOKEN_VERDICTS, TOKEN_VERDICT_BYTES),
        Item(
            "homeserver lookups",
            MAX_HOMESERVER_LOOKUPS + MAX_HOMESERVER_IDLE_CONNECTIONS,
            HOMESERVER_LOOKUP_BYTES,
        ),
    )


def worst_case_memory(config: Config, in_redis: bool = False, http2: bool = False) -> MemoryBudget:
    """
    The most memory the caps of C{config} let the server's own data use at
    once: every rendezvous full, every connection open with the largest
    request it may send, every parked reader, every rate bucket.  The
    process' fixed cost (the interpreter and its modules, some 40 MiB)
    comes on top.

    @param in_redis: the rendezvous live in Redis (see L{redis_memory}),
        not in this process.
    @param http2: connections may speak HTTP/2 (a TLS listener, with h2
        installed): each is priced at its HTTP/2 limits, and each may hold
        as many parked readers as it has streams.
    """
    streams = config.max_streams_per_connection if http2 else 1
    connection = max(
        http11_connection_bytes(config), http2_connection_bytes(config) if http2 else 0
    )
    # The rendezvous, and the transactions MSC4388's sends record in them.
    rendezvous = (
        ()
        if in_redis
        else (
            Item(
                "rendezvous",
                config.max_rendezvous,
                config.max_bytes + config.max_content_type_bytes + RECORD_OVERHEAD_BYTES,
            ),
            *_transactions(
                config, "transactions", TRANSACTION_TABLE_BYTES, TRANSACTION_OVERHEAD_BYTES
            ),
        )
    )
    return MemoryBudget(
        (
            *rendezvous,
            # Each parked reader holds a connection (HTTP/1.1 answers one
            # request at a time) or a stream of one, so the connection cap
            # bounds them too.
            Item(
                "parked readers",
                min(config.max_parked, config.max_connections * streams),
                PARKED_READER_BYTES,
            ),
            # Two limiters: one for creates, one for every request.
            Item("rate buckets", 2 * config.max_rate_buckets, BUCKET_BYTES),
            # Idle keep-alive connections are among these: an open
            # connection counts against max_connections, request or not.
            Item(
                "HTTP/2 connections" if http2 else "connections",
                config.max_connections,
                connection,
            ),
            # Beyond max_connections: those refused at a cap, waiting for
            # their request before they are answered.
            Item(
                "refused connections waiting",
                config.max_waiting_refusals,
                WAITING_REFUSAL_BYTES + SOCKET_READ_BYTES,
            ),
            *token_memory(config),
        )
    )


def transactions_bytes(config: Config, table: int, overhead: int) -> int:
    """
    The most one rendezvous' recorded transactions may hold: its table, and
    as many as it may record, each with the longest id and an ETag.
    """
    each = TRANSACTION_ID_MAX_BYTES + ETAG_BYTES + overhead
    return table + config.max_transactions_per_rendezvous * each


def _transactions(config: Config, name: str, table: int, overhead: int) -> tuple[Item, ...]:
    """
    The transactions that MSC4388's sends record, per rendezvous (any may
    be MSC4388's); none while MSC4388 is off.
    """
    if config.msc4388 == "off":
        return ()
    return (Item(name, config.max_rendezvous, transactions_bytes(config, table, overhead)),)


def redis_memory(config: Config) -> MemoryBudget:
    """
    The most memory the rendezvous of every process together may take in
    the Redis they share: the caps are counted in Redis, so this does not
    grow with the number of processes.  Redis' own fixed cost comes on top.
    """
    return MemoryBudget(
        (
            Item(
                "rendezvous in Redis",
                config.max_rendezvous,
                config.max_bytes + config.max_content_type_bytes + REDIS_RECORD_OVERHEAD_BYTES,
            ),
            *_transactions(
                config,
                "transactions in Redis",
                REDIS_TRANSACTION_TABLE_BYTES,
                REDIS_TRANSACTION_OVERHEAD_BYTES,
            ),
        )
    )
