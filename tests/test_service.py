"""
Tests for L{rendezvous_twisted.ops.service}: L{ListenerService}, a listener
that listens through the endpoint's public API, telling a failure to listen
in words that name the listener, at start or later; and L{FrozenHeap}.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from rendezvous_twisted import tap
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.ops.service import FrozenHeap, ListenerService, PolicyService, StartupError

from .conftest import answered, fired


class LaterEndpoint:
    """
    A server endpoint whose listen() answers only when the test says so.
    """

    def __init__(self) -> None:
        self.listening: list[Deferred[IListeningPort]] = []

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = Deferred()
        self.listening.append(d)
        return d


class FailingEndpoint:
    """
    A server endpoint whose listen() fails at once with C{error}.
    """

    def __init__(self, error: Exception) -> None:
        self.error = error

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = Deferred()
        d.errback(self.error)
        return d


def listener(endpoint: Any) -> ListenerService:
    """
    A listener on C{endpoint}, named as --listen 9000 names it.
    """
    service = ListenerService(endpoint, Factory.forProtocol(Protocol))
    service.label = "--listen 9000"
    return service


def test_a_failure_to_listen_after_the_start_is_logged_naming_the_listener() -> None:
    """A listen failing after the start is one critical line naming the listener, not Unhandled."""
    endpoint = LaterEndpoint()
    service = listener(endpoint)
    service.startService()
    port = service.whenListening()
    with capturedLogs() as events:
        endpoint.listening[0].errback(CannotListenError("", 9000, OSError("taken")))
    assert fired(port) is None
    [event] = events
    assert event["log_level"] == LogLevel.critical
    assert formatEvent(event) == "cannot listen on --listen 9000"
    assert fired(service.stopService()) is None
    assert not service.running


def test_stopping_before_it_listens_cancels_the_listen_quietly() -> None:
    """Stopping a listener whose listen is still pending cancels it, logging nothing."""
    endpoint = LaterEndpoint()
    service = listener(endpoint)
    service.startService()
    with capturedLogs() as events:
        stopped = service.stopService()
    assert answered(stopped) and fired(stopped) is None
    assert events == []
    assert not service.running


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (CannotListenError("", 9000, OSError("taken")), StartupError),
        (ValueError("not a listen failure"), ValueError),
    ],
)
def test_a_failure_to_listen_at_the_start_is_raised(
    error: Exception, raised: type[Exception]
) -> None:
    """At the start a failure to listen is a StartupError naming the listener; others raise."""
    service = listener(FailingEndpoint(error))
    with pytest.raises(raised) as caught:
        service.privilegedStartService()
    if raised is StartupError:
        assert str(caught.value).startswith("cannot listen on --listen 9000: ")


def test_the_heap_alive_at_start_is_frozen() -> None:
    """Once started, the server moves what is alive then out of the garbage collector's sight."""
    gc.unfreeze()
    try:
        FrozenHeap().startService()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_server_freezes_its_heap_after_everything_else_started() -> None:
    """makeService starts the heap freeze after every service but the one that says it stops."""
    options = tap.Options()
    options.parseOptions([])
    root = tap.makeService(options, reactor=MemoryReactorClock())
    services = list(IServiceCollection(root))
    assert isinstance(services[-2], FrozenHeap)


class _Policy:
    """
    A create policy that counts its closes.
    """

    def __init__(self) -> None:
        self.closed = 0

    def may_create(self, authorization: object) -> Deferred[bool]:
        return succeed(True)

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("off", "MSC4388 is off"),
        ("open", "anyone may create MSC4388 sessions"),
        ("authenticated", "only users of https://hs.example.org may create MSC4388 sessions"),
    ],
)
def test_the_policy_service_says_who_may_create_and_closes_the_policy(mode: str, said: str) -> None:
    """The start says who may create MSC4388 sessions; the stop closes the policy's connections."""
    policy = _Policy()
    config = Config(msc4388=mode, homeserver="https://hs.example.org")
    service = PolicyService(policy, config)
    with capturedLogs() as events:
        service.startService()
    lines = [formatEvent(event) for event in events]
    assert any(said in line and "sessions live 300.0s" in line for line in lines), lines
    assert policy.closed == 0
    service.stopService()
    assert policy.closed == 1
