"""
What one HTTP/2 connection may hold, and the counting that needs no
private name: the figures, the header-block screen and the reset bucket.

L{rendezvous_twisted.http.http2.LimitedH2Connection} (the fenced subclass
of Twisted's private C{H2Connection}) bounds everything a client can make
one connection hold:

  - streams: at most C{max_streams_per_connection} at once, advertised in
    SETTINGS; a stream past it is refused (RST_STREAM REFUSED_STREAM, which
    clients retry) before any request is made for it, whether or not the
    client has seen the SETTINGS, and the connection goes on;
  - header blocks: HEADERS and CONTINUATION frames are counted as they
    arrive (L{HeaderBlocks}), and a block is refused (431, then GOAWAY) as
    it passes C{max_header_bytes}, before h2 buffers the frame that passes
    it; a block within it whose decoded list is over C{max_header_bytes}
    (SETTINGS_MAX_HEADER_LIST_SIZE, counted as RFC 9113 6.5.2 does) is
    answered 431 on its stream alone, and one that HPACK inflates past
    L{DECODED_HEADER_SLACK} times that is a connection error;
  - bodies: each stream's window is one byte more than C{max_bytes} (enough
    to see an oversize body and refuse it 413) and is never re-opened; the
    connection's window is re-opened by a stream's bytes only when that
    stream is forgotten, so the bodies one connection holds never exceed
    L{connection_window}; a body not complete within C{body_timeout_seconds}
    is answered 408 and its stream forgotten;
  - time: with no stream open for C{idle_timeout_seconds} the connection is
    closed with GOAWAY (HTTP/2's idle); a header block that does not
    complete within C{header_timeout_seconds} is answered 408 and the
    connection closed;
  - closing: once the connection is closed (GOAWAY sent), what the peer
    still sends is dropped unread, and a peer that goes on sending, or does
    not close, is aborted; a flood of stream resets is answered with GOAWAY
    ENHANCE_YOUR_CALM (L{ResetBucket}).

The idle deadline is an L{IdleTimer}.

Here too is the h2 side of the connection: its state machine, configured
(h2's C{MAX_CLOSED_STREAMS} and decoder, beyond its documented API), our
SETTINGS, and the answers written for a stream h2 keeps no state for.
Nothing here touches Twisted's private HTTP/2 code (that is
L{rendezvous_twisted.http.http2}'s alone); the h2 internals used here are
in its C{PRIVATE_NAMES}, checked by tests/test_http2_fence.py with the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, SettingsFrame
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: How many closed stream ids h2 remembers per connection (to tell a late
#: frame on a reset stream from a protocol error).  h2 keeps 65536, some
#: 6 MB a connection once a client has opened and closed that many.
MAX_CLOSED_STREAMS = 256
#: Stream resets a connection may make in a burst, and per second after
#: it (CVE-2023-44487, "rapid reset"; Twisted's own figures).
RESET_BURST = 1000
RESET_PER_SECOND = 33.0
#: Bytes a peer may still send once the connection is closed before it is
#: aborted: a polite peer stops at our GOAWAY, so this only has to cover
#: what was in flight.
MAX_BYTES_AFTER_CLOSE = 65536
#: The connection-level receive window HTTP/2 starts every connection with.
DEFAULT_WINDOW = 65535
#: How far past max_header_bytes h2 decodes a header list before it gives
#: up on the connection (HPACK lets a few bytes name a long field again and
#: again): up to it a list over the limit is refused on its stream alone.
DECODED_HEADER_SLACK = 2

_HEADERS = 0x1
_CONTINUATION = 0x9
_END_HEADERS = 0x4
_PREFACE_LENGTH = 24
_FRAME_HEADER_LENGTH = 9


class H2Site(Protocol):
    """
    What an HTTP/2 connection needs of its site.
    """

    @property
    def reactor(self) -> IReactorTime: ...

    def refused(self, reason: str) -> None:
        """
        Count a refusal made below the resource, by metrics reason.
        """

    def error_answer(
        self, status: int, errcode: str, message: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """
        The header fields (every-response ones included) and JSON body of
        an error answer.
        """


def connection_window(max_bytes: int) -> int:
    """
    The most body bytes one HTTP/2 connection holds at once: its receive
    window, which is HTTP/2's default unless one body needs more.
    """
    return max(DEFAULT_WINDOW, max_bytes + 1)


@dataclass(frozen=True, slots=True)
class Limits:
    """
    The limits of one HTTP/2 connection, from the server's configuration.
    """

    max_streams: int
    max_header_bytes: int
    max_body_bytes: int
    header_timeout_seconds: float
    body_timeout_seconds: float
    idle_timeout_seconds: float
    max_headers: int


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """
    A decoded header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it
    (RFC 9113 6.5.2: each field's name and value, and 32 bytes).
    """
    return sum(32 + len(name) + len(value) for name, value in headers)


def field_count(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """
    How many header fields a request has, its pseudo-headers left out.
    """
    return sum(1 for name, _ in headers if not name.startswith(b":"))


@dataclass(frozen=True, slots=True)
class Oversize:
    """
    Why a request's decoded header list is refused (431) on its stream:
    the log line's reason (a format string and its fields) and the
    answer's message.
    """

    log_format: str
    log_fields: dict[str, int]
    message: str


def oversize(headers: Sequence[tuple[bytes, bytes]], limits: Limits) -> Oversize | None:
    """
    Whether a request's header list is over C{max_header_bytes}, or its
    fields over C{max_headers}; None if neither.
    """
    listed = header_list_size(headers)
    if listed > limits.max_header_bytes:
        return Oversize(
            "a header list of {size} bytes",
            {"size": listed},
            f"the request's header list is over {limits.max_header_bytes} bytes",
        )
    fields = field_count(headers)
    if fields > limits.max_headers:
        return Oversize(
            "{fields} header fields",
            {"fields": fields},
            f"the request has over {limits.max_headers} header fields",
        )
    return None


def too_slow(what: str, seconds: float) -> str:
    """
    The message of a 408: the request's C{what} did not arrive in time.
    """
    unit = "second" if seconds == 1 else "seconds"
    return f"the request {what} did not arrive within {seconds:g} {unit}"


class HeaderBlocks:
    """
    Follow a connection's frames by their headers alone (after the client
    preface), and count each header block's bytes (a HEADERS frame and its
    CONTINUATIONs) as they arrive, so that a block over the limit is seen
    before h2 buffers the frame that passes it.
    """

    def __init__(self, max_header_bytes: int) -> None:
        self._limit = max_header_bytes
        self._preface_left = _PREFACE_LENGTH
        #: The frame header being read, and what is left of the frame.
        self._frame_head = bytearray()
        self._payload_left = 0
        #: The bytes of the block still arriving, and whether the frame
        #: being read ends it.
        self._block_bytes = 0
        self._block_ends = False
        #: The stream of a header block still arriving (0: none).
        self.stream = 0

    def screen(self, data: bytes) -> tuple[bytes, int]:
        """
        Follow the frames in C{data} and count each header block's bytes.
        Return the bytes h2 may read, and the stream of a header block that
        passed the limit (0 if none): the bytes returned then stop where
        its frame begins.
        """
        view = memoryview(data)
        size = len(data)
        i = 0
        for _ in range(size + 1):
            if i >= size:
                break
            if self._preface_left:
                step = min(self._preface_left, size - i)
                self._preface_left -= step
                i += step
                continue
            if self._payload_left:
                step = min(self._payload_left, size - i)
                self._payload_left -= step
                i += step
                if not self._payload_left and self._block_ends:
                    self.stream = 0
                    self._block_ends = False
                continue
            take = view[i : i + _FRAME_HEADER_LENGTH - len(self._frame_head)]
            self._frame_head += take
            i += len(take)
            if len(self._frame_head) < _FRAME_HEADER_LENGTH:
                break
            head = bytes(self._frame_head)
            self._frame_head.clear()
            length = int.from_bytes(head[0:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if kind == _HEADERS:
                self.stream = stream
                self._block_bytes = length
            elif kind == _CONTINUATION and self.stream:
                self._block_bytes += length
            if kind in (_HEADERS, _CONTINUATION) and self.stream:
                if self._block_bytes > self._limit:
                    return data[: max(0, i - _FRAME_HEADER_LENGTH)], self.stream
                self._block_ends = bool(flags & _END_HEADERS)
                if self._block_ends and not length:
                    self.stream = 0
                    self._block_ends = False
            self._payload_left = length
        return data, 0


class ResetBucket:
    """
    The stream resets a connection may still make: L{RESET_BURST} at once,
    refilled at L{RESET_PER_SECOND} (a token bucket).
    """

    def __init__(self, now: float) -> None:
        self._tokens = float(RESET_BURST)
        self._stamp = now

    def spend(self, now: float) -> bool:
        """
        Take one reset's token at time C{now}; False if there is none left.
        """
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(RESET_BURST, self._tokens + elapsed * RESET_PER_SECOND)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class IdleTimer:
    """
    Calls C{expired} once a connection has been idle for C{seconds}, or
    later while C{hold()} is true (a header block is still arriving): one
    timer for the whole connection, moved on rather than cancelled and
    armed again around each stream.
    """

    def __init__(
        self,
        clock: IReactorTime,
        seconds: float,
        expired: Callable[[], None],
        hold: Callable[[], bool],
    ) -> None:
        self._clock = clock
        self._seconds = seconds
        self._expired = expired
        self._hold = hold
        self._since: float | None = None
        self._call: IDelayedCall | None = None

    @property
    def idle(self) -> bool:
        """
        Whether idle time is being counted.
        """
        return self._since is not None

    def start(self, arm: bool = True) -> None:
        """
        Count idle time from now, with the timer running unless C{arm} is
        false (a closing connection).
        """
        self._since = self._clock.seconds()
        if arm and self._call is None:
            self._call = self._clock.callLater(self._seconds, self._check)

    def stop(self) -> None:
        """
        Stop counting (a stream opened); a running timer then does nothing.
        """
        self._since = None

    def cancel(self) -> None:
        """
        Cancel the timer (the connection is closed or closing).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        if self._since is None:
            return
        left = self._since + self._seconds - self._clock.seconds()
        if left > 0 or self._hold():
            self._call = self._clock.callLater(
                max(left, 0.001) if left > 0 else self._seconds, self._check
            )
            return
        self._expired()


class BodyDeadlines:
    """
    The streams whose body is still coming, each with a deadline of
    C{seconds} once L{arm} is called (after the read that opened it is
    handled), calling C{expired(stream_id)} when it passes.
    """

    def __init__(self, clock: IReactorTime, seconds: float, expired: Callable[[int], None]) -> None:
        self._clock = clock
        self._seconds = seconds
        self._expired = expired
        self._calls: dict[int, IDelayedCall | None] = {}

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._calls

    def expect(self, stream_id: int) -> None:
        """
        Stream C{stream_id}'s body is coming: its deadline starts at L{arm}.
        """
        self._calls[stream_id] = None

    def arm(self) -> None:
        """
        Start the deadline of each stream that has none yet.
        """
        for stream_id, call in self._calls.items():
            if call is None:
                self._calls[stream_id] = self._clock.callLater(
                    self._seconds, self._expired, stream_id
                )

    def stop(self, stream_id: int) -> bool:
        """
        Stream C{stream_id}'s body is in (or the stream is gone): cancel its
        deadline.  Return whether it was still coming.
        """
        receiving = stream_id in self._calls
        call = self._calls.pop(stream_id, None)
        if call is not None and call.active():
            call.cancel()
        return receiving

    def cancel(self) -> None:
        """
        Cancel every deadline (the connection is closing).
        """
        for call in self._calls.values():
            if call is not None and call.active():
                call.cancel()
        self._calls.clear()


class _StateMachine(h2.connection.H2Connection):
    # h2's connection, remembering fewer closed streams (see above).
    MAX_CLOSED_STREAMS = MAX_CLOSED_STREAMS


def state_machine(limits: Limits) -> h2.connection.H2Connection:
    """
    The h2 state machine of a server connection with these limits.
    """
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    conn = _StateMachine(config=config)
    # Enforced at once, whatever the peer has seen of our settings: a
    # header list over the limit is refused on its stream (see L{oversize});
    # h2's decoder stops only one inflated far past it.
    conn.decoder.max_header_list_size = DECODED_HEADER_SLACK * limits.max_header_bytes
    return conn


def open_windows(conn: h2.connection.H2Connection, limits: Limits) -> None:
    """
    Set the windows of a new connection: each stream's to one body (and
    one byte, to see an oversize body), the connection's to
    L{connection_window}.  The window is h2's to keep: it counts what the
    peer may send.
    """
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.max_body_bytes + 1})
    window = connection_window(limits.max_body_bytes)
    if window > DEFAULT_WINDOW:
        conn.increment_flow_control_window(window - DEFAULT_WINDOW)


def settings_frame(limits: Limits) -> bytes:
    """
    The stream cap and the header list limit, in a SETTINGS frame of our
    own, so that h2 never enforces them: it would answer a stream past the
    cap, or a list past the limit, by closing the whole connection (parked
    long-polls and all), where RFC 9113 5.1.2 asks for a refusal of that
    stream alone.  The connection refuses them, once h2 has decoded their
    block (HPACK's table is shared by every stream).  The peer's ACK of this
    frame changes nothing in h2.
    """
    settings = SettingsFrame(
        0,
        settings={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        },
    )
    data: bytes = settings.serialize()
    return data


def _header_block(status: int, fields: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(b":status", b"%d" % status), *((k.lower(), v) for k, v in fields)]


def answer_stream(
    conn: h2.connection.H2Connection,
    stream_id: int,
    status: int,
    fields: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    """
    Answer a stream that no request was made for, through h2, and reset it
    if the client is still sending: the connection goes on.
    """
    fits = len(body) <= conn.local_flow_control_window(stream_id)
    conn.send_headers(stream_id, _header_block(status, fields), end_stream=not fits)
    if fits:
        conn.send_data(stream_id, body, end_stream=True)
    with contextlib.suppress(h2.exceptions.ProtocolError):
        # Closed already when the client had ended its request.
        conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)


def final_answer(
    conn: h2.connection.H2Connection,
    stream_id: int,
    status: int,
    fields: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> bytes:
    """
    The frames that answer stream C{stream_id}, then say GOAWAY naming it
    as the last stream: for a stream the connection cannot go on from (a
    header block left unread breaks HPACK's shared state) or the first
    stream of a refused connection.  Built here, as h2 keeps no state for
    a stream whose headers it has not read; HPACK's is h2's encoder.
    """
    frames = HeadersFrame(stream_id)
    frames.data = conn.encoder.encode(_header_block(status, fields))
    frames.flags.add("END_HEADERS")
    room = min(
        conn.outbound_flow_control_window,
        conn.remote_settings.initial_window_size,
        conn.max_outbound_frame_size,
    )
    out: list[bytes]
    if len(body) <= room:
        data = DataFrame(stream_id)
        data.data = body
        data.flags.add("END_STREAM")
        out = [frames.serialize(), data.serialize()]
    else:
        frames.flags.add("END_STREAM")
        out = [frames.serialize()]
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = max(stream_id, conn.highest_inbound_stream_id)
    goaway.error_code = h2.errors.ErrorCodes.NO_ERROR
    out.append(goaway.serialize())
    return b"".join(out)
