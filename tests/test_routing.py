"""
The routes that the resource finds without werkzeug (the root and one-segment
paths, the hot path) are exactly those werkzeug's own match finds.
"""

from __future__ import annotations

import pytest
from werkzeug.exceptions import HTTPException

from rendezvous_twisted.http.web import RendezvousAPI, _check_host, _Routes

SEGMENTS = [
    b"",
    b"abcdefghijklmnopqrstuv",
    b"x",
    b"a.b",
    b"..",
    b"%41",
    b"a b",
    b"caf\xc3\xa9",
    b"a;b=c",
    b"a?b",
    b"-_~",
]


def _werkzeug(path: str) -> tuple[str, dict[str, str]] | None:
    adapter = RendezvousAPI.app.url_map.bind("localhost", "/", path_info=path)
    try:
        rule, arguments = adapter.match(return_rule=True)
    except HTTPException:
        return None
    return str(rule.endpoint), dict(arguments)


@pytest.mark.parametrize("segment", SEGMENTS)
def test_one_segment_routes_as_werkzeug_does(segment: bytes) -> None:
    """A root or one-segment path is routed to the endpoint and arguments werkzeug matches."""
    found = _Routes(RendezvousAPI.app).lookup([segment])
    assert found is not None
    endpoint, segment_count, arguments = found
    assert (endpoint, arguments) == _werkzeug("/" + segment.decode("utf-8"))
    assert segment_count == (0 if segment == b"" else 1)


@pytest.mark.parametrize("segments", [[b"a", b"b"], [b"a/b"], [b"a", b""]])
def test_other_paths_are_left_to_werkzeug(segments: list[bytes]) -> None:
    """Deeper paths, and a segment holding an unquoted slash, are routed by werkzeug."""
    assert _Routes(RendezvousAPI.app).lookup(segments) is None


def test_hosts_refused_as_werkzeug_refuses_them() -> None:
    """The Host check refuses what Klein (UTF-8) and werkzeug's bind (IDNA) would refuse."""
    for good in [b"example.org", b"EXAMPLE.org", b"[::1]", b"127.0.0.1", b"b\xc3\xbccher.example"]:
        _check_host(good)
        RendezvousAPI.app.url_map.bind(good.decode("utf-8"))
    for bad in [b"\xff\xfe", b"a" * 64 + b".example", b"a..b"]:
        with pytest.raises(UnicodeError):
            _check_host(bad)
    for bad_name in ["a" * 64 + ".example", "a..b"]:
        with pytest.raises(HTTPException):
            RendezvousAPI.app.url_map.bind(bad_name)
