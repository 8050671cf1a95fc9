"""
What every answer carries, in one place: SPEC.md's every-response headers,
the JSON error body, the one helper that sets an answer's status and
headers (L{respond}), the refusals that belong to HTTP (L{HTTPError} and its
kinds), the one mapping of the store's domain errors to status, JSON body
and headers (L{ErrorAnswers}), and the refusals written on a connection
below the resource (where there is no request to answer through), as one
value that either HTTP version can put on the wire (L{Refusal}).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from rendezvous_twisted.core.metrics import Metrics
from rendezvous_twisted.core.store import (
    Full,
    NotFound,
    PreconditionFailed,
    StoreUnavailable,
    TooLarge,
    TooManyTransactions,
    Version,
)

#: The Server header of every answer, on every listener.
SERVER = b"rendezvous-twisted"

#: What SPEC.md's "Every response" and "CORS" sections put on every answer.
EVERY_RESPONSE: tuple[tuple[bytes, bytes], ...] = (
    (b"Access-Control-Allow-Origin", b"*"),
    (
        b"Access-Control-Expose-Headers",
        b"ETag, Location, X-Max-Bytes, Expires, Last-Modified, Retry-After",
    ),
    (b"Cache-Control", b"no-store, no-transform"),
    (b"Pragma", b"no-cache"),
    (b"X-Content-Type-Options", b"nosniff"),
    # Whatever a payload holds, a browser that opens it runs and loads
    # nothing.  Harmless on the other answers, so it goes on all of them.
    (b"Content-Security-Policy", b"sandbox; default-src 'none'"),
    # No version: it helps no client and tells an attacker what to try.
    (b"Server", SERVER),
)

#: Added to the every-response headers on a CORS preflight.
PREFLIGHT: tuple[tuple[bytes, bytes], ...] = (
    (b"Access-Control-Allow-Methods", b"GET, PUT, POST, DELETE"),
    # Authorization: MSC4388's discovery and create take an access token.
    (
        b"Access-Control-Allow-Headers",
        b"Authorization, Content-Type, If-Match, If-None-Match, Prefer",
    ),
    (b"Access-Control-Max-Age", b"86400"),
)

JSON = b"application/json"


def error_body(errcode: str, message: str, extra: Mapping[str, str | bool] | None = None) -> bytes:
    """
    The JSON body of every error: C{{"errcode": ..., "error": ...}}, and any
    C{extra} fields (strings, or booleans such as a 401's C{soft_logout}).
    """
    return json.dumps({"errcode": errcode, "error": message, **(extra or {})}).encode("ascii")


#: Reason phrases: Twisted's, but where it has none (429) or RFC 9110's
#: differs (413, "Payload Too Large" before RFC 9110).  Read once: a name
#: read from twisted.web.http at run time goes through the deprecation proxy
#: of that module (2.5 us, once per answer).
_PHRASES: dict[int, bytes] = {
    **RESPONSES,
    413: b"Content Too Large",
    429: b"Too Many Requests",
}


def phrase(status: int) -> bytes:
    """
    The reason phrase of C{status} on an HTTP/1.1 status line: RFC 9110's,
    the same on every answer.
    """
    return _PHRASES.get(status, b"Refused")


def closing_answer(
    status: int,
    errcode: str,
    message: str,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """
    A whole HTTP/1.1 error answer as bytes, with the every-response headers
    and C{Connection: close}, for refusals made below the resource, where
    there is no Request to answer through.
    """
    body = error_body(errcode, message)
    head = [b"HTTP/1.1 %d %s" % (status, phrase(status))]
    for name, value in (
        *EVERY_RESPONSE,
        (b"Date", datetimeToString()),
        (b"Content-Type", JSON),
        (b"Content-Length", b"%d" % len(body)),
        (b"Connection", b"close"),
        *headers,
    ):
        head.append(name + b": " + value)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@dataclass(frozen=True, slots=True)
class Refusal:
    """
    Why a connection is refused, as the answer its first request gets: the
    status, the JSON error and any headers of its own (C{Retry-After}).
    The every-response headers, C{Content-Type} and C{Content-Length} come
    with it on either HTTP version; it says nothing of framing, so that an
    HTTP/1.1 channel writes it with L{http11} and closes, and an HTTP/2 one
    answers it on a stream (L{response_headers}, L{body}).
    """

    status: int
    errcode: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        """
        The JSON error body.
        """
        return error_body(self.errcode, self.message)

    def response_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """
        Every header of the answer but the framing an HTTP version adds
        (HTTP/1.1's C{Connection: close}) and C{Date}: the every-response
        headers, the type and length of L{body}, and the refusal's own.
        """
        return (
            *EVERY_RESPONSE,
            (b"Content-Type", JSON),
            (b"Content-Length", b"%d" % len(self.body())),
            *self.headers,
        )

    def http11(self) -> bytes:
        """
        The whole HTTP/1.1 answer, with C{Connection: close}: written, it
        ends the connection.
        """
        return closing_answer(self.status, self.errcode, self.message, self.headers)


#: Statuses whose answer has no body and so no Content-Length (RFC 9110 8.6).
NO_BODY = frozenset((204, 304))


@lru_cache(maxsize=1024)
def _date_of_second(second: int) -> bytes:
    date: bytes = datetimeToString(second)
    return date


def http_date(seconds: float) -> bytes:
    """
    The HTTP-date of C{seconds} since the epoch.
    """
    # An HTTP-date names a whole second, and the few seconds that answers
    # name (now, and the expiry and last write of live rendezvous) repeat
    # across many requests: format each once.
    return _date_of_second(int(seconds))


# The every-response headers as Headers holds them: each value list made
# once, and shared (read, never changed).
_EVERY_RESPONSE_FIELDS: tuple[tuple[bytes, Sequence[bytes]], ...] = tuple(
    (name, [value]) for name, value in EVERY_RESPONSE
)
_EVERY_RESPONSE_BY_NAME = {name.lower(): values for name, values in _EVERY_RESPONSE_FIELDS}


class ResponseHeaders(Headers):
    """
    The response headers of a L{RendezvousRequest}: they can carry the
    headers of every answer as one prepared batch (L{add_every_response}),
    rather than set one by one on each answer, where each C{setRawHeaders}
    canonicalises its name and sanitises its value (seven of them were some
    40 calls per answer).  The batch is written first, by
    L{getAllRawHeaders} (what both HTTP versions write an answer's head
    from), and read back by L{getRawHeaders} and L{hasHeader}.  Nothing
    else sets those headers on an answer that carries the batch.
    """

    __slots__ = ("_every",)

    def __init__(self, raw_headers: Mapping[bytes, Sequence[bytes]] | None = None) -> None:
        super().__init__(raw_headers)
        self._every = False

    def add_every_response(self) -> None:
        """
        Carry the headers of every answer (L{EVERY_RESPONSE}).
        """
        self._every = True

    def copy(self) -> ResponseHeaders:
        copied = ResponseHeaders(dict(super().getAllRawHeaders()))
        copied._every = self._every
        return copied

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]:
        own = super().getAllRawHeaders()
        if self._every:
            return chain(_EVERY_RESPONSE_FIELDS, own)
        return own

    def hasHeader(self, name: Any) -> bool:
        return bool(super().hasHeader(name)) or (self._every and _batched(name) is not None)

    def getRawHeaders(self, name: Any, default: Any = None) -> Any:
        values = super().getRawHeaders(name, None)
        if values is None and self._every:
            batched = _batched(name)
            if batched is not None:
                if isinstance(name, str):
                    return [value.decode("utf-8") for value in batched]
                return batched
        return default if values is None else values


def _batched(name: str | bytes) -> Sequence[bytes] | None:
    raw = name.encode("iso-8859-1") if isinstance(name, str) else name
    return _EVERY_RESPONSE_BY_NAME.get(raw.lower())


def respond(
    request: IRequest,
    code: int,
    body: bytes,
    content_type: bytes,
    version: Version | None = None,
) -> bytes:
    """
    Set the status and every header SPEC.md asks of this answer: those of
    every answer, C{Content-Type}, C{Content-Length} (none on 204 and 304)
    and, given the L{Version} answered about, its C{ETag}, C{Expires} and
    C{Last-Modified}.  Return C{body}, for the caller to write.  The one
    header helper of the answers made through a request.
    """
    # Twisted knows no phrase for 429 ("Unknown Status") and an older one
    # for 413.
    request.setResponseCode(code, phrase(code))
    headers = request.responseHeaders
    set_header = headers.setRawHeaders
    if isinstance(headers, ResponseHeaders):
        headers.add_every_response()
    else:
        for name, values in _EVERY_RESPONSE_FIELDS:
            set_header(name, values)
    # Set explicitly: Twisted and Klein would otherwise send text/html.
    set_header(b"Content-Type", [content_type])
    if code in NO_BODY:
        headers.removeHeader(b"Content-Length")
    else:
        # An explicit length: Twisted would otherwise frame HTTP/1.1
        # answers as chunked.
        set_header(b"Content-Length", [b"%d" % len(body)])
    if version is not None:
        set_header(b"ETag", [version.etag])
        set_header(b"Expires", [http_date(version.expires)])
        set_header(b"Last-Modified", [http_date(version.last_modified)])
    return body


def written(request: IRequest, body: bytes) -> object:
    """
    Write and finish an answer, for a resource's C{render}: Twisted, given
    the bytes instead, would add a Content-Length even to a 204.
    """
    request.write(body)
    request.finish()
    return NOT_DONE_YET


class HTTPError(Exception):
    """
    A refusal that belongs to HTTP rather than to the store: its status,
    Matrix error code, any headers and extra JSON fields of its own, and
    the L{Version} whose ETag it carries, if any.
    """

    code = 400
    errcode = "M_BAD_REQUEST"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    extra: Mapping[str, str | bool] | None = None
    version: Version | None = None


class BadRequestError(HTTPError):
    def __init__(self, errcode: str, message: str) -> None:
        super().__init__(message)
        self.errcode = errcode


class ForbiddenError(HTTPError):
    code = 403
    errcode = "M_FORBIDDEN"


class UnknownPathError(HTTPError):
    code = 404
    errcode = "M_UNRECOGNIZED"

    def __init__(self) -> None:
        super().__init__("no such endpoint")


class PayloadTooLargeError(HTTPError):
    code = 413
    errcode = "M_TOO_LARGE"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the payload is over {max_bytes} bytes")


class RateLimitedError(HTTPError):
    code = 429
    errcode = "M_LIMIT_EXCEEDED"

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.headers = ((b"Retry-After", b"%d" % retry_after_seconds),)


class MethodNotAllowedError(HTTPError):
    code = 405
    errcode = "M_UNRECOGNIZED"

    def __init__(self, allow: bytes, message: str = "method not allowed here") -> None:
        super().__init__(message)
        self.headers = ((b"Allow", allow),)


#: The methods an Allow header names, in the order it names them.
_METHOD_ORDER = (b"GET", b"PUT", b"POST", b"DELETE", b"OPTIONS")


def allow(methods: object) -> bytes:
    """
    An C{Allow} value for the route methods C{methods} (str or bytes): the
    ones served, in one order, and OPTIONS (answered for any path).  HEAD,
    which werkzeug adds beside every GET, is never served.
    """
    named = {m.encode("ascii") if isinstance(m, str) else m for m in methods}  # type: ignore[attr-defined]
    named.add(b"OPTIONS")
    return b", ".join(m for m in _METHOD_ORDER if m in named)


def _refusal_reason(error: BaseException, code: int) -> str | None:
    """
    The metrics' name for a refusal by a limit, or None for other answers.
    Any 429 that is not the store being full is a rate limit, whatever
    refuses it.
    """
    if code == 413:
        return "too_large"
    if code == 429:
        return "full" if isinstance(error, Full) else "rate_limited"
    return None


class ErrorAnswers:
    """
    The one place where a refusal becomes a status, a JSON body and its
    headers: the store's domain errors and every L{HTTPError}.  Refusals by
    a limit are counted in C{metrics}.
    """

    log = Logger()

    def __init__(self, metrics: Metrics, max_bytes: int) -> None:
        """
        @param max_bytes: the store's payload limit, named by its 413.
        """
        self.metrics = metrics
        self._max_bytes = max_bytes

    def refuse(self, request: IRequest, error: BaseException) -> bytes:
        """
        Answer a refusal: set status and headers, return the JSON body.
        """
        version: Version | None = None
        extra: Mapping[str, str | bool] | None = None
        headers = request.responseHeaders
        if isinstance(error, HTTPError):
            code, errcode, message = error.code, error.errcode, str(error)
            extra, version = error.extra, error.version
            for name, value in error.headers:
                headers.setRawHeaders(name, [value])
        elif isinstance(error, NotFound):
            code, errcode, message = 404, "M_NOT_FOUND", "no such rendezvous"
        elif isinstance(error, PreconditionFailed):
            code, errcode, message = 412, "M_CONCURRENT_WRITE", "If-Match matches no current ETag"
            version = error.current
        elif isinstance(error, TooLarge):
            code, errcode = 413, "M_TOO_LARGE"
            message = f"the payload is over {self._max_bytes} bytes"
        elif isinstance(error, TooManyTransactions):
            # Not a 429: waiting does not help, this session will refuse
            # every new transaction for the rest of its life.
            code, errcode = 400, "M_LIMIT_EXCEEDED"
            message = "this session recorded all the transactions it may; start a new one"
        elif isinstance(error, Full):
            code, errcode, message = 429, "M_LIMIT_EXCEEDED", str(error)
            headers.setRawHeaders(b"Retry-After", [b"%d" % error.retry_after_seconds])
        elif isinstance(error, StoreUnavailable):
            # The client may try again at once: another node or a Redis
            # that is back may answer.
            code, errcode = 503, "M_UNKNOWN"
            message = "the rendezvous store is unavailable; try again shortly"
            headers.setRawHeaders(b"Retry-After", [b"1"])
        else:  # an error this map does not know
            return self.internal_error(request, Failure(error))
        reason = _refusal_reason(error, code)
        if reason is not None:
            self.metrics.refused(reason)
        return respond(request, code, error_body(errcode, message, extra), JSON, version)

    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        """
        Log an error nothing expected, and answer it 500.
        """
        self.log.failure("unexpected error answering {method}", failure, method=request.method)
        return respond(
            request, 500, error_body("M_UNKNOWN", "internal error; it has been logged"), JSON
        )
