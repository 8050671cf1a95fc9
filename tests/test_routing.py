"""
The Klein app the protocols compose: every route is declared with its methods,
and the guard refuses the Hosts that werkzeug's routing would fail on.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from werkzeug.exceptions import HTTPException

from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.http.guard import _check_host
from rendezvous_twisted.protocols import RendezvousAPI


def _api(config: Config | None = None) -> RendezvousAPI:
    config = config or Config()
    clock = Clock()
    return RendezvousAPI(MemoryStore(config, clock), config, clock)


def test_every_route_is_declared_with_its_methods() -> None:
    """Each rule of the app names its methods: werkzeug, not the handlers, answers a wrong one."""
    rules = list(_api().app.url_map.iter_rules())
    assert rules
    for rule in rules:
        assert rule.methods, rule
        assert rule.methods <= {"GET", "HEAD", "PUT", "POST", "DELETE"}, rule


def test_session_routes_follow_the_configured_prefix() -> None:
    """MSC4108's session routes are declared under the configured prefix, and only there."""
    rules = {
        rule.rule for rule in _api(Config(msc4108_session_prefix="/s/")).app.url_map.iter_rules()
    }
    assert "/s/<session_id>" in rules
    assert not any(
        rule.startswith("/_matrix/client/unstable/org.matrix.msc4108/rendezvous/") for rule in rules
    )


def test_hosts_refused_as_werkzeug_refuses_them() -> None:
    """The Host check refuses what Klein (UTF-8) and werkzeug's bind (IDNA) would refuse."""
    url_map = _api().app.url_map
    for good in [b"example.org", b"EXAMPLE.org", b"[::1]", b"127.0.0.1", b"b\xc3\xbccher.example"]:
        _check_host(good)
        url_map.bind(good.decode("utf-8"))
    for bad in [b"\xff\xfe", b"a" * 64 + b".example", b"a..b"]:
        with pytest.raises(UnicodeError):
            _check_host(bad)
    for bad_name in ["a" * 64 + ".example", "a..b"]:
        with pytest.raises(HTTPException):
            url_map.bind(bad_name)
