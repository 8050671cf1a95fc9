"""
systemd's service protocol, written by hand (no libsystemd): C{sd_notify}
datagrams over C{$NOTIFY_SOCKET} for C{Type=notify} units, and the watchdog.

Socket activation needs nothing here: Twisted's C{systemd:} endpoint adopts
the sockets systemd passes (C{LISTEN_FDS}, C{LISTEN_PID}, C{LISTEN_FDNAMES}).
The environment is read by L{rendezvous_twisted.tap}, which hands it in.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rendezvous_twisted.core.store import RendezvousStore
from rendezvous_twisted.ops.service import Lifecycle
from rendezvous_twisted.words import quantity

#: How often STATUS= is refreshed while serving, in seconds.
STATUS_INTERVAL_SECONDS = 10.0


class Notifier:
    """
    Sends C{sd_notify} messages to C{address}: a filesystem path, or an
    abstract socket written C{@name}.  With no address (not run by systemd,
    or C{NotifyAccess=none}) every send is a no-op.  Sending never raises:
    a lost notification is logged, the server goes on.
    """

    log = Logger()

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        if self.address is not None and not self.address.startswith(("/", "@")):
            self.log.warn(
                "NOTIFY_SOCKET {address!r} is neither a path nor an abstract socket; "
                "not notifying systemd",
                address=self.address,
            )
            self.address = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    def send(self, *fields: str) -> bool:
        """
        Send one datagram of C{NAME=value} lines; whether it was sent.
        """
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, target)
        except OSError as e:
            self.log.warn(
                "cannot notify systemd at {address}: {error}", address=self.address, error=e
            )
            return False
        return True


def watchdog_interval_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """
    How often to send C{WATCHDOG=1}: half of C{WATCHDOG_USEC}, when it is
    set and meant for us (C{WATCHDOG_PID} unset or our pid); else None.
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Listening(Protocol):
    """
    A listener that tells when it listens (L{ListenerService} does).
    """

    def whenListening(self) -> Deferred[Any]:
        """
        Fires with the listening port, or None if listening failed.
        """


class SystemdService(Service):
    """
    Tells systemd how the server is doing: C{READY=1} once every listener
    listens, C{STATUS=} with live counts (then every
    L{STATUS_INTERVAL_SECONDS}), C{STOPPING=1} when a stop begins, and
    C{WATCHDOG=1} every C{watchdog_seconds} while the reactor runs.
    """

    log = Logger()

    def __init__(
        self,
        notifier: Notifier,
        listeners: Sequence[Listening],
        status: Callable[[], str],
        lifecycle: Lifecycle,
        clock: IReactorTime,
        watchdog_seconds: float | None = None,
    ) -> None:
        self.notifier = notifier
        self.listeners = list(listeners)
        self.status = status
        self.lifecycle = lifecycle
        self.clock = clock
        self.watchdog_seconds = watchdog_seconds
        self._loops: list[LoopingCall] = []
        lifecycle.on_stopping(self._stopping)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.notifier.address is None:
            return
        if self.watchdog_seconds is not None:
            self._loop(self.watchdog_seconds, lambda: self.notifier.send("WATCHDOG=1"))
        waiting = DeferredList([listener.whenListening() for listener in self.listeners])
        waiting.addCallback(self._listening)

    def _listening(self, results: list[tuple[bool, Any]]) -> None:
        if self.lifecycle.stopping or not self.running:
            return
        if any(port is None for _, port in results):
            # A listener failed (and twistd logged why): never claim ready.
            return
        self.notifier.send("READY=1", "STATUS=" + self.status())
        self.log.info("told systemd we are ready")
        self._loop(
            STATUS_INTERVAL_SECONDS,
            lambda: self.notifier.send("STATUS=" + self.status()),
            now=False,
        )

    def _loop(self, seconds: float, call: Callable[[], object], now: bool = True) -> None:
        loop = LoopingCall(call)
        loop.clock = self.clock
        loop.start(seconds, now=now)
        self._loops.append(loop)

    def _stopping(self) -> None:
        self.notifier.send("STOPPING=1", "STATUS=stopping: " + self.status())

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]

        def stop_loops(result: object) -> object:
            for loop in self._loops:
                if loop.running:
                    loop.stop()
            self._loops.clear()
            return result

        # The watchdog goes on while the stop drains connections: systemd's
        # stop timeout, not the watchdog, bounds that.
        self.lifecycle.drained.addBoth(stop_loops)


class _Serving(Protocol):
    @property
    def in_flight(self) -> int: ...

    @property
    def connection_count(self) -> int: ...


def status(store: RendezvousStore, site: _Serving) -> str:
    """
    The C{STATUS=} systemd shows: what the store holds and the site serves.
    """
    return ", ".join(
        (
            quantity(store.rendezvous_count, "rendezvous", "rendezvous"),
            quantity(store.parked_count, "parked reader"),
            quantity(site.in_flight, "request") + " in flight",
            quantity(site.connection_count, "connection"),
        )
    )
