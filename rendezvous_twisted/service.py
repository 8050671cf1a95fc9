"""
The store's lifecycle as a Twisted service.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from rendezvous_twisted.budget import worst_case_memory
from rendezvous_twisted.config import Config
from rendezvous_twisted.store import RendezvousStore


class StoreService(Service):
    """
    Owns a store for the life of the process: logs the limits it serves
    with on start, and on stop answers every parked reader (304, so clients
    poll again) before the process goes.

    Put it first in its parent, so that it stops last, after the listeners.
    """

    log = Logger()

    def __init__(self, store: RendezvousStore, config: Config, clock: IReactorTime) -> None:
        self.store = store
        self.config = config
        self.clock = clock

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        c = self.config
        self.log.info(
            "rendezvous store started: TTL {ttl}s, max {max_bytes} bytes, poll timeout "
            "{poll}s, {max_rendezvous} rendezvous ({per_address} per address), "
            "{max_parked} parked readers ({per_rendezvous} per rendezvous)",
            ttl=c.ttl_seconds,
            max_bytes=c.max_bytes,
            poll=c.poll_timeout_seconds,
            max_rendezvous=c.max_rendezvous,
            per_address=c.max_rendezvous_per_address,
            max_parked=c.max_parked,
            per_rendezvous=c.max_parked_per_rendezvous,
        )
        self.log.info(
            "worst-case memory at these limits: {budget}",
            budget=worst_case_memory(c).describe(),
        )
        self._check_descriptor_limit()

    def _check_descriptor_limit(self) -> None:
        """
        Warn when the process may open fewer files than max_connections:
        then the operating system, not the connection cap, refuses the
        excess, without an answer.
        """
        try:
            import resource
        except ImportError:  # pragma: no cover - not on POSIX
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Some descriptors go to listening sockets, logs and the interpreter.
        wanted = self.config.max_connections + 64
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
        self.store.shutdown()
        # The answers are in the transports' buffers now.  Give the reactor
        # one turn to write them before shutdown drops every connection.
        return deferLater(self.clock, 0, lambda: None)
