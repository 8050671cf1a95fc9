"""
A lean HTTP/1.1 keep-alive client on asyncio (uvloop when installed).

It does only what the scenarios need, so that the client costs a small
fraction of what the server does per request: one request in flight per
connection, responses framed by Content-Length (never chunked: the server
under test always sends a length, and no length on 204/304), and headers
looked up lazily in the raw head.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import socket
import struct
import time
from collections.abc import Sequence
from typing import cast
from urllib.parse import urlsplit


class BenchError(Exception):
    """
    The server answered something a scenario did not expect: the run is
    void, rather than quietly counting a failure as a request served.
    """


class Refused(BenchError):
    """
    The server refused the load with 429 or 503: its limits (rate limits,
    caps) are those for real clients, not for one address at benchmark
    rates.  C{status} and C{reason} (its JSON error, or its status line)
    say what it answered.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason

    @classmethod
    def of(cls, status: int, body: bytes) -> Refused:
        """
        The refusal a 429 or 503 answer with C{body} makes.
        """
        try:
            error = json.loads(body)
            reason = f"{error['errcode']}: {error['error']}"
        except (ValueError, KeyError, TypeError):
            reason = body[:100].decode("utf-8", "replace") or "no reason given"
        return cls(status, reason)


#: Statuses that mean "a limit said no", not "the server is broken".
REFUSALS = (429, 503)


def new_event_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    """
    A uvloop event loop when uvloop is installed (the C{bench} extra), else
    asyncio's own; and the name of the one chosen, for the report.
    """
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop(), "asyncio"
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop, "uvloop"


class Response:
    """
    One response: status, raw head, body, and when its last byte arrived
    (C{time.perf_counter()}).
    """

    __slots__ = ("arrived", "body", "head", "status")

    def __init__(self, status: int, head: bytes, body: bytes, arrived: float) -> None:
        self.status = status
        self.head = head
        self.body = body
        self.arrived = arrived

    def header(self, name: bytes) -> bytes | None:
        """
        The first value of header C{name} (any case), or None.
        """
        match = re.search(b"\r\n" + re.escape(name) + rb":[ \t]*([^\r]*)", self.head, re.I)
        return match.group(1).rstrip(b" \t") if match else None


_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


class Connection(asyncio.Protocol):
    """
    One keep-alive connection with at most one request in flight.
    """

    def __init__(self, host: bytes) -> None:
        self._host = host
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._lost: BaseException | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._parse()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = exc or ConnectionResetError("the server closed the connection")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    def _parse(self) -> None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end])
        status = int(head[9:12])
        if status in (204, 304):
            length = 0
        else:
            match = _LENGTH.search(head)
            if match is None:
                raise BenchError(f"a {status} answer without Content-Length: {head!r}")
            length = int(match.group(1))
        total = end + 4 + length
        if len(buffer) < total:
            return
        body = bytes(buffer[end + 4 : total])
        del buffer[:total]
        waiter, self._waiter = self._waiter, None
        if waiter is None:
            if status in REFUSALS:
                # A connection cap's answer, written as the connection opened,
                # before it is closed: the next request learns of it.
                self._lost = Refused.of(status, body)
                return
            raise BenchError(f"an answer nobody asked for: {head!r}")
        if not waiter.done():
            waiter.set_result(Response(status, head, body, time.perf_counter()))

    def send(
        self, method: bytes, path: bytes, headers: bytes = b"", body: bytes | None = None
    ) -> asyncio.Future[Response]:
        """
        Send one request now; the Future is its response.  C{headers} are
        whole header lines, each ending in CRLF.
        """
        if self._lost is not None:
            raise self._lost
        assert self._waiter is None, "one request at a time on a connection"
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        data = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (method, path, self._host, headers)
        if body is not None:
            data += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        else:
            data += b"\r\n"
        self.transport.write(data)
        return self._waiter

    async def request(
        self, method: bytes, path: bytes, headers: bytes = b"", body: bytes | None = None
    ) -> Response:
        return await self.send(method, path, headers, body)

    def reset(self) -> None:
        """
        Hang up with a TCP RST, so that no TIME_WAIT socket keeps one of the
        loopback's ephemeral ports: the parked scenario opens tens of
        thousands of connections in a row.
        """
        if self.transport is None or self._lost is not None:
            return  # already closed, by the server or by us
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class Target:
    """
    Where a scenario sends its load: host and port from a base URL.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"the benchmark needs http://HOST:PORT, not {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port
        self.host_header = f"{self.host}:{self.port}".encode("ascii")

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: Connection(self.host_header), self.host, self.port
        )
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return protocol

    async def connect_many(self, count: int, concurrency: int = 64) -> list[Connection]:
        """
        C{count} connections, opened at most C{concurrency} at a time so that
        the server's listen backlog never overflows (a dropped SYN costs a
        one-second retry and would pollute every figure).
        """
        connections: list[Connection] = []
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                connections.append(await self.connect())

        await asyncio.gather(*(one() for _ in range(count)))
        return connections


def close_all(connections: Sequence[Connection]) -> None:
    for connection in connections:
        connection.reset()


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """
    The nearest-rank percentile of C{values}, or None when there are none.
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
