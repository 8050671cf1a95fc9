"""
HTTP/2 (TLS with ALPN "h2") under the same limits as HTTP/1.1.

Twisted's C{H2Connection} serves HTTP/2 with h2's default settings (100
streams a connection, 64 KiB header lists, windows re-opened as soon as
data arrives) and with no deadline for a body or a header block.  The
subclass here bounds everything a client can make one connection hold, as
L{rendezvous_twisted.http.http2_limits} lists (with the counting that needs
no private name).

A stream the client resets is a normal event: its request sees its
connection lost (a parked long-poll frees its store waiter through the
route's cancelled Deferred) and at most a debug line is logged.

The fence: C{twisted.web._http2} is private ("early draft" in its own
words), and this is the one module that uses it.  With
L{rendezvous_twisted.http.http2_limits} (the h2 side: h2 beyond its
documented API is used there alone) it makes the fenced family:
L{PRIVATE_NAMES} lists every such name the two rely on;
tests/test_http2_fence.py fails loudly if one of them changes, and
pyproject.toml pins the Twisted and h2 versions this was tested with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection

from rendezvous_twisted.http.answers import Refusal
from rendezvous_twisted.http.clients import peer_host
from rendezvous_twisted.http.http2_limits import (
    MAX_BYTES_AFTER_CLOSE,
    BodyDeadlines,
    H2Site,
    HeaderBlocks,
    IdleTimer,
    Limits,
    ResetBucket,
    answer_stream,
    connection_window,
    final_answer,
    open_windows,
    oversize,
    settings_frame,
    state_machine,
    too_slow,
)

__all__ = ["PRIVATE_NAMES", "H2Site", "LimitedH2Connection", "Limits", "connection_window"]

#: Every private name (and h2 internal) this module and http2_limits rely
#: on, checked by tests/test_http2_fence.py: (owner, attribute).
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
    ("twisted.web._http2.H2Connection", "_log"),
    ("twisted.web._http2", "_END_STREAM_SENTINEL"),
    ("twisted.web._http2.H2Stream", "_request"),
    ("twisted.web._http2.H2Stream", "connectionLost"),
    ("twisted.protocols.tls.TLSMemoryBIOProtocol", "_aborted"),
    ("h2.connection.H2Connection", "MAX_CLOSED_STREAMS"),
    ("h2.connection.H2Connection", "encoder"),
    ("h2.connection.H2Connection", "decoder"),
)


class LimitedH2Connection(H2Connection):
    """
    Twisted's HTTP/2 connection with the limits L{http2_limits} lists.  Made by
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
        self.conn = state_machine(limits)
        # Our own deadlines replace Twisted's idle timeout (which would cut
        # a parked long-poll that sends nothing for that long).
        self.timeOut = None
        self._blocks = HeaderBlocks(limits.max_header_bytes)
        #: Flow-controlled bytes received on each stream, given back to
        #: the connection's window once the stream is forgotten.
        self._held: dict[int, int] = {}
        self._bodies = BodyDeadlines(site.reactor, limits.body_timeout_seconds, self._body_too_slow)
        #: Open streams whose answer is complete, waiting to be sent (on a
        #: window the client keeps shut, for as long as it does).
        self._answered: set[int] = set()
        self._header_deadline: IDelayedCall | None = None
        self._idle = IdleTimer(
            site.reactor, limits.idle_timeout_seconds, self._idle_expired, self._in_block
        )
        self._abort_call: IDelayedCall | None = None
        self._closing = False
        self._dropped = 0
        self._resets = ResetBucket(0.0)
        self._idle_waiters: list[Callable[[], None]] = []

    # Connection life.

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        open_windows(self.conn, self._limits)
        self._flush()
        assert self.transport is not None
        self.transport.write(settings_frame(self._limits))
        self._resets = ResetBucket(self._site.reactor.seconds())
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
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None
        self._idle.cancel()
        self._bodies.cancel()

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
        passed, refused_stream = self._blocks.screen(data)
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
                    self._bodies.stop(event.stream_id)
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
        too_large = oversize(event.headers, self._limits)
        if too_large is not None:
            self._log.info(
                "refusing an HTTP/2 request from {client}: " + too_large.log_format,
                client=self._client(),
                **too_large.log_fields,
            )
            self._site.refused("too_large")
            self._answer_stream(stream_id, 431, "M_TOO_LARGE", too_large.message)
            return
        self._idle.stop()
        if event.stream_ended is None:
            self._bodies.expect(stream_id)
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
        if self._resets.spend(self._site.reactor.seconds()):
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
        if not self._idle.idle and self._answered.issuperset(self.streams):
            # Every open stream is answered: what is left is the client's to
            # take.  A client whose window stays shut held its connection
            # (and a place under the connection caps) for ever; the idle
            # timeout runs from now, as it does once no stream is open.
            self._idle.start(arm=not self._closing)

    def _requestDone(self, streamID: int) -> None:  # noqa: N803
        super()._requestDone(streamID)  # type: ignore[no-untyped-call]
        self._answered.discard(streamID)
        receiving = self._bodies.stop(streamID)
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

    # Deadlines.

    def _update_deadlines(self) -> None:
        if self._blocks.stream:
            if self._header_deadline is None:
                self._arm_header_deadline()
        elif self._header_deadline is not None and self._refusal is None:
            if self._header_deadline.active():
                self._header_deadline.cancel()
            self._header_deadline = None
        self._bodies.arm()

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
        self._idle.start()

    def _in_block(self) -> bool:
        return bool(self._blocks.stream)

    def _idle_expired(self) -> None:
        if self._closing:
            return
        seconds = self._limits.idle_timeout_seconds
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
        stream = self._blocks.stream
        if self._refusal is not None or not stream:
            # Nothing asked (a refused connection that never asked): GOAWAY.
            self._shut("headers too slow", h2.errors.ErrorCodes.NO_ERROR)
            return
        self._final_answer(stream, 408, "M_REQUEST_TIMEOUT", too_slow("headers", seconds), ())

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
            # Once the 408 is sent, the stream (still in _bodies, its
            # deadline spent) is reset so that the client stops sending.
            refuse(408, "M_REQUEST_TIMEOUT", too_slow("body", seconds))
        else:
            self.abortRequest(stream_id)  # type: ignore[no-untyped-call]

    def _answer_stream(self, stream_id: int, status: int, errcode: str, message: str) -> None:
        """
        Answer a stream that no request was made for with a JSON error, and
        reset it if the client is still sending: the connection goes on.
        """
        fields, body = self._site.error_answer(status, errcode, message, ())
        answer_stream(self.conn, stream_id, status, fields, body)

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
        as the last stream, and close (L{final_answer}).
        """
        self._flush()
        fields, body = self._site.error_answer(status, errcode, message, headers)
        assert self.transport is not None
        self.transport.write(final_answer(self.conn, stream_id, status, fields, body))
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
