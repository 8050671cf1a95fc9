"""
The HTTP/2 attacks of issue 12 against a real C{twistd rendezvous} on a TLS
listener (ALPN "h2"), with the h2 library (and raw frames) as the attacker
from 127.0.0.1 over loopback, through the same code as C{python -m
bench.h2flood}: each keeps the server's resident memory (read from /proc)
within a bound, logs no failure, and leaves an honest client from 127.0.0.2
served meanwhile.  Counts are small, so that the module takes seconds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("h2.connection", reason="the http2 extra is not installed")

from bench import h2flood
from bench.servers import Probe
from rendezvous_twisted import tap
from rendezvous_twisted.core import budget

from .certificates import CA
from .test_end_to_end import CLEAN_EXIT, TwistdServer
from .test_http2 import start_h2_server

HONEST = "127.0.0.2"
MIB = 2**20
#: What one HTTP/2 flood may add to the server's resident memory.
FLOOD_BOUND_BYTES = 8 * MIB
#: What a connection holding streams open may cost until they are cut.
HELD_BOUND_BYTES = 200 * 1024
#: The body deadline of the held-streams server: short, so that the test
#: outlasts it.
BODY_TIMEOUT_SECONDS = 4.0

#: Limits that let one address flood (the per-address caps are not what is
#: tested here).
FLOOD_LIMITS = (
    "--request-burst=1000000",
    "--request-per-second=1000000",
    "--create-burst=1000",
    "--max-connections-per-address=1000",
)


def rss(process: TwistdServer) -> int:
    """
    The server's resident memory now, in bytes, from /proc.
    """
    return Probe(process.proc.pid).rss_bytes()


def start(tmp_path: Path, *options: str) -> tuple[TwistdServer, CA]:
    process, ca = start_h2_server(tmp_path, *FLOOD_LIMITS, "--max-bytes=10240", *options)
    # A first exchange warms the server up (imports, caches) before any
    # memory is read.
    assert h2flood.exchange(process.port), process.text()
    process.pump(0)
    return process, ca


@pytest.fixture
def stopped() -> Iterator[list[TwistdServer]]:
    """
    Servers a test starts; each must stop cleanly and have logged no failure.
    """
    started: list[TwistdServer] = []
    yield started
    for process in started:
        code = process.stop()
        assert code in CLEAN_EXIT, process.text()
        process.assert_no_trouble()


def test_held_streams_are_bounded_then_cut_at_the_body_deadline(
    tmp_path: Path, stopped: list[TwistdServer]
) -> None:
    """
    Connections asking for 100 streams each holding an unfinished 10 000-byte
    body get the stream cap, cost under 200 KiB each while held, and every
    stream is answered 408 at the body deadline; an honest client is served.
    """
    process, _ = start(tmp_path, f"--body-timeout={BODY_TIMEOUT_SECONDS}")
    stopped.append(process)
    before = rss(process)
    connections = 20
    held = h2flood.hold(process.port, connections, 100, 10000)
    opened = time.monotonic()
    held.ping()
    held.keep_sending()
    assert h2flood.settle(held.peers, process.proc.pid, BODY_TIMEOUT_SECONDS / 2)
    cost = (rss(process) - before) / connections
    assert sum(len(streams) for streams in held.streams.values()) == connections * 4
    assert cost < HELD_BOUND_BYTES, f"{cost:.0f} bytes per connection"
    assert h2flood.exchange(process.port, HONEST)
    assert time.monotonic() - opened < BODY_TIMEOUT_SECONDS, "too slow to show the streams held"
    h2flood.pump(held.peers, lambda: held.answered() == {"status 408": connections * 4}, 10)
    assert held.answered() == {"status 408": connections * 4}
    assert time.monotonic() - opened > BODY_TIMEOUT_SECONDS * 0.9
    for peer in held.peers:
        assert not peer.closed, "the connection itself goes on"
        peer.close()
    process.pump(0)


def test_a_continuation_flood_is_cut_and_costs_no_memory(
    tmp_path: Path, stopped: list[TwistdServer]
) -> None:
    """
    A header block of CONTINUATION frames that never ends is cut as it passes
    --max-header-bytes, and what the attacker sends on, unread, adds under
    8 MiB; an honest client is served.
    """
    process, _ = start(tmp_path)
    stopped.append(process)
    before = rss(process)
    flood = h2flood.continuation_flood(process.port, 16)
    try:
        assert flood["server_closed"]
        assert flood["sent_bytes"] < 8 * MIB, "the server went on reading"
        assert rss(process) - before < FLOOD_BOUND_BYTES
        assert h2flood.exchange(process.port, HONEST)
    finally:
        flood["peer"].close()
    process.wait_for(re.compile(rb"closing an HTTP/2 connection from 127.0.0.1: a header"), 5)


def test_rapid_reset_logs_no_failure(tmp_path: Path, stopped: list[TwistdServer]) -> None:
    """
    HEADERS then RST_STREAM, thousands of times, on reads, parked reads and
    unknown ids, adds under 8 MiB and logs no traceback or error (checked as
    the server stops); an honest client is served.
    """
    process, _ = start(tmp_path)
    stopped.append(process)
    before = rss(process)
    report = h2flood.rapid_reset(process.port, 3000)
    try:
        assert report["resets_sent"] == 3000
        assert rss(process) - before < FLOOD_BOUND_BYTES
        assert h2flood.exchange(process.port, HONEST)
    finally:
        report["peer"].close()


def test_rss_of_connections_at_their_limits_is_within_the_budget(
    tmp_path: Path, stopped: list[TwistdServer]
) -> None:
    """
    Connections each holding every stream it may open, with a header block
    near --max-header-bytes and a body one byte short of --max-bytes still
    coming, add less resident memory per connection than the budget's price.
    """
    options = ("--max-streams-per-connection=4",)
    process, _ = start(tmp_path, *options)
    stopped.append(process)
    config = tap.Options()
    config.parseOptions(["--listen=tcp:0", *options])
    limits = config["config"]
    before = rss(process)
    connections = 40
    held = h2flood.hold(
        process.port,
        connections,
        1000,
        limits.max_bytes - 1,
        limits.max_header_bytes - 400,
        declare_length=True,
    )
    assert h2flood.settle(held.peers, process.proc.pid), "the server did not catch up"
    per_connection = (rss(process) - before) / connections
    assert held.answered() == {"still open": connections * 4}
    assert per_connection < budget.http2_connection_bytes(limits), per_connection
    for peer in held.peers:
        peer.close()
