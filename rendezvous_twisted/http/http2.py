"""
HTTP/2 (TLS with ALPN "h2") under the same limits as HTTP/1.1.

Twisted's C{H2Connection} serves HTTP/2 with h2's default settings (100
streams a connection, 64 KiB header lists, windows re-opened as soon as
data arrives) and with no deadline for a body or a header block.  The
subclass here bounds everything a client can make one connection hold:

  - streams: at most C{max_streams_per_connection} at once, advertised in
    SETTINGS; a stream past it is refused (RST_STREAM REFUSED_STREAM, which
    clients retry) before any request is made for it, whether or not the
    client has seen the SETTINGS, and the connection goes on;
  - header blocks: HEADERS and CONTINUATION frames are counted as they
    arrive, and a block is refused (431, then GOAWAY) as it passes
    C{max_header_bytes}, before h2 buffers the frame that passes it; a
    block within it whose decoded list is over C{max_header_bytes}
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
    ENHANCE_YOUR_CALM.

A stream the client resets is a normal event: its request sees its
connection lost (a parked long-poll frees its store waiter through the
route's cancelled Deferred) and at most a debug line is logged.

The fence: C{twisted.web._http2} is private ("early draft" in its own
words), and this is the one module that uses it, or h2 beyond its
documented API.  L{PRIVATE_NAMES} lists every such name we rely on;
tests/test_http2_fence.py fails loudly if one of them changes, and
pyproject.toml pins the Twisted and h2 versions this was tested with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, SettingsFrame
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection

from rendezvous_twisted.http.answers import Refusal
from rendezvous_twisted.http.clients import peer_host

#: Every private name (and h2 internal) this module relies on, checked by
#: tests/test_http2_fence.py: (owner, attribute).
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("twisted.web._http2.H2Connection", "conn"),
    ("twisted.web._http2.H2Connection", "streams"),
    ("twisted.web._http2.H2Connection", "_requestReceived"),
    ("twisted.web._http2.H2Connection", "_requestDataReceived"),
    ("twisted.web._http2.H2Connection", "_requestEnded"),
    ("twisted.web._http2.H2Connection", "_handleWindowUpdate"),
    ("twisted.web._http2.H2Connection", "_requestDone"),
    ("twisted.web._http2.H2Connection", "_tryToWriteControlData"),
    ("twisted.web._http2.H2Connection", "_terminate"),
    ("twisted.web._http2.H2Connection", "openStreamWindow"),
    ("twisted.web._http2.H2Connection", "abortRequest"),
    ("twisted.web._http2.H2Connection", "endRequest"),
    ("twisted.web._http2.H2Connection", "connectionLost"),
    ("twisted.web._http2.H2Connection", "_bufferedControlFrames"),
    ("twisted.web._http2.H2Connection", "_bufferedControlFrameBytes"),
    ("twisted.web._http2.H2Connection", "_maxBufferedControlFrameBytes"),
    ("twisted.web._http2.H2Connection", "_consumerBlocked"),
    ("twisted.web._http2.H2Connection", "_sendPrioritisedData"),
    ("twisted.web._http2.H2Connection", "_sendingDeferred"),
    ("twisted.web._http2.H2Connection", "_outboundStreamQueues"),
    ("twisted.web._http2.H2Connection", "priority"),
    ("twisted.web._http2", "_END_STREAM_SENTINEL"),
    ("twisted.web._http2.H2Stream", "_request"),
    ("twisted.web._http2.H2Stream", "connectionLost"),
    ("h2.connection.H2Connection", "MAX_CLOSED_STREAMS"),
)

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


class _StateMachine(h2.connection.H2Connection):
    # h2's connection, remembering fewer closed streams (see above).
    MAX_CLOSED_STREAMS = MAX_CLOSED_STREAMS


class LimitedH2Connection(H2Connection):
    """
    Twisted's HTTP/2 connection with the limits above.  Made by
    L{rendezvous_twisted.http.wire} when TLS negotiated "h2".  Given a
    C{refusal} (the connection was refused at the caps), its first stream
    is answered with it, then GOAWAY.
    """

    _log = Logger()
    #: Set by the switch before the connection is made, as Twisted's own
    #: switch does.
    requestFactory: Any = None

    def __init__(self, site: H2Site, limits: Limits, refusal: Refusal | None = None) -> None:
        super().__init__(site.reactor)  # type: ignore[no-untyped-call]
        self._site = site
        self._limits = limits
        self._refusal = refusal
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = _StateMachine(config=config)
        # Enforced at once, whatever the peer has seen of our settings: a
        # header list over the limit is refused on its stream (_new_stream);
        # h2's decoder stops only one inflated far past it.
        self.conn.decoder.max_header_list_size = DECODED_HEADER_SLACK * limits.max_header_bytes
        # Our own deadlines replace Twisted's idle timeout (which would cut
        # a parked long-poll that sends nothing for that long).
        self.timeOut = None
        #: The frame header being read, and what is left of the frame.
        self._preface_left = _PREFACE_LENGTH
        self._frame_head = bytearray()
        self._payload_left = 0
        #: The stream of a header block still arriving (0: none), its bytes,
        #: and whether the frame being read ends it.
        self._block_stream = 0
        self._block_bytes = 0
        self._block_ends = False
        #: Flow-controlled bytes received on each stream, given back to
        #: the connection's window once the stream is forgotten.
        self._held: dict[int, int] = {}
        #: Streams whose body is still coming, and their deadline.
        self._receiving: dict[int, IDelayedCall | None] = {}
        #: Open streams whose answer is complete, waiting to be sent (on a
        #: window the client keeps shut, for as long as it does).
        self._answered: set[int] = set()
        self._header_deadline: IDelayedCall | None = None
        self._idle_deadline: IDelayedCall | None = None
        self._idle_since: float | None = None
        self._abort_call: IDelayedCall | None = None
        self._closing = False
        self._dropped = 0
        self._reset_tokens = float(RESET_BURST)
        self._reset_stamp = 0.0
        self._idle_waiters: list[Callable[[], None]] = []

    # Connection life.

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        # The window is h2's to keep: it counts what the peer may send.
        self.conn.update_settings(
            {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._limits.max_body_bytes + 1}
        )
        window = connection_window(self._limits.max_body_bytes)
        if window > DEFAULT_WINDOW:
            self.conn.increment_flow_control_window(window - DEFAULT_WINDOW)
        self._flush()
        # The stream cap and the header list limit go out in a SETTINGS
        # frame of our own, so that h2 never enforces them: it would answer
        # a stream past the cap, or a list past the limit, by closing the
        # whole connection (parked long-polls and all), where RFC 9113 5.1.2
        # asks for a refusal of that stream alone.  _new_stream refuses
        # them, once h2 has decoded their block (HPACK's table is shared by
        # every stream).  The peer's ACK of this frame changes nothing in h2.
        settings = SettingsFrame(
            0,
            settings={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._limits.max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._limits.max_header_bytes,
            },
        )
        assert self.transport is not None
        self.transport.write(settings.serialize())
        self._reset_stamp = self._site.reactor.seconds()
        self._became_idle()
        if self._refusal is not None:
            # A refused connection gets no more time than a request's
            # headers would.
            self._arm_header_deadline()

    def connectionLost(  # type: ignore[override]
        self,
        reason: Failure,
        _cancelTimeouts: bool = True,  # noqa: N803 - Twisted's name
    ) -> None:
        if _cancelTimeouts:
            self._cancel_timers()
            if self._abort_call is not None and self._abort_call.active():
                self._abort_call.cancel()
            self._abort_call = None
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)  # type: ignore[no-untyped-call]

    def _cancel_timers(self) -> None:
        for call in (self._header_deadline, self._idle_deadline, *self._receiving.values()):
            if call is not None and call.active():
                call.cancel()
        self._header_deadline = self._idle_deadline = None
        self._receiving.clear()

    @property
    def busy(self) -> bool:
        """
        Whether a stream is open (a request being received or answered).
        """
        return bool(self.streams)

    def when_idle(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once no stream is open (at once if none is).
        """
        if not self.streams:
            callback()
        else:
            self._idle_waiters.append(callback)

    def close_gracefully(self) -> None:
        """
        Say GOAWAY (no error) and close once what is written has gone: for
        an idle connection on a graceful stop.
        """
        self._shut("the server is stopping", h2.errors.ErrorCodes.NO_ERROR)

    # Reading.

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            self._drop(len(data))
            return
        passed, refused_stream = self._screen(data)
        try:
            events = self.conn.receive_data(passed) if passed else []
        except h2.exceptions.ProtocolError as e:
            self._log.info(
                "closing an HTTP/2 connection from {client}: {error}",
                client=self._client(),
                error=str(e) or type(e).__name__,
            )
            self._site.refused("malformed")
            self._shut("protocol error", None)
            return
        self._dispatch(events)
        if self._closing:
            return
        if refused_stream:
            self._refuse_block(refused_stream)
            return
        self._tryToWriteControlData()
        self._update_deadlines()

    def _screen(self, data: bytes) -> tuple[bytes, int]:
        """
        Follow the frames in C{data} (their headers only) and count each
        header block's bytes.  Return the bytes h2 may read, and the stream
        of a header block that passed the limit (0 if none): the bytes
        returned then stop where its frame begins.
        """
        view = memoryview(data)
        size = len(data)
        i = 0
        limit = self._limits.max_header_bytes
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
                    self._block_stream = 0
                    self._block_ends = False
                continue
            take = view[i : i + 9 - len(self._frame_head)]
            self._frame_head += take
            i += len(take)
            if len(self._frame_head) < 9:
                break
            head = bytes(self._frame_head)
            self._frame_head.clear()
            length = int.from_bytes(head[0:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if kind == _HEADERS:
                self._block_stream = stream
                self._block_bytes = length
            elif kind == _CONTINUATION and self._block_stream:
                self._block_bytes += length
            if kind in (_HEADERS, _CONTINUATION) and self._block_stream:
                if self._block_bytes > limit:
                    return data[: max(0, i - 9)], self._block_stream
                self._block_ends = bool(flags & _END_HEADERS)
                if self._block_ends and not length:
                    self._block_stream = 0
                    self._block_ends = False
            self._payload_left = length
        return data, 0

    def _dispatch(self, events: list[h2.events.Event]) -> None:
        """
        Hand h2's events to Twisted's handlers, leaving out every stream
        the peer reset in the same read (h2 reads a whole read's frames
        before any is handled: a request made for such a stream would be
        answered on a stream that is already gone).
        """
        reset_now = {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
        for event in events:
            if self._closing:
                return
            if isinstance(event, h2.events.RequestReceived):
                self._new_stream(event, event.stream_id in reset_now)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.StreamEnded):
                if event.stream_id in self.streams:
                    self._stop_receiving(event.stream_id)
                    self._requestEnded(event)  # type: ignore[no-untyped-call]
            elif isinstance(event, h2.events.StreamReset):
                self._stream_reset(event)
            elif isinstance(event, h2.events.WindowUpdated):
                self._handleWindowUpdate(event)  # type: ignore[no-untyped-call]
                self._wake_sender()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._log.debug("the HTTP/2 client {client} said GOAWAY", client=self._client())
                self._shut("the peer sent GOAWAY", None)
            # PRIORITY is left out: RFC 9113 deprecates it, and Twisted's
            # handler would grow its tree for every stream id named.

    def _new_stream(self, event: h2.events.RequestReceived, reset: bool) -> None:
        stream_id = event.stream_id
        if reset:
            return
        if self._refusal is not None:
            refusal = self._refusal
            self._refusal = None
            self._final_answer(
                stream_id, refusal.status, refusal.errcode, refusal.message, refusal.headers
            )
            return
        if len(self.streams) >= self._limits.max_streams:
            self._log.debug(
                "refusing an HTTP/2 stream from {client}: {count} open",
                client=self._client(),
                count=len(self.streams),
            )
            self._site.refused("streams")
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        listed = sum(32 + len(name) + len(value) for name, value in event.headers)
        if listed > self._limits.max_header_bytes:
            self._log.info(
                "refusing an HTTP/2 request from {client}: a header list of {size} bytes",
                client=self._client(),
                size=listed,
            )
            self._site.refused("too_large")
            self._answer_stream(
                stream_id,
                431,
                "M_TOO_LARGE",
                f"the request's header list is over {self._limits.max_header_bytes} bytes",
            )
            return
        fields = sum(1 for name, _ in event.headers if not name.startswith(b":"))
        if fields > self._limits.max_headers:
            self._log.info(
                "refusing an HTTP/2 request from {client}: {fields} header fields",
                client=self._client(),
                fields=fields,
            )
            self._site.refused("too_large")
            self._answer_stream(
                stream_id,
                431,
                "M_TOO_LARGE",
                f"the request has over {self._limits.max_headers} header fields",
            )
            return
        self._idle_since = None
        if event.stream_ended is None:
            self._receiving[stream_id] = None
        self._requestReceived(event)  # type: ignore[no-untyped-call]

    def _data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        size = event.flow_controlled_length or 0
        if stream_id not in self.streams:
            # Not held by any request: give its window back at once.
            if size:
                self.conn.acknowledge_received_data(size, stream_id)
            return
        self._held[stream_id] = self._held.get(stream_id, 0) + size
        self._requestDataReceived(event)  # type: ignore[no-untyped-call]

    def openStreamWindow(self, streamID: int, increment: int) -> None:  # noqa: N803
        # Twisted re-opens a stream's window (and the connection's) as soon
        # as its data is handed to the request.  Here a stream's window is
        # never re-opened (it holds one whole body), and the connection's
        # only once a stream is forgotten, in _requestDone.
        pass

    def _sendPrioritisedData(self, *args: object) -> None:
        # Twisted's sending loop leaves a stream whose window is shut in its
        # priority tree, and so picks it again at once, sends nothing and
        # calls itself again, for as long as the peer keeps its window shut:
        # a core's worth of CPU per such peer.  Here such a stream is
        # blocked until a WINDOW_UPDATE (which wakes the loop).
        for stream_id, queue in self._outboundStreamQueues.items():
            shut = queue and self.conn.local_flow_control_window(stream_id) <= 0
            if shut and queue[0] is not _END_STREAM_SENTINEL:
                self.priority.block(stream_id)
        super()._sendPrioritisedData(*args)  # type: ignore[no-untyped-call]

    def _wake_sender(self) -> None:
        """
        Restart Twisted's sending loop if it waits for data while a stream
        it could send on again has some.
        """
        waiting = self._sendingDeferred
        if waiting is not None and any(
            queue and self.conn.local_flow_control_window(stream_id) > 0
            for stream_id, queue in self._outboundStreamQueues.items()
        ):
            self._sendingDeferred = None
            waiting.callback(None)

    def _stream_reset(self, event: h2.events.StreamReset) -> None:
        stream_id = event.stream_id
        if not self._spend_reset_token():
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self._log.debug(
            "HTTP/2 stream reset by {client} ({code})",
            client=self._client(),
            code=str(event.error_code),
        )
        stream.connectionLost(Failure(ConnectionLost(f"stream reset ({event.error_code})")))
        if stream_id in self.streams:
            self._requestDone(stream_id)

    def _spend_reset_token(self) -> bool:
        now = self._site.reactor.seconds()
        elapsed = max(0.0, now - self._reset_stamp)
        self._reset_stamp = now
        self._reset_tokens = min(RESET_BURST, self._reset_tokens + elapsed * RESET_PER_SECOND)
        if self._reset_tokens >= 1:
            self._reset_tokens -= 1
            return True
        self._log.info(
            "closing an HTTP/2 connection from {client}: too many stream resets",
            client=self._client(),
        )
        self._site.refused("resets")
        self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._shut("too many stream resets", None)
        return False

    def endRequest(self, streamID: int) -> None:  # noqa: N803
        super().endRequest(streamID)  # type: ignore[no-untyped-call]
        self._answered.add(streamID)
        if self._idle_since is None and self._answered.issuperset(self.streams):
            # Every open stream is answered: what is left is the client's to
            # take.  A client whose window stays shut held its connection
            # (and a place under the connection caps) for ever; the idle
            # timeout runs from now, as it does once no stream is open.
            self._idle_since = self._site.reactor.seconds()
            if self._idle_deadline is None and not self._closing:
                self._idle_deadline = self._site.reactor.callLater(
                    self._limits.idle_timeout_seconds, self._idle_check
                )

    def _requestDone(self, streamID: int) -> None:  # noqa: N803
        super()._requestDone(streamID)  # type: ignore[no-untyped-call]
        self._answered.discard(streamID)
        receiving = streamID in self._receiving
        self._stop_receiving(streamID)
        held = self._held.pop(streamID, 0)
        if not self._closing:
            if receiving:
                # Answered before its body was all in (408, 413): ask the
                # client to stop sending it (RFC 9113 8.1).
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.reset_stream(streamID, h2.errors.ErrorCodes.NO_ERROR)
            if held:
                # The stream is closed: this opens the connection's window.
                self.conn.acknowledge_received_data(held, streamID)
            self._tryToWriteControlData()
        if not self.streams:
            self._became_idle()

    def _stop_receiving(self, stream_id: int) -> None:
        call = self._receiving.pop(stream_id, None)
        if call is not None and call.active():
            call.cancel()

    # Deadlines.

    def _update_deadlines(self) -> None:
        if self._block_stream:
            if self._header_deadline is None:
                self._arm_header_deadline()
        elif self._header_deadline is not None and self._refusal is None:
            if self._header_deadline.active():
                self._header_deadline.cancel()
            self._header_deadline = None
        seconds = self._limits.body_timeout_seconds
        for stream_id, call in self._receiving.items():
            if call is None:
                self._receiving[stream_id] = self._site.reactor.callLater(
                    seconds, self._body_too_slow, stream_id
                )

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self._site.reactor.callLater(
            self._limits.header_timeout_seconds, self._headers_too_slow
        )

    def _became_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter()
        if self._closing:
            return
        self._idle_since = self._site.reactor.seconds()
        if self._idle_deadline is None:
            self._idle_deadline = self._site.reactor.callLater(
                self._limits.idle_timeout_seconds, self._idle_check
            )

    def _idle_check(self) -> None:
        # One timer for the whole connection, moved on rather than
        # cancelled and armed again around each stream.
        self._idle_deadline = None
        if self._closing or self._idle_since is None:
            return
        seconds = self._limits.idle_timeout_seconds
        left = self._idle_since + seconds - self._site.reactor.seconds()
        if left > 0 or self._block_stream:
            self._idle_deadline = self._site.reactor.callLater(
                max(left, 0.001) if left > 0 else seconds, self._idle_check
            )
            return
        self._log.info(
            "closing an HTTP/2 connection from {client}: {what} in {seconds}s",
            client=self._client(),
            what="its answers not taken" if self.streams else "no request",
            seconds=seconds,
        )
        self._shut("idle", h2.errors.ErrorCodes.NO_ERROR)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._closing:
            return
        seconds = self._limits.header_timeout_seconds
        self._log.info(
            "closing an HTTP/2 connection from {client}: request headers not complete in "
            "{seconds}s",
            client=self._client(),
            seconds=seconds,
        )
        self._site.refused("slow")
        stream = self._block_stream
        if self._refusal is not None or not stream:
            # Nothing asked (a refused connection that never asked): GOAWAY.
            self._shut("headers too slow", h2.errors.ErrorCodes.NO_ERROR)
            return
        unit = "second" if seconds == 1 else "seconds"
        self._final_answer(
            stream,
            408,
            "M_REQUEST_TIMEOUT",
            f"the request headers did not arrive within {seconds:g} {unit}",
            (),
        )

    def _body_too_slow(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or self._closing:
            return
        seconds = self._limits.body_timeout_seconds
        self._log.info(
            "answering an HTTP/2 stream from {client} 408: body not complete in {seconds}s",
            client=self._client(),
            seconds=seconds,
        )
        self._site.refused("slow")
        request = stream._request
        refuse = getattr(request, "refuse_on_stream", None)
        if refuse is not None and not request.finished:
            # Once the 408 is sent, the stream (still in _receiving, its
            # deadline spent) is reset so that the client stops sending.
            unit = "second" if seconds == 1 else "seconds"
            refuse(
                408,
                "M_REQUEST_TIMEOUT",
                f"the request body did not arrive within {seconds:g} {unit}",
            )
        else:
            self.abortRequest(stream_id)  # type: ignore[no-untyped-call]

    def _answer_stream(self, stream_id: int, status: int, errcode: str, message: str) -> None:
        """
        Answer a stream that no request was made for with a JSON error, and
        reset it if the client is still sending: the connection goes on.
        """
        fields, body = self._site.error_answer(status, errcode, message, ())
        block = [(b":status", b"%d" % status), *((k.lower(), v) for k, v in fields)]
        fits = len(body) <= self.conn.local_flow_control_window(stream_id)
        self.conn.send_headers(stream_id, block, end_stream=not fits)
        if fits:
            self.conn.send_data(stream_id, body, end_stream=True)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            # Closed already when the client had ended its request.
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    # Refusals the connection makes for a stream h2 has no state for.

    def _refuse_block(self, stream_id: int) -> None:
        limit = self._limits.max_header_bytes
        self._log.info(
            "closing an HTTP/2 connection from {client}: a header block over {limit} bytes",
            client=self._client(),
            limit=limit,
        )
        self._site.refused("too_large")
        self._final_answer(
            stream_id,
            431,
            "M_TOO_LARGE",
            f"the request header fields are over {limit} bytes",
            (),
        )

    def _final_answer(
        self,
        stream_id: int,
        status: int,
        errcode: str,
        message: str,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> None:
        """
        Answer stream C{stream_id} with a JSON error, then GOAWAY naming it
        as the last stream, and close: for a stream the connection cannot go
        on from (a header block left unread breaks HPACK's shared state) or
        the first stream of a refused connection.  Built here, as h2 keeps
        no state for a stream whose headers it has not read.
        """
        self._flush()
        fields, body = self._site.error_answer(status, errcode, message, headers)
        block = [(b":status", b"%d" % status), *((k.lower(), v) for k, v in fields)]
        frames = HeadersFrame(stream_id)
        frames.data = self.conn.encoder.encode(block)
        frames.flags.add("END_HEADERS")
        room = min(
            self.conn.outbound_flow_control_window,
            self.conn.remote_settings.initial_window_size,
            self.conn.max_outbound_frame_size,
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
        goaway.last_stream_id = max(stream_id, self.conn.highest_inbound_stream_id)
        goaway.error_code = h2.errors.ErrorCodes.NO_ERROR
        out.append(goaway.serialize())
        assert self.transport is not None
        self.transport.write(b"".join(out))
        self._shut(f"answered {status}", None)

    # Closing.

    def _shut(self, reason: str, goaway: h2.errors.ErrorCodes | None) -> None:
        """
        Close: GOAWAY with C{goaway} (None: already queued or written),
        write what is pending, and from then on drop what the peer sends.
        The TLS transport is let go at once, and aborted if the peer does
        not close within the header deadline.
        """
        if self._closing:
            return
        self._closing = True
        self._cancel_timers()
        if goaway is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(error_code=goaway)
        self._flush()
        transport: Any = self.transport
        if transport is not None:
            # TLS waits for its producer to unregister before it closes.
            with contextlib.suppress(RuntimeError):
                transport.unregisterProducer()
            transport.loseConnection()
            self._abort_call = self._site.reactor.callLater(
                self._limits.header_timeout_seconds, self._abort, "it did not close"
            )
        super().connectionLost(  # type: ignore[no-untyped-call]
            Failure(ConnectionLost(reason)), _cancelTimeouts=False
        )

    def _terminate(self, reason: Failure) -> None:
        # Twisted's own way out (a protocol error it found): ours.
        self._shut(str(reason.value), None)

    def _drop(self, size: int) -> None:
        self._dropped += size
        if self._dropped > MAX_BYTES_AFTER_CLOSE:
            self._abort("it kept sending after GOAWAY")

    def _abort(self, why: str) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        transport: Any = self.transport
        if transport is None or getattr(transport, "_aborted", False):
            return
        self._log.info(
            "aborting an HTTP/2 connection from {client}: {why}",
            client=self._client(),
            why=why,
        )
        transport.abortConnection()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def _tryToWriteControlData(self) -> bool:
        # Twisted's, but a peer that does not read its PING and SETTINGS
        # acknowledgements is closed with an info line, not an error one:
        # it is the peer's doing.
        data = self.conn.data_to_send()
        if not data:
            return True
        if self._consumerBlocked is None and not self._bufferedControlFrames:
            assert self.transport is not None
            self.transport.write(data)
            return True
        self._bufferedControlFrames.append(data)
        self._bufferedControlFrameBytes += len(data)
        if self._bufferedControlFrameBytes >= self._maxBufferedControlFrameBytes:
            self._abort("it does not read what it asked for")
            self.connectionLost(Failure(ConnectionLost("control frames not read")))
            return False
        return True

    def _client(self) -> str:
        transport = self.transport
        return peer_host(transport.getPeer() if transport is not None else None) or "-"
