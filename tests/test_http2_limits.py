"""
The limits of HTTP/2 connections (L{rendezvous_twisted.http.http2}), in memory:
the site's protocol over a StringTransport that says ALPN picked "h2",
driven by the h2 library as the client (and by frames built by hand), with
every deadline on a Clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

h2_connection = pytest.importorskip("h2.connection", reason="the http2 extra is not installed")
import h2.config  # noqa: E402
import h2.errors  # noqa: E402
import h2.events  # noqa: E402
import h2.exceptions  # noqa: E402
import h2.settings  # noqa: E402
import hpack  # noqa: E402
from hyperframe.frame import (  # noqa: E402
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
)
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.error import ConnectionDone  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import LogLevel, capturedLogs, formatEvent  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from rendezvous_twisted.core.conditions import ANY  # noqa: E402
from rendezvous_twisted.http import http2, http2_limits  # noqa: E402
from rendezvous_twisted.http.http1 import LINGER_SECONDS  # noqa: E402

from .conftest import Harness, fired  # noqa: E402

PEER = IPv4Address("TCP", "192.0.2.9", 4321)
Fields = list[tuple[str, str]]


def request(method: str, path: str, *extra: tuple[str, str]) -> Fields:
    return [
        (":method", method),
        (":path", path),
        (":scheme", "https"),
        (":authority", "rendezvous.test"),
        *extra,
    ]


class Peer:
    """
    An HTTP/2 client (the h2 library) connected in memory to one of the
    site's connections, which believes TLS negotiated "h2".
    """

    def __init__(self, harness: Harness, peer: IPv4Address = PEER, ack: bool = True) -> None:
        self.harness = harness
        self.clock = harness.clock
        self.site = harness.site(harness.clock)
        self.protocol: Any = self.site.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        self.protocol.makeConnection(self.transport)
        self.client = h2_connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        self.statuses: dict[int, int] = {}
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        #: Whether the client reads what the server sends (and so
        #: acknowledges its SETTINGS).
        self.reading = ack
        self.send()

    def send(self, raw: bytes = b"") -> None:
        """
        Give the server what the client has to send, then C{raw}, and
        take in its answers.
        """
        data = self.client.data_to_send() + raw
        if data:
            self.protocol.dataReceived(data)
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            self.clock.advance(0)
            if not self.reading:
                return
            out = self.transport.value()
            self.transport.clear()
            if not out:
                return
            try:
                events = self.client.receive_data(out)
            except h2.exceptions.ProtocolError:
                return
            for event in events:
                self._take(event)
            reply = self.client.data_to_send()
            if reply and not self.transport.disconnecting:
                self.protocol.dataReceived(reply)

    def _take(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            fields = dict(event.headers)
            self.headers[event.stream_id] = fields
            self.statuses[event.stream_id] = int(fields[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.bodies[event.stream_id] = self.bodies.get(event.stream_id, b"") + event.data
            self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.resets[event.stream_id] = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def ask(self, fields: Fields, body: bytes | None = None, end: bool = True) -> int:
        stream: int = self.client.get_next_available_stream_id()
        self.client.send_headers(stream, fields, end_stream=body is None and end)
        if body is not None:
            self.client.send_data(stream, body, end_stream=end)
        self.send()
        return stream

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()

    @property
    def connection(self) -> Any:
        return self.protocol.http2

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def create(harness: Harness) -> tuple[str, bytes]:
    """
    A rendezvous in the harness' store: its id and ETag.
    """
    version = fired(harness.store.create(b"hello", b"text/plain", "owner"))
    return version.rendezvous_id, version.etag


def test_settings_advertise_the_limits() -> None:
    """The server's SETTINGS carry the stream cap, the header list limit and one body's window."""
    peer = Peer(Harness(max_streams_per_connection=3, max_header_bytes=4000, max_bytes=500))
    settings = peer.client.remote_settings
    assert settings.max_concurrent_streams == 3
    assert settings.max_header_list_size == 4000
    assert settings.initial_window_size == 501
    assert isinstance(peer.connection, http2.LimitedH2Connection)


def test_streams_past_the_cap_are_refused_for_retry() -> None:
    """
    Streams past max_streams_per_connection, sent before the client saw the
    SETTINGS, are reset REFUSED_STREAM with no request made; the others are served.
    """
    harness = Harness(max_streams_per_connection=2)
    rendezvous_id, etag = create(harness)
    peer = Peer(harness, ack=False)
    parked = request("GET", f"/{rendezvous_id}", ("if-none-match", etag.decode()))
    streams = []
    for _ in range(4):
        stream = peer.client.get_next_available_stream_id()
        peer.client.send_headers(stream, parked, end_stream=True)
        streams.append(stream)
    peer.reading = True
    peer.send()
    assert peer.resets == {
        streams[2]: h2.errors.ErrorCodes.REFUSED_STREAM,
        streams[3]: h2.errors.ErrorCodes.REFUSED_STREAM,
    }
    assert harness.store.parked_count == 2
    assert (
        peer.site.metrics.registry.get_sample_value(
            "rendezvous_refusals_total", {"reason": "streams"}
        )
        == 2
    )


def test_streams_past_the_cap_after_the_settings_are_refused_alone() -> None:
    """
    A client that saw the stream cap and opens more streams anyway gets each extra one reset
    REFUSED_STREAM; the connection and its parked readers go on.
    """
    harness = Harness(max_streams_per_connection=2)
    rendezvous_id, etag = create(harness)
    peer = Peer(harness)
    assert peer.client.remote_settings.max_concurrent_streams == 2
    parked = request("GET", f"/{rendezvous_id}", ("if-none-match", etag.decode()))
    first, second = peer.ask(parked), peer.ask(parked)
    assert harness.store.parked_count == 2
    # The client's h2 would not send past the cap: frames by hand, with its
    # own HPACK encoder so that the server's table stays in step.
    peer.reading = False
    extra = b""
    for stream in (first + 4, first + 6):
        frame = HeadersFrame(stream)
        frame.data = peer.client.encoder.encode(request("GET", "/"))
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        extra += frame.serialize()
    peer.send(extra)
    frames = written_frames(peer)
    resets = {f.stream_id: f.error_code for f in frames if isinstance(f, RstStreamFrame)}
    assert resets == {
        first + 4: h2.errors.ErrorCodes.REFUSED_STREAM,
        first + 6: h2.errors.ErrorCodes.REFUSED_STREAM,
    }
    assert not any(isinstance(f, GoAwayFrame) for f in frames)
    assert not peer.transport.disconnecting
    assert harness.store.parked_count == 2
    assert {first, second} <= set(peer.connection.streams)


def test_a_header_list_inflated_past_the_limit_gets_431_on_its_stream() -> None:
    """
    A header block within max_header_bytes whose decoded list is over it (HPACK naming one
    long field again) gets 431 JSON on its stream alone; the connection goes on.
    """
    harness = Harness(max_header_bytes=3000)
    peer = Peer(harness)
    long = ("x-pad", "a" * 1200)
    assert peer.statuses[peer.ask(request("OPTIONS", "/", long))] == 204
    with capturedLogs() as events:
        stream = peer.ask(request("OPTIONS", "/", long, long, long))
    assert peer.statuses[stream] == 431
    assert json.loads(peer.bodies[stream])["errcode"] == "M_TOO_LARGE"
    assert peer.goaway is None and not peer.transport.disconnecting
    assert all(e["log_level"] < LogLevel.warn for e in events)
    assert peer.statuses[peer.ask(request("OPTIONS", "/"))] == 204


def test_a_header_list_inflated_far_past_the_limit_closes_the_connection() -> None:
    """
    A header list that HPACK inflates past twice max_header_bytes ends the connection with
    GOAWAY, logged below warning.
    """
    harness = Harness(max_header_bytes=3000)
    peer = Peer(harness)
    long = ("x-pad", "a" * 1200)
    assert peer.statuses[peer.ask(request("OPTIONS", "/", long))] == 204
    with capturedLogs() as events:
        peer.ask(request("OPTIONS", "/", *[long] * 6))
    assert peer.goaway is not None
    assert peer.transport.disconnecting
    assert all(e["log_level"] < LogLevel.warn for e in events)


def written_frames(peer: Peer) -> list[Frame]:
    """
    Every frame the server wrote since the client stopped reading.
    """
    data = peer.transport.value()
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        data = data[9 + length :]
        frames.append(frame)
    return frames


def raw_answer(peer: Peer) -> tuple[dict[int, dict[bytes, bytes]], dict[int, bytes], Any]:
    """
    What the server wrote since the client stopped reading, decoded by hand
    (the client's h2 knows nothing of streams opened with raw frames): the
    header fields and body per stream, and the GOAWAY frame.
    """
    data = peer.transport.value()
    decoder = hpack.Decoder()
    headers: dict[int, dict[bytes, bytes]] = {}
    bodies: dict[int, bytes] = {}
    goaway = None
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        data = data[9 + length :]
        if isinstance(frame, HeadersFrame):
            headers[frame.stream_id] = dict(decoder.decode(frame.data, raw=True))
        elif isinstance(frame, DataFrame):
            bodies[frame.stream_id] = bodies.get(frame.stream_id, b"") + frame.data
        elif isinstance(frame, GoAwayFrame):
            goaway = frame
    return headers, bodies, goaway


def continuation(stream: int, size: int, end: bool = False) -> bytes:
    frame = ContinuationFrame(stream)
    frame.data = b"\x00" * size
    if end:
        frame.flags.add("END_HEADERS")
    data: bytes = frame.serialize()
    return data


def test_a_header_block_is_refused_as_it_passes_the_limit() -> None:
    """
    A header block (HEADERS then CONTINUATION) is answered 431 JSON and the
    connection closed with GOAWAY as soon as a frame's header shows it passing
    max_header_bytes, before that frame's payload arrives.
    """
    harness = Harness(max_header_bytes=3000)
    peer = Peer(harness)
    peer.reading = False
    start = HeadersFrame(1)
    start.data = peer.client.encoder.encode(request("GET", "/"))
    peer.send(start.serialize() + continuation(1, 1000) + continuation(1, 1000))
    assert not peer.transport.disconnecting
    with capturedLogs() as events:
        # Only the 9-byte frame header of a CONTINUATION that passes the limit.
        peer.send(continuation(1, 1500)[:9])
    headers, bodies, goaway = raw_answer(peer)
    assert headers[1][b":status"] == b"431"
    assert headers[1][b"access-control-allow-origin"] == b"*"
    assert json.loads(bodies[1])["errcode"] == "M_TOO_LARGE"
    assert goaway is not None and goaway.last_stream_id == 1
    assert peer.transport.disconnecting
    assert any("header block over 3000 bytes" in formatEvent(e) for e in events)
    assert all(e["log_level"] < LogLevel.warn for e in events)


def test_a_header_block_that_never_ends_is_cut_at_the_header_deadline() -> None:
    """A header block still incomplete at the header deadline gets 408 and GOAWAY."""
    harness = Harness(header_timeout_seconds=2, idle_timeout_seconds=100)
    peer = Peer(harness)
    peer.reading = False
    start = HeadersFrame(1)
    start.data = peer.client.encoder.encode(request("GET", "/"))
    peer.send(start.serialize())
    peer.advance(1.9)
    assert not raw_answer(peer)[0]
    peer.advance(0.2)
    headers, bodies, goaway = raw_answer(peer)
    assert headers[1][b":status"] == b"408"
    assert json.loads(bodies[1])["errcode"] == "M_REQUEST_TIMEOUT"
    assert goaway is not None
    assert peer.transport.disconnecting


def test_a_body_not_complete_in_time_gets_408_and_is_forgotten() -> None:
    """
    A stream whose body is not all in at the body deadline is answered 408
    JSON then reset NO_ERROR, and forgotten; the connection goes on serving.
    """
    harness = Harness(body_timeout_seconds=3)
    peer = Peer(harness)
    stream = peer.ask(request("POST", "/", ("content-length", "10")), b"12345", end=False)
    peer.advance(2.9)
    assert stream not in peer.statuses
    with capturedLogs() as events:
        peer.advance(0.2)
    assert peer.statuses[stream] == 408
    assert json.loads(peer.bodies[stream])["errcode"] == "M_REQUEST_TIMEOUT"
    assert peer.resets[stream] == h2.errors.ErrorCodes.NO_ERROR
    assert not peer.connection.streams
    assert harness.store.rendezvous_count == 0
    assert all(e["log_level"] < LogLevel.warn for e in events)
    assert not peer.transport.disconnecting
    created = peer.ask(request("POST", "/", ("content-length", "2")), b"hi")
    assert peer.statuses[created] == 200


def test_a_request_with_too_many_header_fields_gets_431() -> None:
    """A request with more header fields than max_headers gets 431 JSON; the connection goes on."""
    harness = Harness(max_headers=5)
    peer = Peer(harness)
    many = [(f"x-field-{i}", "v") for i in range(6)]
    stream = peer.ask(request("POST", "/", ("content-length", "2"), *many), b"hi")
    assert peer.statuses[stream] == 431
    assert json.loads(peer.bodies[stream])["errcode"] == "M_TOO_LARGE"
    assert harness.store.rendezvous_count == 0
    assert not peer.connection.streams
    assert peer.statuses[peer.ask(request("POST", "/", ("content-length", "2")), b"hi")] == 200


def test_a_connection_with_no_stream_open_is_closed_at_the_idle_timeout() -> None:
    """With no stream open for idle_timeout (not the header deadline) the connection says GOAWAY."""
    harness = Harness(header_timeout_seconds=1, idle_timeout_seconds=4)
    peer = Peer(harness)
    assert peer.statuses[peer.ask(request("OPTIONS", "/"))] == 204
    peer.advance(3.5)
    assert peer.goaway is None
    peer.advance(0.6)
    assert peer.goaway is not None
    assert peer.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert peer.transport.disconnecting


def test_an_open_stream_holds_the_connection_past_the_idle_timeout() -> None:
    """A parked long-poll keeps its HTTP/2 connection open past the idle timeout."""
    harness = Harness(idle_timeout_seconds=2, poll_timeout_seconds=10)
    rendezvous_id, etag = create(harness)
    peer = Peer(harness)
    stream = peer.ask(request("GET", f"/{rendezvous_id}", ("if-none-match", etag.decode())))
    peer.advance(5)
    assert peer.goaway is None
    peer.advance(5.1)
    assert peer.statuses[stream] == 304
    assert peer.goaway is None


def test_answers_the_client_does_not_take_do_not_hold_the_connection() -> None:
    """
    Streams whose answers are complete but held by the client's shut window keep the connection
    only as long as idle_timeout, counted from the last answer: a parked stream keeps it.
    """
    harness = Harness(idle_timeout_seconds=4, poll_timeout_seconds=30)
    rendezvous_id, etag = create(harness)
    peer = Peer(harness)
    peer.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    peer.send()
    parked = peer.ask(request("GET", f"/{rendezvous_id}", ("if-none-match", etag.decode())))
    held = peer.ask(request("GET", f"/{rendezvous_id}"))
    assert peer.statuses[held] == 200
    assert held not in peer.ended
    peer.advance(10)
    assert peer.goaway is None
    peer.harness.store.write(rendezvous_id, b"again", b"text/plain", ANY)
    peer.advance(0)
    assert peer.statuses[parked] == 200
    assert parked not in peer.ended
    peer.advance(3.9)
    assert peer.goaway is None
    peer.advance(0.2)
    assert peer.goaway is not None
    assert peer.transport.disconnecting


def test_a_shut_window_does_not_spin_the_sending_loop() -> None:
    """
    An answer the client's window does not let through waits without the
    sending loop calling itself again, and goes once the window opens.
    """
    harness = Harness()
    rendezvous_id, _ = create(harness)
    peer = Peer(harness)
    peer.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    peer.send()
    connection = peer.connection
    loop = connection._sendPrioritisedData
    turns = []

    def counted(*args: object) -> None:
        turns.append(args)
        # A spinning loop would never let the clock's advance(0) return.
        assert len(turns) < 100, "the sending loop spins on a shut window"
        loop(*args)

    connection._sendPrioritisedData = counted
    stream = peer.ask(request("GET", f"/{rendezvous_id}"))
    assert peer.statuses[stream] == 200
    assert stream not in peer.ended
    assert not [c for c in peer.clock.getDelayedCalls() if getattr(c, "func", None) == counted]
    peer.client.increment_flow_control_window(100, stream_id=stream)
    peer.send()
    assert peer.bodies[stream] == b"hello"
    assert stream in peer.ended


def held_body_bytes(peer: Peer) -> int:
    return sum(
        len(stream._request.content.getvalue()) for stream in peer.connection.streams.values()
    )


def test_bodies_in_progress_are_bounded_by_the_connection_window() -> None:
    """
    However many streams send bodies, the bytes one connection holds stay
    within its window, which reopens as streams are forgotten.
    """
    harness = Harness(max_streams_per_connection=8)
    peer = Peer(harness)
    streams = [
        peer.ask(request("POST", "/", ("content-length", "10000")), None, end=False)
        for _ in range(8)
    ]
    for stream in streams:
        room = min(peer.client.local_flow_control_window(stream), 10000)
        if room:
            peer.client.send_data(stream, b"x" * room)
    peer.send()
    assert held_body_bytes(peer) == http2_limits.DEFAULT_WINDOW
    assert peer.client.outbound_flow_control_window == 0
    # Each stream's window is one body and a byte: never reopened.
    assert peer.client.local_flow_control_window(streams[0]) == 0
    peer.client.reset_stream(streams[0])
    peer.send()
    assert held_body_bytes(peer) == http2_limits.DEFAULT_WINDOW - 10000
    assert peer.client.outbound_flow_control_window >= 10000


def test_a_request_reset_in_the_same_read_is_never_made() -> None:
    """HEADERS and RST_STREAM in one read make no request, park nothing, log nothing above debug."""
    harness = Harness(request_burst=10**6)
    rendezvous_id, etag = create(harness)
    peer = Peer(harness)
    kinds = [
        request("GET", f"/{rendezvous_id}"),
        request("GET", f"/{rendezvous_id}", ("if-none-match", etag.decode())),
        request("GET", "/abcdefghijklmnopqrstuv"),
    ]
    with capturedLogs() as events:
        for i in range(300):
            stream = peer.client.get_next_available_stream_id()
            peer.client.send_headers(stream, kinds[i % 3], end_stream=True)
            peer.client.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
            peer.send()
    assert harness.store.parked_count == 0
    assert not peer.connection.streams
    assert not peer.statuses
    assert not [e for e in events if e["log_level"] > LogLevel.debug], [
        formatEvent(e) for e in events
    ]


def test_a_parked_reader_reset_frees_its_waiter_at_once() -> None:
    """Resetting a parked long-poll's stream frees its store waiter, with a debug line at most."""
    harness = Harness()
    rendezvous_id, etag = create(harness)
    peer = Peer(harness)
    stream = peer.ask(request("GET", f"/{rendezvous_id}", ("if-none-match", etag.decode())))
    assert harness.store.parked_count == 1
    with capturedLogs() as events:
        peer.client.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        peer.send()
    assert harness.store.parked_count == 0
    assert not peer.connection.streams
    assert all(e["log_level"] <= LogLevel.debug for e in events)
    assert peer.statuses[peer.ask(request("GET", f"/{rendezvous_id}"))] == 200


def test_a_flood_of_resets_is_answered_with_goaway() -> None:
    """A connection resetting streams faster than its reset budget gets GOAWAY ENHANCE_YOUR_CALM."""
    harness = Harness(request_burst=10**6)
    rendezvous_id, etag = create(harness)
    peer = Peer(harness)
    fields = request("GET", f"/{rendezvous_id}", ("if-none-match", etag.decode()))
    for _ in range(http2_limits.RESET_BURST + 1):
        if peer.goaway is not None:
            break
        stream = peer.client.get_next_available_stream_id()
        peer.client.send_headers(stream, fields, end_stream=True)
        peer.send()
        peer.client.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        peer.send()
    assert peer.goaway is not None
    assert peer.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert harness.store.parked_count == 0


def test_a_peer_that_keeps_sending_after_goaway_is_aborted() -> None:
    """
    After a protocol error the server says GOAWAY, drops what the peer still
    sends unread, and aborts it once that passes a bound.
    """
    harness = Harness()
    peer = Peer(harness)
    with capturedLogs() as events:
        peer.send(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WINDOW_UPDATE of 0
    assert peer.goaway is not None
    assert peer.transport.disconnecting
    assert not peer.transport.disconnected
    received = peer.connection.conn.incoming_buffer
    buffered = len(received._data)
    for _ in range(20):
        peer.protocol.dataReceived(continuation(1, 8000))
    # h2's frame buffer took none of it.
    assert len(received._data) == buffered and not received._headers_buffer
    assert peer.transport.disconnected  # aborted
    assert all(e["log_level"] < LogLevel.warn for e in events)


def test_a_refused_http2_connection_answers_its_first_stream() -> None:
    """
    A connection refused at the caps whose TLS negotiated h2 answers its
    first stream with the refusal (429 JSON, Retry-After) and says GOAWAY.
    """
    harness = Harness(max_connections_per_address=1)
    first = Peer(harness)
    site = first.site
    second = Peer.__new__(Peer)
    second.harness, second.clock, second.site = harness, harness.clock, site
    second.protocol = site.buildProtocol(PEER)
    second.transport = StringTransport(peerAddress=PEER)
    second.transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    second.protocol.makeConnection(second.transport)
    assert second.transport.value() == b""
    second.client = h2_connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    second.client.initiate_connection()
    second.statuses, second.headers, second.bodies = {}, {}, {}
    second.ended, second.resets, second.goaway, second.reading = set(), {}, None, True
    second.send()
    stream = second.ask(request("POST", "/", ("content-length", "1")), b"x")
    assert second.statuses == {stream: 429}
    assert json.loads(second.bodies[stream])["errcode"] == "M_LIMIT_EXCEEDED"
    assert second.headers[stream][b"retry-after"] == b"1"
    assert second.goaway is not None and second.goaway.last_stream_id == stream
    assert second.transport.disconnecting
    assert harness.store.rendezvous_count == 0
    second.lose()
    assert site.connection_count == 1


def test_a_refused_tls_connection_speaking_http11_gets_its_refusal_when_it_speaks() -> None:
    """
    A refused TLS connection that negotiated HTTP/1.1 is answered its
    HTTP/1.1 429 with its first bytes, not at accept (before its handshake).
    """
    harness = Harness(max_connections_per_address=1)
    first = Peer(harness)
    site = first.site
    protocol = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    transport.negotiatedProtocol = None  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    assert transport.value() == b""
    transport.negotiatedProtocol = b"http/1.1"  # type: ignore[attr-defined]
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
    assert transport.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b'"M_LIMIT_EXCEEDED"' in transport.value()
    harness.clock.advance(LINGER_SECONDS)
    assert transport.disconnecting
    assert harness.store.rendezvous_count == 0
    protocol.connectionLost(Failure(ConnectionDone()))
    assert site.connection_count == 1


def test_a_connection_closed_before_its_first_bytes_does_not_switch() -> None:
    """
    A TLS connection (ALPN h2) whose first bytes come after the header
    deadline closed it stays with the HTTP/1.1 channel that answered 408, and
    leaves no timer behind once lost.
    """
    harness = Harness(header_timeout_seconds=1)
    first = Peer(harness)
    site = first.site
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.10", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 1))
    transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    harness.clock.advance(1.5)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting
    protocol.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert protocol.http2 is None
    first.lose()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert not harness.clock.getDelayedCalls()
