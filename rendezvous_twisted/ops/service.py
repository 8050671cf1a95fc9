"""
The server's lifecycle as Twisted services: the store's start and graceful
stop (L{StoreService}), the listeners, SIGHUP, the open-file limit, and what
the start says (L{Http2Off}).
"""

from __future__ import annotations

import errno
import gc
import resource
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from rendezvous_twisted.core.budget import worst_case_memory
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.store import RendezvousStore
from rendezvous_twisted.http.tokens import ClosableCreatePolicy
from rendezvous_twisted.words import quantity


class Lifecycle:
    """
    Whether the server serves or is stopping, shared by whoever must know:
    the health check, systemd's notifications, the graceful stop.
    """

    def __init__(self) -> None:
        self.stopping = False
        self._on_stopping: list[Callable[[], object]] = []
        #: Fires once the graceful stop has answered and closed everything.
        self.drained: Deferred[None] = Deferred()

    def on_stopping(self, callback: Callable[[], object]) -> None:
        """
        Call C{callback} once, when the stop begins.
        """
        self._on_stopping.append(callback)

    def stop(self) -> None:
        """
        The stop begins (idempotent).
        """
        if self.stopping:
            return
        self.stopping = True
        for callback in self._on_stopping:
            callback()


class Draining(Protocol):
    """
    What the graceful stop needs of the site that serves the store.
    """

    def drain(self, clock: IReactorTime, timeout_seconds: float) -> Deferred[None]:
        """
        Let every request being answered finish, then close every
        connection; fire once all are closed, aborting the rest after
        C{timeout_seconds}.
        """


class StoppingService(Service):
    """
    Marks the L{Lifecycle} as stopping.  Put it last in its parent, so that
    a stop reaches it first, before any listener closes.
    """

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.lifecycle.stop()


class StoreService(Service):
    """
    Owns a store for the life of the process: logs the limits it serves
    with on start, and on stop answers every parked reader (304, so clients
    poll again), lets the requests in flight finish and closes every
    connection (all within C{shutdown_timeout_seconds}) before the process
    goes.

    Put it first in its parent, so that it stops last, after the listeners
    stopped accepting.
    """

    log = Logger()

    def __init__(
        self,
        store: RendezvousStore,
        config: Config,
        clock: IReactorTime,
        site: Draining | None = None,
        lifecycle: Lifecycle | None = None,
        http2: bool = False,
    ) -> None:
        """
        @param site: what serves the store, whose requests in flight the
            stop lets finish before it stops the store's own service (a
            Redis store's connections).
        @param http2: whether connections may speak HTTP/2, which the
            logged worst-case memory prices at its limits.
        """
        self.store = store
        #: The store's own service, started with this one and stopped only
        #: once the requests in flight were answered.
        self.connections = store.service
        self.config = config
        self.clock = clock
        self.site = site
        self.lifecycle = lifecycle or Lifecycle()
        #: Whether connections may speak HTTP/2 (priced so in the budget).
        self.http2 = http2

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.connections.startService()
        c = self.config
        self.log.info(
            "rendezvous store started: TTL {ttl}s, max {max_bytes} bytes, poll timeout "
            "{poll}s, {max_rendezvous} rendezvous ({per_address} per address), "
            "{parked} ({per_rendezvous} per rendezvous)",
            ttl=c.ttl_seconds,
            max_bytes=c.max_bytes,
            poll=c.poll_timeout_seconds,
            max_rendezvous=c.max_rendezvous,
            per_address=c.max_rendezvous_per_address,
            max_parked=c.max_parked,
            parked=quantity(c.max_parked, "parked reader"),
            per_rendezvous=c.max_parked_per_rendezvous,
        )
        elsewhere = self.store.memory_elsewhere()
        self.log.info(
            "worst-case memory at these limits: {budget}",
            budget=worst_case_memory(c, elsewhere is not None, self.http2).describe(),
        )
        if elsewhere is not None:
            where, budget = elsewhere
            self.log.info(
                "worst-case memory {where}: {budget}", where=where, budget=budget.describe()
            )
        self._check_descriptor_limit()

    def _check_descriptor_limit(self) -> None:
        """
        Warn when the process may open fewer files than max_connections
        (and the refused connections that wait for their request) need:
        then the operating system, not the connection cap, refuses the
        excess, without an answer.
        """
        try:
            import resource
        except ImportError:  # pragma: no cover - not on POSIX
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Some descriptors go to listening sockets, logs and the interpreter.
        wanted = self.config.max_connections + self.config.max_waiting_refusals + 64
        if soft != resource.RLIM_INFINITY and soft < wanted:
            self.log.warn(
                "the process may open {soft} files, fewer than max_connections "
                "({max_connections}) needs; raise it (ulimit -n, LimitNOFILE=) to {wanted}",
                soft=soft,
                max_connections=self.config.max_connections,
                wanted=wanted,
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.lifecycle.stop()
        self.store.shutdown()
        if self.site is None:
            drained: Deferred[None] = succeed(None)
        else:
            drained = self.site.drain(self.clock, self.config.shutdown_timeout_seconds)

        def settled(result: None) -> Deferred[None]:
            self.log.info("stopped gracefully")
            closed: Deferred[None] = maybeDeferred(self.connections.stopService)
            # Give the reactor a turn to write what the last closes left.
            return closed.addCallback(lambda _: deferLater(self.clock, 0, lambda: None))

        d = drained.addCallback(settled)
        d.addCallback(lambda _: self.lifecycle.drained.callback(None))
        return d


class StartupError(Exception):
    """
    The server cannot start, for a reason its operator can fix; the
    message says which, in one line.
    """


class StartFailed(SystemExit, Exception):
    """
    A start that failed for a reason already logged in one line, ending
    the process.  twistd takes it as any exception (it removes its PID file
    and, when daemonizing, tells the parent process waiting for the start,
    which would otherwise wait forever); Python takes it as a SystemExit:
    the process ends with status 1, printing no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


def cannot_listen(label: str, error: BaseException) -> str:
    """
    Why listening on C{label} (e.g. C{--listen tcp:80}) failed, and what to do.
    """
    cause = getattr(error, "socketError", None) or error
    code = getattr(cause, "errno", None)
    port = getattr(error, "port", None)
    if code == errno.EADDRINUSE:
        why = "the address is already in use: another process listens there (ss -ltnp shows which)"
    elif code == errno.EACCES and isinstance(port, int) and 0 < port < 1024:
        why = (
            f"permission denied: port {port} needs root (twistd's --uid and --gid then drop "
            "it) or CAP_NET_BIND_SERVICE; or listen on a port above 1023 behind a proxy"
        )
    elif code == errno.EADDRNOTAVAIL:
        why = "no such address on this machine (check interface=)"
    else:
        why = getattr(cause, "strerror", None) or str(cause)
    return f"cannot listen on {label}: {why}"


class ListenerService(StreamServerEndpointService):
    """
    Twisted's endpoint service (its C{endpoint} and C{factory}), raising a
    failure to listen at start, as a L{StartupError} naming L{label}, and
    telling where it listens.

    Twisted's own raises such a failure only behind a private flag (which
    C{strports.service} sets), so the three methods that listen, start and
    stop are written here over the endpoint's public C{listen}.
    """

    #: How the user named this listener, for messages: C{--listen 9000}.
    label = "a listener"
    #: The scheme and path of the URL it serves, for the line that says
    #: where to connect once it listens.
    scheme = "http"
    path = ""
    _log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]
        #: The port, once listening (None if listening failed); None
        #: until the service starts.
        self._listening: Deferred[IListeningPort | None] | None = None

    def privilegedStartService(self) -> None:
        # Service's, not the endpoint service's: this one listens itself.
        Service.privilegedStartService(self)
        starting = True
        failed: list[Failure] = []

        def cannot(failure: Failure) -> None:
            if starting:
                failed.append(failure)
            elif not failure.check(CancelledError):
                self._log.failure("cannot listen on {label}", failure, label=self.label)

        try:
            listening: Deferred[IListeningPort | None] = self.endpoint.listen(self.factory)
        except (CannotListenError, OSError) as e:
            raise StartupError(cannot_listen(self.label, e)) from e
        self._listening = listening.addErrback(cannot)
        starting = False
        if failed:
            error = failed[0].value
            if isinstance(error, (CannotListenError, OSError)):
                raise StartupError(cannot_listen(self.label, error)) from error
            failed[0].raiseException()
        self.whenListening().addCallback(self._say_where)

    def startService(self) -> None:
        # Service's, not the endpoint service's: see privilegedStartService.
        Service.startService(self)
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, or the attempt to; fires once the port is closed.
        """
        assert self._listening is not None, "the service has not started"
        self._listening.cancel()

        def close(port: IListeningPort | None) -> Deferred[None]:
            closing = None if port is None else port.stopListening()
            return succeed(None) if closing is None else closing

        def stopped(result: Failure | None) -> Failure | None:
            self.running = False
            return result

        closed: Deferred[None] = self._listening.addCallback(close)
        return closed.addBoth(stopped)

    def _say_where(self, port: IListeningPort | None) -> None:
        if port is not None:
            self._log.info(
                "serving {where} ({label})",
                where=where(port.getHost(), self.scheme, self.path),
                label=self.label,
            )

    def whenListening(self) -> Deferred[IListeningPort | None]:
        """
        Fires with the listening port once listening (or None if listening
        failed, which is logged).  Call it after the service started.
        """
        waiting = self._listening
        assert waiting is not None, "the service has not started"
        result: Deferred[IListeningPort | None] = Deferred()

        def listening(port: IListeningPort | None) -> IListeningPort | None:
            result.callback(port)
            return port

        waiting.addCallback(listening)
        return result


#: A listener on every address, reached here on loopback.
_WILDCARDS = {
    "0.0.0.0": ("127.0.0.1", " on every IPv4 address"),  # noqa: S104 - naming it, not binding
    "::": ("::1", " on every address"),
}


def where(address: IAddress, scheme: str, path: str = "") -> str:
    """
    Where clients reach a listener at C{address}, for a newcomer to copy: a
    URL, the loopback one for a listener on every address.
    """
    if isinstance(address, UNIXAddress):
        name = address.name.decode() if isinstance(address.name, bytes) else address.name
        return f"the UNIX socket {name}"
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return str(address)
    host, everywhere = _WILDCARDS.get(address.host, (address.host, ""))
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{address.port}/{path}{everywhere}"


class HangupReloader(Service):
    """
    Calls C{reload} on the reactor thread whenever the process gets SIGHUP
    (C{systemctl reload}), while the service runs; the previous handler is
    put back on stop.
    """

    log = Logger()

    def __init__(self, reload: Callable[[], object], reactor: IReactorFromThreads) -> None:
        self._reload = reload
        self._reactor = reactor
        self._previous: Any = None
        self._installed = False

    def privilegedStartService(self) -> None:
        # As early as the listeners: a reload may come once they listen.
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._install()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._install()

    def _install(self) -> None:
        if not self._installed:
            self._installed = True
            self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._installed:
            self._installed = False
            signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler may run between any two bytecodes: do nothing
        # here but hand the work to the reactor, as Twisted's own handlers do.
        self._reactor.callFromThread(self._reloadNow)

    def _reloadNow(self) -> None:
        self.log.info("SIGHUP: reloading")
        self._reload()


class LateListenerService(ListenerService):
    """
    A listener that goes on listening while the server drains, and stops
    once the L{Lifecycle} has drained: the metrics and health listener,
    which must answer "stopping" during a graceful stop.
    """

    def __init__(self, endpoint: Any, factory: Any, lifecycle: Lifecycle) -> None:
        super().__init__(endpoint, factory)
        self.lifecycle = lifecycle

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = Deferred()

        def stop(result: object) -> object:
            super(LateListenerService, self).stopService().chainDeferred(stopped)
            return result

        self.lifecycle.drained.addBoth(stop)
        return stopped


def raise_open_file_limit() -> tuple[int, int]:
    """
    Raise this process' soft limit on open files to its hard limit, since
    every parked reader holds a socket; return the (soft, hard) limits now
    in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            # Some platforms cap the soft limit below an unlimited hard one.
            return soft, hard
        soft = hard
    return soft, hard


class OpenFileLimitService(Service):
    """
    On start, raises the open-file limit (L{raise_open_file_limit}) and
    logs it.  Whether it suffices is L{StoreService}'s warning: every parked
    reader holds a connection, so C{max_connections} (not C{max_parked}) is
    what needs descriptors, and this service starts first so that the check
    sees the raised limit.
    """

    log = Logger()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        soft, hard = raise_open_file_limit()
        self.log.info(
            "open-file limit: {soft} (hard limit {hard})",
            soft="unlimited" if soft == resource.RLIM_INFINITY else soft,
            hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
        )


class Http2Off(Service):
    """
    Says at start that the TLS listeners speak HTTP/1.1 only, and how to get
    HTTP/2: without the C{http2} extra, C{curl --http2} and browsers are
    served HTTP/1.1 without a word.
    """

    log = Logger()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.log.info(
            "HTTP/2 is off (h2 is not installed): TLS listeners speak HTTP/1.1 only; "
            "for HTTP/2, install the http2 extra (pip install 'rendezvous-twisted[http2]')"
        )


class PolicyService(Service):
    """
    Owns MSC4388's create policy: says at start who may create sessions,
    and on stop closes the connections a homeserver policy holds.  Put it
    before the store's service in its parent, so that it stops after the
    requests in flight were answered.
    """

    log = Logger()

    def __init__(self, policy: ClosableCreatePolicy, config: Config) -> None:
        self.policy = policy
        self.config = config

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        c = self.config
        if c.msc4388 == "off":
            who = "MSC4388 is off: its paths answer 404 M_UNRECOGNIZED (--msc4388)"
        elif c.msc4388 == "open":
            who = "anyone may create MSC4388 sessions (--msc4388 open)"
        else:
            who = (
                f"only users of {c.homeserver} may create MSC4388 sessions, their access "
                f"tokens judged by its whoami (--msc4388 authenticated)"
            )
        self.log.info(
            "{who}; sessions live {lifetime}s", who=who, lifetime=c.msc4388_lifetime_seconds
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.policy.close()


class FrozenHeap(Service):
    """
    Once the server has started, moves what is alive then (modules, classes,
    the routes, the configuration: what lives as long as the process) out of
    the garbage collector's sight (C{gc.freeze}), so that its collections
    walk only what connections and requests made since.

    Klein's C{render} leaves every request in reference cycles (its
    closures refer to themselves), so requests are freed by the collector,
    not by reference counting, and full collections come often; each one
    walked the whole start-up heap, about a tenth of the server's time in
    the exchange benchmark (docs/performance.md).
    """

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        gc.collect()
        gc.freeze()
