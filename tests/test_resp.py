"""
The RESP2 client under the Redis store: encoding, both reply parsers, and
a connection that fails fast.
"""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs

from rendezvous_twisted.redis.resp import (
    RedisConnection,
    RedisDown,
    RedisProtocol,
    RedisReplyError,
    ReplyParser,
    encode,
)
from tests.conftest import on_reactor


def hiredis_parser() -> Any:
    return hiredis.Reader(replyError=RedisReplyError)


PARSERS = [pytest.param(ReplyParser, id="python"), pytest.param(hiredis_parser, id="hiredis")]


def test_encode_is_an_array_of_bulk_strings() -> None:
    """A command goes out as a RESP2 array of binary-safe bulk strings, whatever its types."""
    assert encode([b"SET", "k\u00e9", 12, b"\r\n\x00"]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$2\r\n12\r\n$3\r\n\r\n\x00\r\n"
    )


REPLIES = (
    b"+OK\r\n"
    b":42\r\n"
    b"$5\r\nhe\r\nl\r\n"
    b"$-1\r\n"
    b"*-1\r\n"
    b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$0\r\n\r\n$-1\r\n"
    b"-ERR wrong\r\n"
)


def parsed(parser: Any) -> list[Any]:
    replies = []
    reply = parser.gets()
    while reply is not False:
        replies.append(reply)
        reply = parser.gets()
    return replies


def check_replies(replies: list[Any]) -> None:
    assert replies[:6] == [b"OK", 42, b"he\r\nl", None, None, [b"a", [1, b""], None]]
    assert isinstance(replies[6], RedisReplyError)
    assert str(replies[6]) == "ERR wrong"
    assert len(replies) == 7


@pytest.mark.parametrize("make", PARSERS)
def test_parser_reads_every_kind_of_reply(make: Any) -> None:
    """Status, integer, bulk (CRLF inside), nil bulk, nil array, nested arrays and errors parse."""
    parser = make()
    parser.feed(REPLIES)
    check_replies(parsed(parser))


@pytest.mark.parametrize("make", PARSERS)
def test_parser_waits_for_whole_replies_fed_a_byte_at_a_time(make: Any) -> None:
    """Replies split anywhere, even inside a length or a CRLF, come out whole and in order."""
    parser = make()
    replies: list[Any] = []
    for i in range(len(REPLIES)):
        parser.feed(REPLIES[i : i + 1])
        replies.extend(parsed(parser))
    check_replies(replies)


@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(min_value=1, max_value=7))
def test_python_parser_matches_hiredis_on_any_split(items: list[bytes], chunk: int) -> None:
    """The pure-Python parser agrees with hiredis on arrays of any bytes, split anywhere."""
    wire = encode(items)  # a command is also a valid reply: an array of bulks
    ours, theirs = ReplyParser(), hiredis_parser()
    mine: list[Any] = []
    for i in range(0, len(wire), chunk):
        ours.feed(wire[i : i + chunk])
        mine.extend(parsed(ours))
    theirs.feed(wire)
    assert mine == parsed(theirs) == [items]


class _Mute(Protocol):
    """
    A "Redis" that answers the first command on a connection (the set-up's
    PING) with PONG, and nothing after it.
    """

    answered = False

    def dataReceived(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            assert self.transport is not None
            self.transport.write(b"+PONG\r\n")


@on_reactor
async def test_a_silent_redis_fails_commands_at_their_deadline() -> None:
    """A Redis that stops answering fails each command with RedisDown at its deadline."""
    from twisted.internet import reactor

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(_Mute)
    )
    up: Deferred[None] = Deferred()
    connection = RedisConnection(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        reactor,
        0.2,
        lambda protocol: Deferred.fromCoroutine(_nothing()),
        on_up=lambda: up.callback(None),
    )
    connection.service.startService()
    try:
        await up
        started = reactor.seconds()
        with pytest.raises(RedisDown, match=r"within 0\.2s"):
            await connection.execute(b"PING")
        assert 0.15 < reactor.seconds() - started < 1.0
    finally:
        await connection.service.stopService()
        await port.stopListening()


@on_reactor
async def test_a_connection_that_goes_quiet_is_made_anew() -> None:
    """A connection whose heartbeat PING goes unanswered is dropped and connected again."""
    from twisted.internet import reactor

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(_Mute)
    )
    events: list[str] = []
    again: Deferred[None] = Deferred()

    def up() -> None:
        events.append("up")
        if events.count("up") == 2:
            again.callback(None)

    connection = RedisConnection(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        reactor,
        0.1,
        lambda protocol: Deferred.fromCoroutine(_nothing()),
        on_up=up,
        on_down=lambda: events.append("down"),
        heartbeat_seconds=0.1,
    )
    connection.service.startService()
    try:
        await again.addTimeout(5, reactor)
        assert events == ["up", "down", "up"]
    finally:
        await connection.service.stopService()
        await port.stopListening()


@on_reactor
async def test_a_set_up_that_is_never_answered_is_dropped_at_its_deadline() -> None:
    """A set-up chain (AUTH, SUBSCRIBE) never answered is dropped at its deadline and retried."""
    from twisted.internet import reactor

    made: list[None] = []

    class Counted(_Mute):
        def connectionMade(self) -> None:
            made.append(None)
            if len(made) == 2:
                again.callback(None)

    again: Deferred[None] = Deferred()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Counted)
    )
    connection = RedisConnection(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        reactor,
        0.1,
        lambda protocol: succeed(None).addCallback(lambda _: protocol.execute(b"SUBSCRIBE", b"c")),
    )
    connection.service.startService()
    try:
        await again.addTimeout(5, reactor)
        assert not connection.up
    finally:
        await connection.service.stopService()
        await port.stopListening()


@on_reactor
async def test_a_redis_that_cannot_be_reached_is_named_with_the_reason() -> None:
    """Connecting to a port where no Redis listens logs why, once per reason, not each retry."""
    import socket

    from twisted.internet import reactor
    from twisted.logger import formatEvent

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    retried: Deferred[None] = Deferred()
    with capturedLogs() as events:
        connection = RedisConnection(
            TCP4ClientEndpoint(reactor, "127.0.0.1", free),
            reactor,
            1.0,
            lambda protocol: Deferred.fromCoroutine(_nothing()),
            name="commands",
        )
        # Retries come every 50 ms at first: several of them within 0.5 s.
        reactor.callLater(0.5, retried.callback, None)
        connection.service.startService()
        try:
            await retried
        finally:
            # Stopping cancels an attempt under way: that is no failure to report.
            await connection.service.stopService()
    lines = [formatEvent(e) for e in events]
    said = [line for line in lines if "cannot connect to Redis" in line]
    assert len([line for line in lines if "Scheduling retry" in line]) > 2, lines
    assert said == [
        "commands: cannot connect to Redis: Connection was refused by other side: "
        "111: Connection refused; retrying until it answers"
    ], lines


def test_stopping_while_connecting_is_not_called_unreachable() -> None:
    """A connection attempt cancelled by the service stopping logs no 'cannot connect'."""
    from twisted.internet.address import HostnameAddress
    from twisted.internet.error import ConnectingCancelledError
    from twisted.internet.interfaces import IStreamClientEndpoint
    from twisted.internet.task import Clock
    from twisted.logger import formatEvent
    from zope.interface import implementer

    @implementer(IStreamClientEndpoint)
    class Hanging:
        """Connects never; cancelled, fails as HostnameEndpoint does."""

        def connect(self, factory: Any) -> Deferred[Any]:
            address = HostnameAddress(b"127.0.0.1", 6379)
            return Deferred(lambda d: d.errback(ConnectingCancelledError(address)))

    clock = Clock()
    with capturedLogs() as events:
        connection = RedisConnection(
            Hanging(), clock, 1.0, lambda protocol: Deferred.fromCoroutine(_nothing())
        )
        connection.service.startService()
        connection.service.stopService()
    lines = [formatEvent(e) for e in events]
    assert not [line for line in lines if "cannot connect" in line], lines


async def _nothing() -> None:
    return None


def test_commands_fail_at_once_without_a_connection() -> None:
    """With no connection up, a command fails at once with RedisDown instead of queueing."""
    from twisted.internet.task import Clock

    connection = RedisConnection(
        TCP4ClientEndpoint(Clock(), "127.0.0.1", 1),
        Clock(),
        1.0,
        lambda protocol: Deferred.fromCoroutine(_nothing()),
    )
    d = connection.execute(b"PING")
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(RedisDown)


def test_a_lost_connection_fails_every_waiting_command() -> None:
    """Commands waiting when the connection drops fail with RedisDown, and on_lost is told."""
    from twisted.internet.testing import StringTransport

    protocol = RedisProtocol()
    lost: list[RedisProtocol] = []
    protocol.on_lost = lost.append
    protocol.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    first, second = protocol.execute(b"GET", b"a"), protocol.execute(b"GET", b"b")
    protocol.dataReceived(b"$1\r\nx\r\n")
    assert first.result == b"x"
    failures: list[Any] = []
    second.addErrback(failures.append)
    protocol.connectionLost()
    assert failures and failures[0].check(RedisDown)
    assert lost == [protocol]


def test_a_command_sent_as_late_ones_fail_is_not_failed_with_them() -> None:
    """Failing late commands survives their callbacks sending more (a pipelined request's)."""
    from twisted.internet.testing import StringTransport

    protocol = RedisProtocol()
    protocol.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    first = protocol.execute(b"GET", b"a", sent=0.0)
    second = protocol.execute(b"GET", b"b", sent=0.0)
    sent_then: list[Deferred[Any]] = []
    first.addErrback(lambda _: sent_then.append(protocol.execute(b"GET", b"c", sent=10.0)))
    failures: list[Any] = []
    second.addErrback(failures.append)
    protocol.fail_late(5.0, "late")
    assert failures and failures[0].check(RedisDown)
    [fresh] = sent_then
    assert not fresh.called
    # Replies still answer in order: the late ones' are dropped.
    protocol.dataReceived(b"$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n")
    assert fresh.result == b"c"


def test_messages_go_to_the_subscriber_not_to_commands() -> None:
    """A pub/sub message is handed to on_message; the reply to SUBSCRIBE answers the command."""
    from twisted.internet.testing import StringTransport

    messages: list[tuple[bytes, bytes]] = []
    protocol = RedisProtocol(lambda channel, data: messages.append((channel, data)))
    protocol.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    subscribed = protocol.execute(b"SUBSCRIBE", b"c")
    protocol.dataReceived(
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nid\r\n"
    )
    assert subscribed.result == [b"subscribe", b"c", 1]
    assert messages == [(b"c", b"id")]


def test_garbage_from_redis_drops_the_connection() -> None:
    """Bytes that are not RESP2 fail what waited with RedisDown and abort the connection."""
    from twisted.internet.testing import StringTransport

    protocol = RedisProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
    failures: list[Any] = []
    protocol.execute(b"PING").addErrback(failures.append)
    with capturedLogs() as events:
        protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert transport.disconnecting
    assert failures and failures[0].check(RedisDown)
    assert "unparseable" in failures[0].getErrorMessage()
    # The one who waited says why, as often as it sees fit; not this.
    assert not events
