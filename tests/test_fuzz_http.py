"""
Fuzzing: hypothesis writes raw HTTP/1.1 requests (methods, targets in every
form, ids, header names and values with control characters, obs-folds and
bare CRs, conditional headers, Prefer, bodies, chunked and broken framing,
absurd chunk sizes) to a real C{twistd rendezvous} over loopback.  The
server must never answer 5xx, never log a failure, answer every request
that is whole, and a rendezvous created before the run (whose id the fuzzer
never learns) must come out of it intact.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import string
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_end_to_end import (
    Conn,
    TwistdServer,
    create,
    etag_of,
    running,
    secret,
    start_plugin_server,
)

#: How long a connection may stay silent before we stop waiting for more:
#: a request with broken framing leaves the server waiting for bytes.
QUIET_SECONDS = 0.05
#: The most any one request may take to be answered.
ANSWER_DEADLINE_SECONDS = 3.0

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")

methods = st.one_of(
    st.sampled_from(
        [
            b"GET",
            b"PUT",
            b"POST",
            b"DELETE",
            b"OPTIONS",
            b"HEAD",
            b"PATCH",
            b"BREW",
            b"CONNECT",
            b"TRACE",
            b"get",
            b"",
        ]
    ),
    st.binary(max_size=8),
)
ids = st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=70)
targets = st.one_of(
    st.just(b"/"),
    ids.map(lambda i: b"/" + i.encode("ascii")),
    st.binary(max_size=40).map(lambda b: b"/" + b),
    st.sampled_from(
        [b"//", b"/a/b", b"*", b"http://x/", b"/%ff%fe", b"/?q=1", b"/../../etc/passwd", b""]
    ),
    # The other request-target forms (RFC 9112 3.2), and near misses.
    st.sampled_from(
        [
            b"http://rendezvous.test",
            b"HTTPS://rendezvous.test:443/?q",
            b"http://user@rendezvous.test/",
            b"http://[::1]:8080/x",
            b"http:///",
            b"ftp://x/",
            b"rendezvous.test:443",
            b"x",
        ]
    ),
    ids.map(lambda i: b"http://rendezvous.test/" + i.encode("ascii")),
)
versions = st.sampled_from(
    [
        b"HTTP/1.1",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/2.0",
        b"HTTP/1.1x",
        b"HTTP/9.9",
        b"HTTP/0.9",
        b"",
    ]
)
header_names = st.one_of(
    st.sampled_from(
        [
            b"Content-Type",
            b"If-Match",
            b"If-None-Match",
            b"Prefer",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Host",
            b"X-Forwarded-For",
            b"Forwarded",
            b"X-Forwarded-Proto",
            b"Sec-Fetch-Mode",
            b"Sec-Fetch-Dest",
            b"Expect",
            b"Connection",
            b"Origin",
        ]
    ),
    st.binary(max_size=20),
)
header_values = st.one_of(
    st.sampled_from(
        [
            b"*",
            b'"x"',
            b'W/"x", "y"',
            b"wait=0",
            b"wait=99999999999",
            b'wait="5"; q',
            b"chunked",
            b"gzip, chunked",
            b"100-continue",
            b"-1",
            b"0",
            b"99999999999999999999",
            b"navigate",
            b"document",
            b"close",
            b"text/plain",
            b"1.2.3.4, ::1, fe80::1%eth0, [2001:db8::1]:80, unknown",
            b'for="[::1]:80";proto=https, for=_hidden',
            b"\xff\xfe",
            b"https",
            # Bytes Python's email package reads as line breaks (Twisted's
            # form parsing raised on them), other controls, obs-text, a
            # form type, an obs-fold, a bare CR, a NUL.
            b"text/plain\x0bx",
            b"text/plain\x0c",
            b"a\x1cb\x1dc\x1e",
            b"text/plain; charset=\x85x",
            b"multipart/form-data; boundary=zz",
            b"application/x-www-form-urlencoded",
            b"a\r\n b",
            b"a\rb",
            b"a\x00b",
            b"rendezvous.test:8080",
            b"[2001:db8::1]",
            b"a b",
        ]
    ),
    st.binary(max_size=60),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=8)
framings = st.sampled_from(
    [
        "none",
        "length",
        "long-length",
        "short-length",
        "chunked",
        "bad-chunked",
        "absurd-chunk",
        "length-and-chunked",
    ]
)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """
    One raw request, well-formed or not.
    """
    line = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
    lines = [line]
    if draw(st.booleans()):
        lines.append(b"Host: rendezvous.test")
    lines += [name + b": " + value for name, value in draw(headers)]
    body = draw(st.binary(max_size=300))
    framing = draw(framings)
    payload = b""
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "long-length":
        lines.append(b"Content-Length: %d" % (len(body) + 10))
        payload = body
    elif framing == "short-length":
        lines.append(b"Content-Length: %d" % (len(body) // 2))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif framing == "bad-chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n%s\r\nzz\r\n" % (len(body) + 3, body)
    elif framing == "absurd-chunk":
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"fffffffffffffffffff\r\n" + body
    elif framing == "length-and-chunked":
        lines += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
        payload = body
    if draw(st.booleans()):
        lines.append(b"Connection: close")
    separator = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    return separator.join(lines) + separator + separator + payload


def answers_to(port: int, request: bytes, expect_answer: bool = False) -> bytes:
    """
    Everything the server sends back on a fresh connection before it closes
    it, or falls silent for L{QUIET_SECONDS} (once it has said something,
    when C{expect_answer}: until then, up to L{ANSWER_DEADLINE_SECONDS}).
    """
    with Conn(port) as conn:
        try:
            conn.send(request)
        except OSError:
            return b""  # the server hung up mid-request
        return read_until_quiet(conn.sock, expect_answer)


def read_until_quiet(sock: socket.socket, expect_answer: bool = False) -> bytes:
    """
    Everything C{sock} receives before its peer closes it, or falls silent
    for L{QUIET_SECONDS} (once it has said something, when
    C{expect_answer}: until then, up to L{ANSWER_DEADLINE_SECONDS}).  Over
    TLS, what is already decrypted is taken before waiting for more.
    """
    received = bytearray()
    deadline = time.monotonic() + ANSWER_DEADLINE_SECONDS
    for _ in range(10_000):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            quiet = remaining if expect_answer and not received else QUIET_SECONDS
            readable, _, _ = select.select([sock], [], [], min(quiet, remaining))
            if not readable:
                break
        try:
            chunk = sock.recv(65536)
        except OSError:  # ssl.SSLError too
            break
        if not chunk:
            break
        received += chunk
    return bytes(received)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """
    A server whose rate limits are far above what the fuzzer sends, so that
    every request reaches the code under test rather than a 429, and which
    trusts the fuzzer as a proxy, so that its forwarding headers are read.
    """
    yield from running(
        start_plugin_server(
            tmp_path_factory.mktemp("fuzz"),
            "--max-bytes=200",
            "--poll-timeout=1",
            "--create-burst=1000000",
            "--request-burst=1000000",
            "--max-rendezvous-per-address=10000",
            # So that the fuzzer's forwarding headers are parsed, not ignored.
            "--trusted-proxy=127.0.0.1/32",
        )
    )


@pytest.fixture(scope="module")
def known(fuzzed: TwistdServer) -> tuple[str, bytes, bytes]:
    """
    A rendezvous created before the fuzzing: its id, payload and ETag.
    """
    with Conn(fuzzed.port) as conn:
        payload = secret("known")
        rendezvous_id, created = create(fuzzed, conn, payload, [("Content-Type", "text/plain")])
    return rendezvous_id, payload, etag_of(created)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=raw_requests())
def test_no_request_makes_the_server_fail(
    fuzzed: TwistdServer, known: tuple[str, bytes, bytes], request: bytes
) -> None:
    """
    No raw request, however malformed, gets a 5xx; the known rendezvous
    stays intact and the server logs no failure.
    """
    answer = answers_to(fuzzed.port, request)
    # Read the server's log as it goes, so that its pipe never fills and
    # blocks it.
    fuzzed.pump(0)
    statuses = [int(status) for status in _STATUS.findall(answer)]
    assert all(100 <= status < 500 for status in statuses), (request, answer)


def test_after_fuzzing_the_known_rendezvous_is_intact(
    fuzzed: TwistdServer, known: tuple[str, bytes, bytes]
) -> None:
    """
    After the fuzzing, the rendezvous created before it has its payload,
    content type and ETag, and the log shows no failure.
    """
    rendezvous_id, payload, etag = known
    with Conn(fuzzed.port) as conn:
        read = conn.exchange("GET", "/" + rendezvous_id)
    assert (read.status, read.body, etag_of(read)) == (200, payload, etag)
    assert read.header("Content-Type") == b"text/plain"
    fuzzed.assert_no_trouble()


# Whole, well-framed requests: each must be answered, whatever its line and
# header values hold.

#: Header values on one line: what a client may send, and what it should not
#: (controls, obs-text, NUL), but never a line break.
line_values = st.one_of(
    header_values.filter(lambda value: b"\r" not in value and b"\n" not in value),
    st.binary(max_size=40).filter(lambda value: b"\r" not in value and b"\n" not in value),
)


@st.composite
def whole_requests(draw: st.DrawFn) -> bytes:
    """
    A request that is whole and framed: any method, target form and
    version, zero to two Host lines, headers of any one-line value, and a
    body framed by Content-Length or by complete chunks.
    """
    method = draw(
        st.sampled_from(
            [b"GET", b"PUT", b"POST", b"DELETE", b"OPTIONS", b"HEAD", b"PATCH", b"CONNECT"]
        )
    )
    target = draw(
        st.one_of(
            st.sampled_from(
                [b"/", b"*", b"http://rendezvous.test", b"rendezvous.test:443", b"/a/b"]
            ),
            ids.map(lambda i: b"/" + i.encode("ascii")),
            ids.map(lambda i: b"http://rendezvous.test/" + i.encode("ascii")),
        )
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [method + b" " + target + b" " + version]
    hosts = draw(st.lists(st.sampled_from([b"rendezvous.test", b"a b", b"", b"x:1"]), max_size=2))
    lines += [b"Host: " + host for host in hosts]
    content_type = draw(
        st.one_of(
            st.none(),
            st.sampled_from(
                [b"text/plain\x0bx", b"text/plain\x0cx", b"text/plain\x85x", b"text/plain"]
            ),
            line_values,
        )
    )
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    names = st.sampled_from(
        [b"Content-Type", b"If-Match", b"If-None-Match", b"Prefer", b"X-Any", b"Expect"]
    )
    lines += [
        name + b": " + value
        for name, value in draw(st.lists(st.tuples(names, line_values), max_size=5))
    ]
    body = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    else:
        lines.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=whole_requests())
def test_every_whole_request_is_answered(
    fuzzed: TwistdServer, known: tuple[str, bytes, bytes], request: bytes
) -> None:
    """
    A whole, well-framed request gets an answer (never silence, as a
    Content-Type with \\x0b once got), and never a 5xx.
    """
    answer = answers_to(fuzzed.port, request, expect_answer=True)
    fuzzed.pump(0)
    statuses = [int(status) for status in _STATUS.findall(answer)]
    assert statuses, (request, answer)
    assert all(100 <= status < 500 for status in statuses), (request, answer)
