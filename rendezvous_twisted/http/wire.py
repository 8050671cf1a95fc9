"""
One connection's protocol: HTTP/1.1, or HTTP/2 when TLS negotiated "h2"
with ALPN; and the site's connection (L{SiteConnection}), admitted or
refused at the caps as it is made, and counted until it is lost.

Twisted's own switch (C{twisted.web.http._GenericHTTPChannelProtocol}) is
private, and reaching into it took more private names (its channel, its
site, the HTTP/1.1 channel's producer) than this does with public ones: the
transport's C{negotiatedProtocol}, C{unregisterProducer} and
C{registerProducer}, and the channel's C{setTimeout}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IAddress, IProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import http

from rendezvous_twisted.http.answers import Refusal
from rendezvous_twisted.http.channel import RendezvousChannel

try:
    from rendezvous_twisted.http import http2
except ImportError:  # pragma: no cover - without the http2 extra
    http2 = None  # type: ignore[assignment]

#: Whether HTTP/2 can be served (h2 and priority are importable).
H2_AVAILABLE = http2 is not None

__all__ = [
    "H2_AVAILABLE",
    "Admitted",
    "ConnectionSite",
    "SiteConnection",
    "SwitchingProtocol",
    "connectionDone",
    "http2",
]


class SwitchingProtocol(Protocol):
    """
    Serve a connection with C{channel} (HTTP/1.1) until its first bytes;
    then, if TLS negotiated "h2", with the HTTP/2 connection
    C{make_h2()} builds instead, for good.  The site's attributes
    (C{factory}, C{site}, C{requestFactory}, C{timeOut}, C{callLater}) go
    to the HTTP/1.1 channel; the HTTP/2 connection is built with its own.
    """

    def __init__(self, channel: http.HTTPChannel) -> None:
        self.channel: IProtocol = channel
        self.http11 = channel
        self.http2: http2.LimitedH2Connection | None = None
        self._decided = False

    # What Site.buildProtocol sets on its protocol, for the HTTP/1.1 channel.

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CHANNEL_ATTRIBUTES:
            setattr(self.http11, name, value)
        super().__setattr__(name, value)

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connected = 1
        self.http11.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.http2 is None and getattr(self.transport, "disconnecting", False):
            # The HTTP/1.1 channel answered and is closing (a TLS transport
            # goes on delivering what the peer sends until the peer closes):
            # nothing more is read, and a connection that never spoke stays
            # with that channel, whose timers would outlive a switch.
            self._decided = True
            return
        if not self._decided:
            self._decided = True
            if self.negotiated() == b"h2" and H2_AVAILABLE:
                self._switch()
        self.channel.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = 0
        self.channel.connectionLost(reason)

    def negotiated(self) -> bytes | None:
        """
        The protocol ALPN picked, None on a transport without TLS (or
        before its handshake is done).
        """
        protocol: bytes | None = getattr(self.transport, "negotiatedProtocol", None)
        return protocol

    def make_h2(self) -> http2.LimitedH2Connection:
        """
        The HTTP/2 connection to switch to: overridden by the site's
        protocol, which knows the limits.
        """
        raise NotImplementedError

    def _switch(self) -> None:
        transport: Any = self.transport
        assert transport is not None
        # The HTTP/1.1 channel made itself the transport's producer and
        # armed its timeouts; it never sees another byte.
        transport.unregisterProducer()
        self.http11.setTimeout(None)
        self.switching()
        connection = self.make_h2()
        channel: Any = self.http11
        connection.requestFactory = channel.requestFactory
        connection.site = channel.site
        connection.factory = channel.factory
        self.channel = self.http2 = connection
        connection.makeConnection(transport)  # type: ignore[no-untyped-call]
        # The HTTP/2 connection is the transport's producer, so that the
        # transport can tell it to stop when the peer does not read.
        transport.registerProducer(connection, True)

    def switching(self) -> None:
        """
        Called as the connection switches to HTTP/2, before the HTTP/2
        connection is made.
        """

    # What a graceful stop asks of a connection.

    def busy(self) -> bool:
        """
        Whether a request is being received or answered on it.
        """
        if self.http2 is not None:
            return self.http2.busy
        # An answered request may stay in the queue while the transport
        # writes what it holds (see RendezvousChannel.requestDone): it is
        # no longer asked or answered.
        return any(not request.finished for request in self.http11.requests)

    def when_idle(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once no request is open on an HTTP/2 connection (an
        HTTP/1.1 one says so by ending its request).
        """
        if self.http2 is not None:
            self.http2.when_idle(callback)

    def close_idle(self) -> None:
        """
        Close a connection with nothing open on it, letting its transport
        write what it holds first; HTTP/2 says GOAWAY.
        """
        if self.http2 is not None:
            self.http2.close_gracefully()
        else:
            self.http11.loseConnection()


_CHANNEL_ATTRIBUTES = frozenset(("factory", "site", "requestFactory", "timeOut", "callLater"))


@dataclass(frozen=True, slots=True)
class Admitted:
    """
    A connection admitted at the caps, counted under C{key} (None for
    trusted proxies and peers without an IP address) until released.
    """

    key: str | None


class ConnectionSite(TypingProtocol):
    """
    What a connection needs of its site.
    """

    def admit(self, peer: IAddress) -> Admitted | Refusal:
        """
        Count a new connection from C{peer}, or say how it is refused.
        """

    def release(self, key: str | None) -> None:
        """
        Forget a connection that L{admit} counted under C{key}.
        """

    def wait_refused(self) -> bool:
        """
        Whether a refused connection may wait for its request before it is
        answered (L{done_waiting} must follow), rather than be answered at once.
        """

    def done_waiting(self) -> None:
        """
        A refused connection that waited is gone.
        """

    def make_h2(self, refusal: Refusal | None) -> Any:
        """
        The HTTP/2 connection to switch to.
        """

    def connection_lost(self, connection: SiteConnection) -> None:
        """
        A connection is gone.
        """


class SiteConnection(SwitchingProtocol):
    """
    One connection: HTTP/1.1 through L{RendezvousChannel}, or HTTP/2 (when
    TLS negotiated "h2") through L{http2.LimitedH2Connection}, which bounds
    its streams, header blocks, bodies and deadlines.  It lives as long as
    its connection, across the switch, so it is what the site counts
    against the connection caps (admitted when made, released when lost)
    and what tells the site when its connection is gone, so that a graceful
    stop knows what is still open.

    A connection refused at the caps is answered with its L{Refusal} once
    it has asked: over HTTP/1.1 by its channel, after the request's head;
    over HTTP/2 on its first stream, then GOAWAY, within the header
    deadline.
    """

    #: Whether this connection was admitted and is counted by the site.
    _admitted = False
    #: The key it is counted under per address; None for trusted proxies
    #: and peers without an IP address.
    _connection_key: str | None = None
    #: Whether it was refused and counted among those waiting for their
    #: request (L{http1.Admission.wait}) until it is lost.
    _waiting = False
    #: A refused TLS connection's refusal, for its first HTTP/2 stream should
    #: it speak HTTP/2.
    _refusal: Refusal | None = None

    http11: RendezvousChannel
    site: ConnectionSite

    def makeConnection(self, transport: Any) -> None:
        site = self.site
        admission = site.admit(transport.getPeer())
        refusal = None
        if isinstance(admission, Admitted):
            self._admitted = True
            self._connection_key = admission.key
        else:
            refusal = admission
        super().makeConnection(transport)
        if refusal is not None:
            self._waiting = site.wait_refused()
            if self._waiting and H2_AVAILABLE and hasattr(transport, "negotiatedProtocol"):
                # TLS: which protocol it speaks is known with its first
                # bytes.  Until then the HTTP/1.1 channel waits, within its
                # header deadline.
                self._refusal = refusal
            self.http11.refuse(refusal, self._waiting)

    def dataReceived(self, data: bytes) -> None:
        if not self._admitted and self.http2 is None:
            waiting = self.http11._refusal
            pending = waiting is not None and not waiting.answered
            if self._refusal is not None and pending and self.negotiated() == b"h2":
                # Its first stream gets the refusal (see make_h2).
                super().dataReceived(data)
                return
            # The HTTP/1.1 channel waits for the request's head and answers;
            # nothing it sends is ever served.
            self._refusal = None
            self.http11.dataReceived(data)
            return
        super().dataReceived(data)

    def switching(self) -> None:
        # The HTTP/1.1 channel is put away, never to see connectionLost:
        # its deadline would write an HTTP/1.1 408 into HTTP/2.
        self.http11.stop_deadlines()

    def make_h2(self) -> Any:
        refusal, self._refusal = self._refusal, None
        return self.site.make_h2(refusal)

    def close_idle(self) -> None:
        waiting = self.http11._refusal if self.http2 is None else None
        if waiting is not None and not waiting.answered:
            # Refused, and still waiting for its request: answered, not dropped.
            self.http11.answer_refusal()
            return
        super().close_idle()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            site = self.site
            if self._admitted:
                self._admitted = False
                site.release(self._connection_key)
            if self._waiting:
                self._waiting = False
                site.done_waiting()
            site.connection_lost(self)
