"""
Tests for L{rendezvous_twisted.core.config.Config}: SPEC.md's defaults and the
invariants checked on construction.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest

from rendezvous_twisted.core.config import DEFAULT_LISTEN, Config

#: Every limit that must be a positive, finite number.
LIMITS = [
    "ttl_seconds",
    "max_bytes",
    "poll_timeout_seconds",
    "max_rendezvous",
    "max_rendezvous_per_address",
    "max_parked",
    "max_parked_per_rendezvous",
    "max_content_type_bytes",
    "create_burst",
    "create_per_second",
    "request_burst",
    "request_per_second",
    "max_rate_buckets",
    "ipv6_prefix_length",
    "header_timeout_seconds",
    "body_timeout_seconds",
    "idle_timeout_seconds",
    "max_header_bytes",
    "max_headers",
    "max_streams_per_connection",
    "max_connections",
    "max_connections_per_address",
    "max_waiting_refusals",
    "shutdown_timeout_seconds",
    "store_timeout_seconds",
    "max_transactions_per_rendezvous",
    "homeserver_timeout_seconds",
    "token_cache_seconds",
]
#: The limits with a range of their own (tested below), not just "positive".
RANGES = {"msc4388_lifetime_seconds"}
#: The fields that are not limits: a URL, networks and a header name.
NOT_LIMITS = {
    "public_url",
    "msc4388",
    "homeserver",
    "msc4108_session_prefix",
    "trusted_proxies",
    "proxy_header",
    "allow_create",
    "deny",
}


def test_defaults_are_those_of_the_spec() -> None:
    """Config() carries SPEC.md's defaults: TTL 60 s, 10240 bytes, 20 s poll, 10000/32, 50000/8."""
    config = Config()
    assert config.ttl_seconds == 60
    assert config.max_bytes == 10240
    assert config.poll_timeout_seconds == 20
    assert config.max_rendezvous == 10000
    assert config.max_rendezvous_per_address == 32
    assert config.max_parked == 50000
    assert config.max_parked_per_rendezvous == 8
    assert config.public_url is None
    assert config.base_url is None


def test_shutdown_timeout_defaults_to_five_seconds() -> None:
    """A graceful stop waits at most 5 s for requests in flight unless told otherwise."""
    assert Config().shutdown_timeout_seconds == 5


def test_default_listen_is_loopback_8080() -> None:
    """With no --listen, a newcomer's server listens on TCP port 8080 of the loopback only."""
    assert DEFAULT_LISTEN == "tcp:8080:interface=127.0.0.1"


def test_limits_list_covers_every_numeric_field() -> None:
    """Every numeric field of Config is one of the limits checked below, so none goes unchecked."""
    numeric = {f.name for f in dataclasses.fields(Config) if f.name not in NOT_LIMITS}
    assert numeric == set(LIMITS) | RANGES


def test_config_is_frozen() -> None:
    """A Config cannot be changed after construction, so its invariants keep holding."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_bytes = 0  # type: ignore[misc]


@pytest.mark.parametrize("name", LIMITS)
@pytest.mark.parametrize(
    "value",
    [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf],
    ids=["0", "0.0", "-1", "-0.5", "nan", "inf", "-inf"],
)
def test_limit_must_be_positive_and_finite(name: str, value: float) -> None:
    """A limit that is zero, negative, NaN or infinite is refused with a ValueError naming it."""
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=re.escape(name)):
        Config(**kwargs)


@pytest.mark.parametrize("name", LIMITS)
def test_smallest_positive_limits_are_accepted(name: str) -> None:
    """Any positive value is accepted, down to 1 (and a fraction of a second for durations)."""
    value: Any = 0.001 if name.endswith("_seconds") else 1
    kwargs: dict[str, Any] = {name: value}
    # A global cap of 1 needs its local cap lowered with it (see below).
    local = {
        "max_rendezvous": "max_rendezvous_per_address",
        "max_parked": "max_parked_per_rendezvous",
        "max_connections": "max_connections_per_address",
    }
    if name in local:
        kwargs[local[name]] = 1
    config = Config(**kwargs)
    assert getattr(config, name) == value


def test_all_limits_at_one_are_accepted() -> None:
    """Local caps equal to their global ones are allowed: the bound is inclusive."""
    config = Config(
        max_rendezvous=1,
        max_rendezvous_per_address=1,
        max_parked=1,
        max_parked_per_rendezvous=1,
    )
    assert config.max_rendezvous_per_address == config.max_rendezvous == 1
    assert config.max_parked_per_rendezvous == config.max_parked == 1


def test_poll_timeout_may_exceed_ttl() -> None:
    """A poll timeout longer than the TTL is allowed: the store caps each wait at the expiry."""
    config = Config(ttl_seconds=10, poll_timeout_seconds=30)
    assert config.poll_timeout_seconds > config.ttl_seconds


def test_per_address_cap_above_global_is_refused() -> None:
    """A per-address rendezvous cap above the global one is refused, since it could never bind."""
    with pytest.raises(ValueError, match="max_rendezvous_per_address"):
        Config(max_rendezvous=10, max_rendezvous_per_address=11)


def test_default_per_address_cap_above_smaller_global_is_refused() -> None:
    """Lowering only the global rendezvous cap below the default per-address cap (32) is refused."""
    with pytest.raises(ValueError, match="max_rendezvous_per_address"):
        Config(max_rendezvous=31)
    assert Config(max_rendezvous=32).max_rendezvous_per_address == 32


def test_per_rendezvous_parked_cap_above_global_is_refused() -> None:
    """A per-rendezvous parked-reader cap above the global one is refused."""
    with pytest.raises(ValueError, match="max_parked_per_rendezvous"):
        Config(max_parked=4, max_parked_per_rendezvous=5)


def test_default_per_rendezvous_parked_cap_above_smaller_global_is_refused() -> None:
    """Lowering only the global parked cap below the default per-rendezvous cap (8) is refused."""
    with pytest.raises(ValueError, match="max_parked_per_rendezvous"):
        Config(max_parked=7)
    assert Config(max_parked=8).max_parked_per_rendezvous == 8


# public_url and base_url.


@pytest.mark.parametrize(
    "url",
    [
        "http://example.org",
        "https://example.org",
        "https://example.org/",
        "https://example.org:8443/",
        "https://example.org/_matrix/rendezvous",
        "https://example.org/_matrix/rendezvous/",
        "http://127.0.0.1:8080",
        "https://[::1]:8443/prefix",
    ],
)
def test_public_url_absolute_http_is_accepted(url: str) -> None:
    """An absolute http or https URL, with or without port and path prefix, is accepted as is."""
    assert Config(public_url=url).public_url == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "example.org",
        "example.org/prefix",
        "/prefix",
        "//example.org/",
        "ftp://example.org/",
        "ws://example.org/",
        "file:///srv/rendezvous",
        "https:///prefix",
        "https:example.org",
        "https://example.org/?a=b",
        "https://example.org/prefix?x",
        "https://example.org/#top",
    ],
)
def test_public_url_must_be_absolute_http_without_query_or_fragment(url: str) -> None:
    """A relative, non-http(s) or hostless URL, or one with a query or fragment, is refused."""
    with pytest.raises(ValueError, match="public_url"):
        Config(public_url=url)


# Each of these once passed, yet cannot prefix an id: urlsplit reads a bare
# "?" or "#" as an empty query or fragment, accepts an empty host, drops tabs
# and newlines before parsing (so the URL checked was not the URL stored),
# and does not check the port.
@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://example.org/?", id="empty-query"),
        pytest.param("https://example.org/prefix#", id="empty-fragment-after-path"),
        pytest.param("https://example.org/?#", id="empty-query-and-fragment"),
        pytest.param("https://:8443/", id="empty-host"),
        pytest.param("https://example.org\n/", id="newline"),
        pytest.param("https://example.org/pre fix", id="space"),
        pytest.param("https://example.org:https/", id="port-not-a-number"),
    ],
)
def test_public_url_that_cannot_prefix_an_id_is_refused(url: str) -> None:
    """A public_url with an empty query, fragment or host, whitespace, or a bad port is refused."""
    with pytest.raises(ValueError, match="public_url"):
        Config(public_url=url)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://example.org", "https://example.org/"),
        ("https://example.org/", "https://example.org/"),
        ("https://example.org///", "https://example.org/"),
        ("http://example.org:8080", "http://example.org:8080/"),
        ("https://example.org/_matrix/rendezvous", "https://example.org/_matrix/rendezvous/"),
        ("https://example.org/_matrix/rendezvous/", "https://example.org/_matrix/rendezvous/"),
        ("https://example.org/a/b//", "https://example.org/a/b/"),
    ],
)
def test_base_url_has_exactly_one_trailing_slash_and_keeps_the_prefix(url: str, base: str) -> None:
    """base_url is public_url with its path prefix kept and exactly one trailing slash."""
    assert Config(public_url=url).base_url == base


def test_base_url_joins_an_id_under_the_prefix() -> None:
    """Appending an id to base_url names that id under the configured prefix."""
    base_url = Config(public_url="https://example.org/rz").base_url
    assert base_url is not None
    assert base_url + "abc123" == "https://example.org/rz/abc123"


@pytest.mark.parametrize("seconds", [119.9, 300.1, 60.0, 3600.0])
def test_msc4388_lifetime_outside_what_the_proposal_allows_is_refused(seconds: float) -> None:
    """An MSC4388 lifetime outside 120 to 300 s is refused, naming the field."""
    with pytest.raises(ValueError, match=r"msc4388_lifetime_seconds.*120 to 300"):
        Config(msc4388_lifetime_seconds=seconds)


@pytest.mark.parametrize("seconds", [120.0, 300.0, 180.0])
def test_msc4388_lifetime_within_what_the_proposal_allows_is_kept(seconds: float) -> None:
    """An MSC4388 lifetime from 120 to 300 s, both ends included, is accepted."""
    assert Config(msc4388_lifetime_seconds=seconds).msc4388_lifetime_seconds == seconds


def test_msc4388_mode_must_be_one_of_three() -> None:
    """--msc4388 is off, open or authenticated; anything else is refused naming the field."""
    with pytest.raises(ValueError, match="msc4388='closed' must be off, open or authenticated"):
        Config(msc4388="closed")


def test_authenticated_mode_needs_a_homeserver() -> None:
    """Authenticated creation without a homeserver to check tokens is refused, not opened."""
    with pytest.raises(ValueError, match="needs homeserver"):
        Config(msc4388="authenticated")
    config = Config(msc4388="authenticated", homeserver="https://matrix.example.org")
    assert config.homeserver == "https://matrix.example.org"


@pytest.mark.parametrize(
    "url", ["matrix.example.org", "ftp://matrix.example.org", "https://", "https://x/?q=1"]
)
def test_homeserver_must_be_an_http_url(url: str) -> None:
    """A homeserver that is not an absolute http(s) URL is refused, naming the field."""
    with pytest.raises(ValueError, match="homeserver"):
        Config(homeserver=url)


@pytest.mark.parametrize(
    "prefix",
    ["/_matrix/client/v1/rendezvous/", "/_matrix/client/unstable/io.element.msc4388/rendezvous/"],
)
def test_msc4108_sessions_may_not_live_where_msc4388_sessions_do(prefix: str) -> None:
    """MSC4108's session prefix may not be MSC4388's session path (ids would be ambiguous)."""
    with pytest.raises(ValueError, match=r"msc4108_session_prefix.*MSC4388"):
        Config(msc4108_session_prefix=prefix)
