"""
The fence around the private parts of C{twisted.web.http} that the HTTP/1.1
request and channel (L{rendezvous_twisted.http.request},
L{rendezvous_twisted.http.channel}) rely on: every private name they use
still exists, and the code of every Twisted method they override, or whose
work they take over, is the code they were written against.  When Twisted
changes one, these fail loudly, naming it: read the new code against those
modules, adapt them, update the digest here and the version pins in
pyproject.toml.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from twisted.web import http, server

from rendezvous_twisted.http import channel, request
from tests import fence
from tests.fence import source_digest

#: A digest of each method's source, as tested (Twisted 26.10.0).
SOURCES: dict[str, str] = {
    # Overridden (private): RendezvousRequest._cleanup, and the channel's
    # one answer to what it cannot parse.
    "http.Request._cleanup": "3e4358e4df9cc52d",
    "http.HTTPChannel._respondToBadRequestAndDisconnect": "c7ccc0f4450a7d6b",
    # Taken over: RendezvousRequest.process does its work (Date, prepath,
    # postpath, render) without the parts that change nothing here.
    "server.Request.process": "f75c1431d226a229",
    # Where the private attributes read are set and cleared.
    "http.Request.connectionLost": "e874acaf9f19205d",
    "http.HTTPChannel.lineReceived": "b77ec6f21116e827",
    "http.HTTPChannel.allContentReceived": "9f7c990696871a92",
    "http.HTTPChannel.requestDone": "a75a186c66f7d38d",
}


def _method(name: str) -> Any:
    module, cls, method = name.split(".")
    return getattr(getattr({"http": http, "server": server}[module], cls), method)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_what_we_override_or_take_over_is_unchanged(name: str) -> None:
    """Each twisted.web method the HTTP/1.1 request and channel override or redo is as tested."""
    assert source_digest(_method(name)) == SOURCES[name], (
        f"{name} changed (Twisted was upgraded): review rendezvous_twisted/http/request.py and "
        f"channel.py against its new code, then update its digest here and the pins in "
        f"pyproject.toml"
    )


@pytest.mark.parametrize(
    ("owner", "attribute"), sorted(request.PRIVATE_NAMES + channel.PRIVATE_NAMES)
)
def test_every_private_name_exists(owner: str, attribute: str) -> None:
    """Every private twisted.web name the HTTP/1.1 request and channel use is still there."""
    cls = fence.owner(owner)
    if hasattr(cls, attribute):
        return
    # Set on instances only: by the constructor, or as a request line comes.
    if cls is http.HTTPChannel:
        made = _channel()
        made.dataReceived(b"GET / HTTP/1.1\r\n")
        assert hasattr(made, attribute), f"{owner}.{attribute} is gone"
        return
    assert attribute in inspect.getsource(cls), f"{owner}.{attribute} is gone"


def _channel() -> http.HTTPChannel:
    made = http.HTTPChannel()
    made.makeConnection(StringTransport())
    return made


def test_no_other_private_twisted_name_is_used() -> None:
    """The request and channel modules name no private Twisted attribute but those fenced here."""
    fenced = {name for _, name in request.PRIVATE_NAMES + channel.PRIVATE_NAMES}
    ours = set(vars(channel.RendezvousChannel)) | set(vars(request.RendezvousRequest))
    for module in (request, channel):
        source = inspect.getsource(module)
        for word in set(re.findall(r"\.(_[a-zA-Z]\w*)", source)):
            if word.startswith("__") or word in ours or word in fenced:
                continue
            twisted_has = any(
                hasattr(twisted, word)
                for twisted in (http.HTTPChannel, http.Request, server.Request, _channel())
            )
            assert not twisted_has, f"{module.__name__} uses Twisted's private {word} unfenced"
