"""
Which store holds the rendezvous: the one place that knows every kind of
store.  Everything else holds a L{RendezvousStore} and asks it, never which
kind it is.
"""

from __future__ import annotations

from typing import Any

from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.core.store import RendezvousStore
from rendezvous_twisted.redis.store import RedisStore
from rendezvous_twisted.redis.url import StoreURL


def open_store(config: Config, reactor: Any, url: StoreURL | None) -> RendezvousStore:
    """
    The store C{--store} names: this process' memory when C{url} is None,
    else the Redis at C{url}.  Nothing is started: its C{service} is.

    @param reactor: provides L{IReactorTime} (the store's clock) and, for
        Redis, can connect as the URL asks.
    """
    if url is None:
        return MemoryStore(config, reactor)
    return RedisStore(config, reactor, reactor, url)
