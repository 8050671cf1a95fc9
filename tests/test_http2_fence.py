"""
The fence around C{twisted.web._http2} and h2's internals: every private
name L{rendezvous_twisted.http.http2} and L{rendezvous_twisted.http.http2_limits}
rely on still exists, and the code of every Twisted and h2 method they
override or call is the code they were written against.  When Twisted or h2
changes one of them, these fail loudly, naming it: read the new code against
rendezvous_twisted/http/http2.py and http2_limits.py, adapt them, update the
digest here and the version pins in pyproject.toml.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

_http2 = pytest.importorskip("twisted.web._http2", reason="the http2 extra is not installed")
import h2.connection  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from rendezvous_twisted.http import http2, http2_limits  # noqa: E402
from tests import fence  # noqa: E402
from tests.fence import source_digest  # noqa: E402

#: A digest of each method's source, as tested (Twisted 26.10.0, h2 4.4.1).
SOURCES: dict[str, str] = {
    "H2Connection.__init__": "0cd6ee4ac041f47f",
    "H2Connection.connectionMade": "e0dd035e182bcf96",
    "H2Connection.dataReceived": "750829ca7cb270cd",
    "H2Connection.connectionLost": "97dc72d9a3630b21",
    "H2Connection._requestReceived": "b701727a6ce4ca8d",
    "H2Connection._requestDataReceived": "46f9e234c59e1b27",
    "H2Connection._requestEnded": "4371a81e03de2bd6",
    "H2Connection._handleWindowUpdate": "167aa98e3c8ef72d",
    "H2Connection._requestDone": "216905888bacc003",
    "H2Connection._tryToWriteControlData": "3a3de23d3f4f75de",
    "H2Connection._terminate": "bd1de5e20b977e09",
    "H2Connection.openStreamWindow": "57b9e9ddac2e5fb1",
    "H2Connection.abortRequest": "30190e545c439425",
    "H2Connection.endRequest": "12a4b4c2ddd303c6",
    "H2Connection._sendPrioritisedData": "962d5b59c8d38671",
    "H2Stream.__init__": "bc7615e38e185a16",
    "H2Stream.receiveDataChunk": "2d49222e44d9cfc2",
    "H2Stream.resumeProducing": "29742f3bdf4efb56",
    "H2Stream.connectionLost": "e0dc2ded0a2099da",
    "h2.H2Connection.__init__": "e5c93da64d0e6476",
}


def _method(name: str) -> Callable[..., Any]:
    owner: Any = _http2
    if name.startswith("h2."):
        owner = h2.connection
        name = name.removeprefix("h2.")
    for part in name.split("."):
        owner = getattr(owner, part)
    method: Callable[..., Any] = owner
    return method


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_what_we_override_or_call_is_unchanged(name: str) -> None:
    """Each Twisted or h2 method the HTTP/2 limits override or call has its tested source."""
    assert source_digest(_method(name)) == SOURCES[name], (
        f"{name} changed (Twisted or h2 was upgraded): review rendezvous_twisted/http/http2.py "
        f"and http2_limits.py against its new code, then update its digest here and the pins "
        f"in pyproject.toml"
    )


@pytest.mark.parametrize(("owner", "attribute"), http2.PRIVATE_NAMES)
def test_every_private_name_exists(owner: str, attribute: str) -> None:
    """Every private Twisted or h2 name the HTTP/2 limits use is still on its class or instances."""
    cls = fence.owner(owner)
    if hasattr(cls, attribute):
        return
    if cls is _http2.H2Connection:
        assert hasattr(cls(Clock()), attribute), f"{owner}.{attribute} is gone"
    else:
        assert attribute in inspect.getsource(cls.__init__), f"{owner}.{attribute} is gone"


def test_h2_remembers_fewer_closed_streams() -> None:
    """The h2 state machine of a connection keeps MAX_CLOSED_STREAMS closed streams, not 65536."""
    machine = http2_limits._StateMachine()
    closed: Any = machine._closed_streams
    assert closed._size_limit == http2_limits.MAX_CLOSED_STREAMS
