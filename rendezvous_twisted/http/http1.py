"""
HTTP/1.1's edges: the rules of RFC 9110 and RFC 9112 that twisted.web
leaves to its users, kept apart from the routes.  Which request targets and
Hosts a request may carry (checked for HTTP/2 requests too, which Twisted
hands over in the same form), what a chunked body announces before its
bytes come, and which connections the caps admit (and how a refused one
waits for its request before it is answered).

Nothing here writes to a transport or knows a Klein route: the channel
(L{rendezvous_twisted.http.channel}) and the request
(L{rendezvous_twisted.http.request}) call these, and answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from twisted.web.http_headers import Headers

from rendezvous_twisted.http.answers import Refusal

#: The one request target that is not a path: OPTIONS about the server as a
#: whole (RFC 9112 3.2.4).
ASTERISK = b"*"

# uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): an IP-literal in
# brackets, or a reg-name / IPv4address of unreserved, pct-encoded and
# sub-delims characters, which may be empty.  Nothing else is a host.
_HOST_FIELD = re.compile(
    rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=%-]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?\Z"
)
# absolute-form (RFC 9112 3.2.2): scheme "://" authority, then the path and
# query, if any.  The scheme is matched case-insensitively (RFC 3986 3.1).
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)\Z", re.DOTALL)


class TargetError(ValueError):
    """
    A request target or Host that no request to this server may carry; its
    message says why, for the 400 that answers it.
    """


class Target(NamedTuple):
    """
    A request target as the server routes it: C{path} is in origin-form
    (with any query) or is L{ASTERISK}; C{authority} is the host an
    absolute-form target named, which stands for the request's Host.
    """

    path: bytes
    authority: bytes | None = None


def parse_target(method: bytes, target: bytes) -> Target:
    """
    The L{Target} of a request line's C{target}, or L{TargetError}.

    origin-form (C{/x?q}) is routed as it is.  absolute-form
    (C{http://host/x}), which RFC 9112 3.2.2 says a server MUST accept, is
    routed on its path, and its authority replaces the Host header; an
    empty path is C{/}, or the server as a whole for OPTIONS (RFC 9112
    3.2.4).  asterisk-form is for OPTIONS only.  authority-form (CONNECT's
    C{host:port}) and anything else names nothing this origin server
    serves: it is not a proxy.
    """
    if target[:1] == b"/":
        return Target(target)
    if target == ASTERISK:
        if method != b"OPTIONS":
            raise TargetError("the request target * is only for OPTIONS")
        return Target(ASTERISK)
    absolute = _ABSOLUTE.match(target)
    if absolute is None:
        raise TargetError("the request target must be a path (this server is not a proxy)")
    scheme, authority, rest = absolute.groups()
    if scheme.lower() not in (b"http", b"https"):
        raise TargetError("only http and https request targets are served")
    if b"@" in authority:
        # RFC 9110 4.2.4: user information in an http(s) URI is an error.
        raise TargetError("the request target must not carry user information")
    if not authority or _HOST_FIELD.match(authority) is None:
        raise TargetError("the request target's authority is not a host")
    if rest[:1] != b"/":
        # An empty path, perhaps before a query.
        if method == b"OPTIONS" and not rest:
            return Target(ASTERISK, authority)
        rest = b"/" + rest
    return Target(rest, authority)


def check_host(values: Sequence[bytes] | None, version: bytes, absolute: bool) -> None:
    """
    Raise L{TargetError} unless a request's Host header lines C{values}
    are what RFC 9112 3.2 asks of an HTTP/1.x request: exactly one line in
    HTTP/1.1 (HTTP/1.0 may have none), never two, and a host for a value.
    In absolute-form (C{absolute}) the target's authority replaces the
    value (RFC 9112 3.2.2), so only the count is checked.

    Over HTTP/2, Twisted adds a Host line for C{:authority}, and a client
    may send a Host header as well; the h2 library refuses a request with
    neither, or with two that differ.  So two equal lines are one there,
    and none is let through: an HTTP/2 request without an authority is the
    h2 library's to refuse, not a reason to break a client this rule never
    meant.
    """
    if values and len(values) == 1:
        # Nearly every request: one line, to check.
        if absolute or _HOST_FIELD.match(values[0]) is not None:
            return
        raise TargetError("the Host header is not a host")
    if version.startswith(b"HTTP/2"):
        if values:
            if any(value != values[0] for value in values[1:]):
                raise TargetError("the request's :authority and Host differ")
            check_host(values[:1], version, absolute)
        return
    if values:
        raise TargetError("a request must not have more than one Host header")
    if version != b"HTTP/1.0":
        raise TargetError("an HTTP/1.1 request must have a Host header")


def check_request(method: bytes, target: bytes, version: bytes, headers: Headers) -> Target:
    """
    The L{Target} to route a request on, once its line and headers are
    what RFC 9112 asks (L{parse_target}, L{check_host}, and no
    Transfer-Encoding in HTTP/1.0, whose framing RFC 9112 6.1 says to treat
    as faulty); else L{TargetError}.  For HTTP/1.x and HTTP/2 alike.
    """
    parsed = parse_target(method, target)
    check_host(headers.getRawHeaders(b"Host"), version, parsed.authority is not None)
    if version == b"HTTP/1.0" and headers.hasHeader(b"Transfer-Encoding"):
        raise TargetError("an HTTP/1.0 request must not have a Transfer-Encoding")
    return parsed


#: The longest chunk-size line Twisted reads (its own limit, the same
#: number): past it Twisted refuses the body itself.
_MAX_CHUNK_LINE_BYTES = 1024
_HEX = re.compile(rb"[0-9A-Fa-f]+\Z")


class ChunkedAnnouncements:
    """
    Follows the framing of a chunked request body as its bytes pass, to
    learn what each chunk announces before its data comes: Twisted's
    decoder delivers a chunk only as its bytes arrive, so a chunk that
    announces more than the limit, then sends nothing, would otherwise be
    held until the body deadline.

    It only reads chunk-size lines and skips the rest; the body itself is
    still decoded (and any malformed framing refused) by Twisted.  Once it
    meets the last chunk, or a size line Twisted will refuse, it stops.
    """

    __slots__ = ("_left", "_line", "_state", "announced")

    def __init__(self) -> None:
        #: The sum of the sizes announced so far, data not yet received
        #: included.
        self.announced = 0
        # "size": in a chunk-size line; "data": in a chunk's data, _left
        # bytes to go; "crlf": in the CRLF after it, _left bytes to go;
        # "done": past the last chunk, or lost.
        self._state = "size"
        self._line = bytearray()
        self._left = 0

    def feed(self, data: bytes) -> int:
        """
        Take the next bytes of the body; return L{announced}.
        """
        position, end = 0, len(data)
        while position < end and self._state != "done":
            if self._state == "data" or self._state == "crlf":
                taken = min(self._left, end - position)
                position += taken
                self._left -= taken
                if self._left == 0:
                    if self._state == "data":
                        self._state, self._left = "crlf", 2
                    else:
                        self._state = "size"
                continue
            newline = data.find(b"\n", position)
            stop = end if newline < 0 else newline + 1
            self._line += data[position:stop]
            position = stop
            if len(self._line) > _MAX_CHUNK_LINE_BYTES + 2:
                self._state = "done"
            elif newline >= 0:
                self._size_line(bytes(self._line))
                self._line.clear()
        return self.announced

    def _size_line(self, line: bytes) -> None:
        size = line.rstrip(b"\r\n").partition(b";")[0]
        if _HEX.match(size) is None:
            self._state = "done"  # malformed: Twisted refuses the body
            return
        length = int(size, 16)
        if length == 0:
            self._state = "done"  # the last chunk; trailers follow
            return
        self.announced += length
        self._state, self._left = "data", length


class Admission:
    """
    The connection caps: how many connections are open across the server
    and per client key, which new one is refused and why, how many refused
    ones may wait for their request before being answered, and whether the
    server is saturated.

    Saturated is a state with hysteresis, so that a health check does not
    flap with every connection opened and closed at the cap: it begins
    when the open connections reach C{max_connections} and ends only once
    they fall a tenth of the cap (at least one) below it.
    """

    def __init__(self, max_connections: int, max_per_key: int, max_waiting_refusals: int) -> None:
        self.max_connections = max_connections
        self.max_per_key = max_per_key
        self.max_waiting_refusals = max_waiting_refusals
        #: Open connections that were admitted.
        self.count = 0
        #: Refused connections waiting for their request (not in L{count}).
        self.waiting_refusals = 0
        self.saturated = False
        self._per_key: dict[str, int] = {}
        self._low_water = max_connections - max(1, max_connections // 10)

    def admit(self, key: str | None) -> Refusal | None:
        """
        Count a new connection under C{key} (None: only the global cap
        applies), or return the L{Refusal} to answer it with: 503 past the
        global cap (the server is busy: no fault of this client), 429 past
        the per-key one (this client holds too many).
        """
        if self.count >= self.max_connections:
            self.saturated = True
            return SERVER_FULL
        if key is not None:
            held = self._per_key.get(key, 0)
            if held >= self.max_per_key:
                return ADDRESS_FULL
            self._per_key[key] = held + 1
        self.count += 1
        if self.count >= self.max_connections:
            self.saturated = True
        return None

    def release(self, key: str | None) -> None:
        """
        Forget a connection that L{admit} counted.
        """
        self.count -= 1
        if key is not None:
            left = self._per_key[key] - 1
            if left:
                self._per_key[key] = left
            else:
                del self._per_key[key]
        if self.saturated and self.count <= self._low_water:
            self.saturated = False

    def wait(self) -> bool:
        """
        Let one more refused connection wait for its request, if there is
        room among those waiting: True if so (L{done_waiting} must follow),
        False when it must be answered and closed at once.
        """
        if self.waiting_refusals >= self.max_waiting_refusals:
            return False
        self.waiting_refusals += 1
        return True

    def done_waiting(self) -> None:
        self.waiting_refusals -= 1


#: The refusal past the global connection cap.
SERVER_FULL = Refusal(
    503,
    "M_LIMIT_EXCEEDED",
    "the server has too many connections",
    ((b"Retry-After", b"1"),),
)
#: The refusal past the per-address connection cap.
ADDRESS_FULL = Refusal(
    429,
    "M_LIMIT_EXCEEDED",
    "too many connections from this address",
    ((b"Retry-After", b"1"),),
)


#: How long a refused connection, once answered, may stay open for its
#: client to read the answer and close: closing it while the client still
#: sends (a body, a pipelined request) would reset the connection, and a
#: reset can destroy the answer before the client reads it (RFC 9112 9.6).
LINGER_SECONDS = 2.0


class WaitingRefusal:
    """
    A refused connection waiting for its request's head (its blank line), in
    bytes that come in any pieces, of which it keeps only the last three:
    then its L{Refusal} is answered, after the request as a client expects,
    rather than before it.  A head that never ends is taken as ended once
    it passes C{max_bytes}, so that it is answered too.
    """

    __slots__ = ("_max_bytes", "_seen", "_tail", "answered", "refusal")

    def __init__(self, refusal: Refusal, max_bytes: int) -> None:
        self.refusal = refusal
        #: Whether the refusal has been written (the connection lingers).
        self.answered = False
        self._max_bytes = max_bytes
        self._seen = 0
        self._tail = b""

    def head_complete(self, data: bytes) -> bool:
        """
        Take the next bytes; True once, when the head is complete (or too
        long) and the refusal is not answered yet.
        """
        if self.answered:
            return False  # lingering: whatever comes is dropped
        window = self._tail + data
        self._seen += len(data)
        # A blank line: CRLF CRLF, or bare LFs, which some clients send.
        if b"\r\n\r\n" in window or b"\n\n" in window or self._seen > self._max_bytes:
            return True
        self._tail = window[-3:]
        return False
