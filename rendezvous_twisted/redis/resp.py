"""
A small Redis client on Twisted: RESP2 over one connection, kept up.

Why not txredisapi: it connects through the global reactor, queues
commands while disconnected (a request would hang where we must answer
503 at once), and decodes replies as text unless told otherwise.  What the
store needs is small: pipelined commands with replies matched in order, a
deadline on each, one subscription, and a connection that comes back by
itself.  Replies are parsed by C{hiredis} when it is installed (the
C{redis} extra), by L{ReplyParser} otherwise.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

T = TypeVar("T")


class RedisReplyError(Exception):
    """
    Redis answered a command with an error reply.
    """


class RedisDown(Exception):
    """
    A command got no answer: no connection, a lost one, too many commands
    waiting, or no reply within the deadline.
    """


_INCOMPLETE = object()


class ReplyParser:
    """
    RESP2 replies from a byte stream, in pure Python: C{feed} bytes, then
    C{gets} until it returns False (no whole reply yet).  The interface is
    C{hiredis.Reader}'s, so that either can be used.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._position = 0

    def feed(self, data: bytes) -> None:
        if self._position:
            self._buffer = self._buffer[self._position :]
            self._position = 0
        self._buffer += data

    def gets(self) -> Any:
        reply = self._parse(self._position)
        if reply is _INCOMPLETE:
            return False
        value, self._position = reply
        return value

    def _parse(self, start: int) -> Any:
        buffer = self._buffer
        end = buffer.find(b"\r\n", start)
        if end < 0:
            return _INCOMPLETE
        kind, line, after = buffer[start : start + 1], buffer[start + 1 : end], end + 2
        if kind == b"$":
            length = int(line)
            if length < 0:
                return None, after
            if len(buffer) < after + length + 2:
                return _INCOMPLETE
            return buffer[after : after + length], after + length + 2
        if kind == b":":
            return int(line), after
        if kind == b"+":
            return line, after
        if kind == b"-":
            return RedisReplyError(line.decode("utf-8", "replace")), after
        if kind == b"*":
            length = int(line)
            if length < 0:
                return None, after
            items = []
            for _ in range(length):
                item = self._parse(after)
                if item is _INCOMPLETE:
                    return _INCOMPLETE
                value, after = item
                items.append(value)
            return items, after
        raise ValueError(f"not a RESP2 reply: {kind!r}")


def detached(d: Deferred[T]) -> Deferred[T]:
    """
    C{d}'s outcome in a Deferred of its own, which may be cancelled or
    failed first without touching C{d}'s chain; C{d}'s outcome is then
    dropped.
    """
    result: Deferred[T] = Deferred()

    def settled(outcome: T | Failure) -> None:
        if result.called:
            return  # cancelled or failed meanwhile
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    d.addBoth(settled)
    return result


def reply_parser() -> Any:
    """
    The fastest parser at hand: hiredis' if installed, else L{ReplyParser}.
    """
    try:
        import hiredis
    except ImportError:  # pragma: no cover - the redis extra is not installed
        return ReplyParser()
    return hiredis.Reader(replyError=RedisReplyError)


def encode(arguments: Sequence[bytes | str | int]) -> bytes:
    """
    One command as a RESP2 array of bulk strings.
    """
    parts = [b"*%d\r\n" % len(arguments)]
    for argument in arguments:
        if isinstance(argument, str):
            argument = argument.encode("utf-8")
        elif isinstance(argument, int):
            argument = b"%d" % argument
        parts.append(b"$%d\r\n%s\r\n" % (len(argument), argument))
    return b"".join(parts)


class RedisProtocol(Protocol):
    """
    One connection: commands are written at once (pipelined), and each
    reply answers the oldest command still waiting.  A reply that is a
    pub/sub C{message} goes to C{on_message} instead.
    """

    log = Logger()

    def __init__(self, on_message: Callable[[bytes, bytes], None] | None = None) -> None:
        # Commands waiting for their replies, oldest first, with when each
        # was sent (by the clock given to execute).
        self._waiting: deque[tuple[Deferred[Any], float]] = deque()
        self._parser = reply_parser()
        self._on_message = on_message
        self.on_made: Callable[[RedisProtocol], None] | None = None
        self.on_lost: Callable[[RedisProtocol], None] | None = None

    def connectionMade(self) -> None:
        if self.on_made is not None:
            self.on_made(self)

    @property
    def waiting(self) -> int:
        """
        How many commands wait for their reply.
        """
        return len(self._waiting)

    def execute(self, *arguments: bytes | str | int, sent: float = 0.0) -> Deferred[Any]:
        """
        Send a command; the Deferred fires with its reply, or fails with
        L{RedisReplyError} or L{RedisDown}.  C{sent} is the time now, for
        L{fail_late}.
        """
        assert self.transport is not None
        d: Deferred[Any] = Deferred()
        self._waiting.append((d, sent))
        self.transport.write(encode(arguments))
        return d

    def fail_late(self, sent_before: float, why: str) -> None:
        """
        Fail every command sent before C{sent_before} that still waits.
        Replies come in order, so those are the oldest; each keeps its place
        in the queue, for its reply to be dropped if it ever comes.
        """
        late = []
        for d, sent in self._waiting:
            if sent >= sent_before:
                break
            late.append(d)
        # Failed once the queue was read: their callbacks may send more
        # (a pipelined HTTP request runs as the one before it finishes).
        for d in late:
            if not d.called:
                d.errback(RedisDown(why))

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        try:
            parser.feed(data)
            reply = parser.gets()
            while reply is not False:
                self._deliver(reply)
                reply = parser.gets()
        except Exception as e:
            # A reply we cannot parse leaves the stream unusable.  Not
            # logged here: whoever waited says why (at most every so often,
            # when something that is not Redis answers every reconnect).
            self._fail_waiting(f"an unparseable reply from Redis ({e!r})")
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _deliver(self, reply: Any) -> None:
        if (
            self._on_message is not None
            and type(reply) is list
            and len(reply) == 3
            and reply[0] == b"message"
        ):
            self._on_message(reply[1], reply[2])
            return
        if not self._waiting:
            raise ValueError("a reply that no command asked for")
        d, _ = self._waiting.popleft()
        if d.called:
            return  # its deadline passed; the reply comes too late
        if isinstance(reply, RedisReplyError):
            d.errback(reply)
        else:
            d.callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._fail_waiting(f"the connection to Redis was lost: {reason.getErrorMessage()}")
        if self.on_lost is not None:
            self.on_lost(self)

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = self._waiting, deque()
        for d, _ in waiting:
            if not d.called:
                d.errback(RedisDown(why))


class _Factory(Factory):
    noisy = False

    def __init__(
        self, connection: RedisConnection, on_message: Callable[[bytes, bytes], None] | None
    ) -> None:
        self._connection = connection
        self._on_message = on_message

    def buildProtocol(self, addr: IAddress | None) -> RedisProtocol:
        protocol = RedisProtocol(self._on_message)
        protocol.on_made = self._connection._made
        protocol.on_lost = self._connection._lost
        return protocol


def _jitter() -> float:
    # Up to a tenth of a second, so that processes that lost Redis together
    # do not all knock at once; backoffPolicy's default is up to a second.
    return random.random() / 10  # noqa: S311 - not a secret


#: Seconds before the next attempt to connect, by failures in a row: from
#: 50 ms up to 2 s.
_backoff = backoffPolicy(initialDelay=0.05, maxDelay=2.0, jitter=_jitter)
#: A set-up failure that repeats is logged at most this often.
_COMPLAIN_EVERY_SECONDS = 10.0


@implementer(IStreamClientEndpoint)
class _SaysWhyNot:
    """
    An endpoint that tells C{why} each time a connection attempt fails,
    and fails as the endpoint it wraps does.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, why: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._why = why

    def connect(self, protocolFactory: Any) -> Deferred[Any]:  # noqa: N803 (the interface's name)
        def failed(failure: Failure) -> Failure:
            self._why(failure)
            return failure

        return self._endpoint.connect(protocolFactory).addErrback(failed)


class RedisConnection:
    """
    A connection to Redis that is kept up: reconnected with backoff when
    lost, while every command sent meanwhile fails at once with
    L{RedisDown} rather than waiting for it.

    @param prepare: runs on each new connection before it is used (AUTH,
        SELECT, SUBSCRIBE); a failure drops that connection and retries.
    @param heartbeat_seconds: how often an idle or busy connection is
        PINGed; one that does not answer within C{timeout_seconds} is
        dropped and made anew.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        reactor: IReactorTime,
        timeout_seconds: float,
        prepare: Callable[[RedisProtocol], Deferred[Any]],
        on_message: Callable[[bytes, bytes], None] | None = None,
        on_up: Callable[[], None] | None = None,
        on_down: Callable[[], None] | None = None,
        max_waiting: int = 10_000,
        name: str = "redis",
        heartbeat_seconds: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self._timeout_seconds = timeout_seconds
        self._prepare = prepare
        self._on_up = on_up
        self._on_down = on_down
        self._max_waiting = max_waiting
        self._name = name
        self._protocol: RedisProtocol | None = None
        self._heartbeat: LoopingCall | None = None
        self._sweeper: LoopingCall | None = None
        self._heartbeat_seconds = heartbeat_seconds
        self.service = ClientService(
            _SaysWhyNot(endpoint, self._unreachable),
            _Factory(self, on_message),
            retryPolicy=self._retry_delay,
            clock=reactor,
        )
        # Connections that failed their set-up in a row (a TLS handshake
        # refused, a wrong password): ClientService counts a connection made
        # as a success, and would retry those at its shortest delay.
        self._failures = 0
        self._last_complaint: tuple[str, float] = ("", -_COMPLAIN_EVERY_SECONDS)

    @property
    def up(self) -> bool:
        """
        Whether a prepared connection is there to take commands.
        """
        return self._protocol is not None

    def execute(self, *arguments: bytes | str | int) -> Deferred[Any]:
        """
        Send one command with a deadline of C{timeout_seconds}.
        """
        protocol = self._protocol
        if protocol is None:
            return fail(RedisDown("not connected to Redis"))
        if protocol.waiting >= self._max_waiting:
            return fail(RedisDown("too many commands wait for Redis"))
        # Its deadline is kept by _sweep, not by a timer of its own.
        return protocol.execute(*arguments, sent=self._reactor.seconds())

    def _deadline(self, d: Deferred[Any]) -> Deferred[Any]:
        # Detached: C{d} may be a chain (AUTH, then SUBSCRIBE) that counts
        # as "called" while it waits on its next link, and a called Deferred
        # can no longer be failed at its deadline.
        answer = detached(d)
        timer = self._reactor.callLater(self._timeout_seconds, self._late, answer)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return answer.addBoth(settled)

    def _retry_delay(self, attempt: int) -> float:
        return _backoff(max(attempt, self._failures))

    def _unreachable(self, failure: Failure) -> None:
        """
        Say why connecting failed (Redis not running, a wrong host or port):
        ClientService's own lines say only that it will retry.
        """
        if failure.check(CancelledError, ConnectingCancelledError):  # stopping, not Redis
            return
        error = failure.getErrorMessage().rstrip(".")
        if self._first_time(error):
            self.log.warn(
                "{name}: cannot connect to Redis: {error}; retrying until it answers",
                name=self._name,
                error=error,
            )

    def _first_time(self, error: str) -> bool:
        """
        Whether to log C{error}: at once for a new reason, then at most
        every C{_COMPLAIN_EVERY_SECONDS} while it repeats.
        """
        now = self._reactor.seconds()
        last, when = self._last_complaint
        if error == last and now - when < _COMPLAIN_EVERY_SECONDS:
            return False
        self._last_complaint = (error, now)
        return True

    def _complain(self, error: str, failure: Failure) -> None:
        """
        Log why a connection failed its set-up (see L{_first_time}).
        """
        if not self._first_time(error):
            return
        # No answer in time is an outage, as a lost connection is; an
        # error reply (a wrong password, an unknown database) is not.
        log = self.log.warn if failure.check(RedisDown) else self.log.error
        log("{name}: Redis refused the connection's set-up: {error}", name=self._name, error=error)

    def _late(self, d: Deferred[Any]) -> None:
        if not d.called:
            d.errback(RedisDown(f"Redis did not answer within {self._timeout_seconds}s"))

    def _made(self, protocol: RedisProtocol) -> None:
        # Prepared here rather than by ClientService's prepareConnection:
        # when that fails, ClientService neither closes the connection nor
        # accepts being told it closed.  Here a failure just drops it, and
        # ClientService reconnects as for any lost connection.

        def ready(result: Any) -> None:
            if protocol.transport is None or not protocol.connected:
                return
            self._failures = 0
            self._protocol = protocol
            self._heartbeat = LoopingCall(self._beat, protocol)
            self._heartbeat.clock = self._reactor
            self._heartbeat.start(self._heartbeat_seconds, now=False)
            self._sweeper = LoopingCall(self._sweep, protocol)
            self._sweeper.clock = self._reactor
            self._sweeper.start(self._timeout_seconds / 4, now=False)
            self.log.info("{name}: connected to Redis", name=self._name)
            if self._on_up is not None:
                # Not from inside the connection's set-up: code woken by
                # on_up may well stop the service.
                self._reactor.callLater(0, self._announce, protocol)

        def refused(failure: Failure) -> None:
            self._failures += 1
            self._complain(failure.getErrorMessage(), failure)
            self._reactor.callLater(0, self._drop, protocol)

        # PING last: a connection is up once Redis has answered on it, not
        # once TCP (or a TLS handshake yet to fail) says so.
        prepared = self._prepare(protocol).addCallback(lambda _: protocol.execute(b"PING"))
        self._deadline(prepared).addCallbacks(ready, refused)

    def _drop(self, protocol: RedisProtocol) -> None:
        # Unless it went by itself meanwhile (a TLS handshake refused).
        if protocol.connected:
            assert protocol.transport is not None
            protocol.transport.abortConnection()  # type: ignore[attr-defined]

    def _sweep(self, protocol: RedisProtocol) -> None:
        """
        Fail the commands that waited past their deadline: one timer for
        them all, since replies come in order, rather than one each.  A
        command fails between one and one and a quarter timeouts late.
        """
        protocol.fail_late(
            self._reactor.seconds() - self._timeout_seconds,
            f"Redis did not answer within {self._timeout_seconds}s",
        )

    def _announce(self, protocol: RedisProtocol) -> None:
        if self._protocol is protocol and self._on_up is not None:
            self._on_up()

    def _beat(self, protocol: RedisProtocol) -> None:
        """
        PING, so that a connection that went quiet (a Redis that hangs, a
        peer gone without a word) is found out and made anew, rather than
        trusted to deliver the changes parked readers wait for.
        """

        def silent(failure: Failure) -> None:
            # An error reply is an answer: the connection is alive.
            if failure.check(RedisDown) and self._protocol is protocol:
                assert protocol.transport is not None
                self.log.warn("{name}: Redis did not answer PING; reconnecting", name=self._name)
                protocol.transport.abortConnection()  # type: ignore[attr-defined]

        protocol.execute(b"PING", sent=self._reactor.seconds()).addErrback(silent)

    def _lost(self, protocol: RedisProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
            for loop in (self._heartbeat, self._sweeper):
                if loop is not None and loop.running:
                    loop.stop()
            self._heartbeat = self._sweeper = None
            if not self.service.running:
                return  # we closed it
            self.log.warn("{name}: lost the connection to Redis; reconnecting", name=self._name)
            if self._on_down is not None:
                self._on_down()
