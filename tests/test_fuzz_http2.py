"""
Fuzzing HTTP/2: hypothesis writes frames (HEADERS with real HPACK blocks or
junk, CONTINUATION, DATA, RST_STREAM, PRIORITY, WINDOW_UPDATE, SETTINGS,
PING, GOAWAY, and unknown types) in random order, on random streams, with
random sizes and flags, cut at random places, to a real C{twistd
rendezvous} on a TLS listener (ALPN "h2").  The server must never answer
5xx, never log a failure, and a rendezvous created before the run (whose id
the fuzzer never learns) must come out of it intact.
"""

from __future__ import annotations

import re
import socket
import ssl
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("h2.connection", reason="the http2 extra is not installed")

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from bench import h2flood

from .test_end_to_end import HOST, TwistdServer, running
from .test_fuzz_http import read_until_quiet
from .test_http2 import start_h2_server

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

stream_ids = st.one_of(st.sampled_from([0, 1, 3, 5, 7, 9, 2, 4]), st.integers(0, 2**31 - 1))
sizes = st.integers(0, 20000)
paths = st.one_of(
    st.sampled_from(["/", "//", "/a/b", "*", "", "/%ff", "/_matrix/client/v1/rendezvous"]),
    st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=30).map(
        lambda i: "/" + i
    ),
)
#: Mostly fields a request may carry; now and then one that h2 refuses
#: (connection-specific, a pseudo-header, an upper-case name).
field_names = st.one_of(
    st.sampled_from(
        [
            "content-type",
            "content-length",
            "if-match",
            "if-none-match",
            "prefer",
            "expect",
            "x-forwarded-for",
            "cookie",
            "origin",
            "sec-fetch-mode",
        ]
    ),
    st.sampled_from(["content-length"] * 3 + ["te", "connection", ":path", ":status", "Host"]),
    st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=12),
)
field_values = st.one_of(
    st.sampled_from(
        ["*", '"x"', "wait=1", "0", "-1", "5", "99999999999", "100-continue", "trailers", "a/b"]
    ),
    st.text(max_size=40),
)


@st.composite
def frames(draw: st.DrawFn, encoder: hpack.Encoder, opened: list[int]) -> bytes:
    """
    One frame, serialized; an HPACK block from the connection's encoder or
    junk.  Requests mostly open the next stream (ids in C{opened}), and
    frames on streams mostly name one of those: most conversations get
    somewhere before they break a rule.
    """
    kind = draw(
        st.sampled_from(
            [
                "request",
                "request",
                "request",
                "request",
                "headers",
                "continuation",
                "data",
                "data",
                "rst",
                "priority",
                "window",
                "settings",
                "ping",
                "goaway",
                "unknown",
            ]
        )
    )
    if kind == "request" and draw(st.integers(0, 9)) < 8:
        stream = (opened[-1] + 2) if opened else 1
        opened.append(stream)
    elif opened and draw(st.integers(0, 9)) < 7:
        stream = draw(st.sampled_from(opened))
    else:
        stream = draw(stream_ids)
    frame: Frame
    if kind in ("request", "headers"):
        frame = HeadersFrame(1)
        if kind == "request":
            fields = [
                (":method", draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]))),
                (":path", draw(paths)),
                (":scheme", "https"),
                (":authority", "localhost"),
                *draw(st.lists(st.tuples(field_names, field_values), max_size=3)),
            ]
            try:
                frame.data = encoder.encode(fields)
            except Exception:
                frame.data = draw(st.binary(max_size=50))
        else:
            frame.data = draw(st.binary(max_size=200))
        flags = draw(st.sets(st.sampled_from(["END_STREAM", "END_HEADERS", "PRIORITY"])))
        if kind == "request" and draw(st.integers(0, 9)) < 8:
            flags.add("END_HEADERS")
        for flag in sorted(flags):
            frame.flags.add(flag)
    elif kind == "continuation":
        frame = ContinuationFrame(1)
        frame.data = b"\x00" * draw(st.integers(0, 16384))
        if draw(st.booleans()):
            frame.flags.add("END_HEADERS")
    elif kind == "data":
        frame = DataFrame(1)
        frame.data = b"d" * draw(st.integers(0, 16384))
        if draw(st.booleans()):
            frame.flags.add("END_STREAM")
    elif kind == "rst":
        frame = RstStreamFrame(1)
        frame.error_code = draw(st.integers(0, 20))
    elif kind == "priority":
        frame = PriorityFrame(1)
        frame.depends_on = draw(stream_ids)
        frame.stream_weight = draw(st.integers(0, 255))
        frame.exclusive = draw(st.booleans())
    elif kind == "window":
        frame = WindowUpdateFrame(1)
        frame.window_increment = draw(st.integers(0, 2**31 - 1))
    elif kind == "settings":
        frame = SettingsFrame(0)
        if draw(st.booleans()):
            frame.flags.add("ACK")
        else:
            frame.settings = draw(
                st.dictionaries(st.integers(1, 8), st.integers(0, 2**31 - 1), max_size=4)
            )
    elif kind == "ping":
        frame = PingFrame(0)
        frame.opaque_data = draw(st.binary(min_size=8, max_size=8))
    elif kind == "goaway":
        frame = GoAwayFrame(0)
        frame.last_stream_id = draw(stream_ids)
        frame.error_code = draw(st.integers(0, 20))
    else:
        frame = ExtensionFrame(draw(st.integers(0x20, 0xFF)), 1)
        frame.body = draw(st.binary(max_size=30))
    data: bytes = frame.serialize()
    if draw(st.integers(0, 9)) < 8 and kind in ("settings", "ping", "goaway"):
        stream = 0
    if kind in ("settings", "ping", "goaway") or draw(st.integers(0, 9)) < 8:
        # The stream drawn, valid for the frame type or not (hyperframe
        # refuses to build some): written into the frame header.
        data = data[:5] + stream.to_bytes(4, "big") + data[9:]
    return data


@st.composite
def conversations(draw: st.DrawFn) -> list[bytes]:
    """
    What one client connection sends after the preface and its SETTINGS:
    frames, cut into writes at random places.
    """
    encoder = hpack.Encoder()
    opened: list[int] = []
    stream = b"".join(draw(st.lists(frames(encoder, opened), min_size=1, max_size=12)))
    cuts = sorted(draw(st.sets(st.integers(0, len(stream)), max_size=4)))
    pieces, start = [], 0
    for cut in [*cuts, len(stream)]:
        if cut > start:
            pieces.append(stream[start:cut])
            start = cut
    return [PREFACE + SettingsFrame(0).serialize(), *pieces]


def statuses(data: bytes) -> list[int]:
    """
    The :status of every response the server sent, decoding its header
    blocks in order.
    """
    decoder = hpack.Decoder()
    found = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        if len(data) < 9 + length:
            break
        frame.parse_body(memoryview(data[9 : 9 + length]))
        data = data[9 + length :]
        if isinstance(frame, HeadersFrame):
            fields = dict(decoder.decode(frame.data, raw=True))
            found.append(int(fields[b":status"]))
    return found


def converse(port: int, writes: list[bytes]) -> bytes:
    """
    Send C{writes} on a fresh TLS connection, and return all the server
    sent back (decrypted) until it closed or fell silent.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection((HOST, port), timeout=5)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        try:
            for piece in writes:
                sock.sendall(piece)
        except OSError:
            pass  # the server closed mid-way
        return read_until_quiet(sock)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """
    A TLS server with short deadlines and rate limits far above the
    fuzzer's pace; it must stop cleanly having logged no failure.
    """
    process, _ = start_h2_server(
        Path(tmp_path_factory.mktemp("fuzz2")),
        "--max-bytes=10240",
        "--poll-timeout=1",
        "--body-timeout=1",
        "--header-timeout=1",
        "--create-burst=1000000",
        "--request-burst=1000000",
        "--max-rendezvous-per-address=10000",
        "--max-connections-per-address=1000",
    )
    yield from running(process)


@pytest.fixture(scope="module")
def known(fuzzed: TwistdServer) -> tuple[str, str]:
    """
    A rendezvous created before the fuzzing: its path and ETag.
    """
    return h2flood.create(fuzzed.port)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(writes=conversations())
def test_no_frames_make_the_server_fail(
    fuzzed: TwistdServer, known: tuple[str, str], writes: list[bytes]
) -> None:
    """
    No sequence of HTTP/2 frames, however malformed, gets a 5xx, and the
    server goes on serving.
    """
    answer = converse(fuzzed.port, writes)
    fuzzed.pump(0)
    assert all(100 <= status < 500 for status in statuses(answer)), (writes, answer)


def test_after_fuzzing_the_known_rendezvous_is_intact(
    fuzzed: TwistdServer, known: tuple[str, str]
) -> None:
    """
    After the fuzzing, the rendezvous created before it reads back as it was
    over HTTP/2, and the log shows no failure.
    """
    path, etag = known
    [peer] = h2flood.connect(fuzzed.port, 1)
    try:
        stream = peer.conn.get_next_available_stream_id()
        peer.conn.send_headers(stream, h2flood.request_fields("GET", path), end_stream=True)
        peer.queue()
        h2flood.pump([peer], lambda: stream in peer.ended, 5)
        assert peer.statuses[stream] == 200
        assert bytes(peer.bodies[stream]) == b"hello"
        assert peer.etags[stream] == etag
    finally:
        peer.close()
    fuzzed.assert_no_trouble()
    assert re.search(rb"HTTP/2", fuzzed.output)
