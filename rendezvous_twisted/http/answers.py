"""
What every answer carries, in one place: SPEC.md's every-response headers,
the JSON error body, and the refusals written on a connection below the
resource (where there is no request to answer through), as one value that
either HTTP version can put on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.web import http

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
    (b"Access-Control-Allow-Headers", b"Content-Type, If-Match, If-None-Match, Prefer"),
    (b"Access-Control-Max-Age", b"86400"),
)

JSON = b"application/json"


def error_body(errcode: str, message: str, extra: Mapping[str, str] | None = None) -> bytes:
    """
    The JSON body of every error: C{{"errcode": ..., "error": ...}}, and any
    C{extra} fields.
    """
    return json.dumps({"errcode": errcode, "error": message, **(extra or {})}).encode("ascii")


#: Reason phrases where Twisted has none (429) or RFC 9110's differs (413,
#: "Payload Too Large" before RFC 9110).
_PHRASES = {413: b"Content Too Large", 429: b"Too Many Requests"}


def phrase(status: int) -> bytes:
    """
    The reason phrase of C{status} on an HTTP/1.1 status line: RFC 9110's,
    the same on every answer.
    """
    known: bytes = _PHRASES.get(status) or http.RESPONSES.get(status, b"Refused")
    return known


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
        (b"Date", http.datetimeToString()),
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
