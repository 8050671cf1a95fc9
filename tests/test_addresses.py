"""
Tests for L{rendezvous_twisted.http.clients}: client addresses through trusted
proxies, limit keys, and the network policy.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rendezvous_twisted.core.config import Config
from rendezvous_twisted.http.clients import ClientResolver, parse_address


def resolver(**config: Any) -> ClientResolver:
    return ClientResolver(Config(**config))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("192.0.2.1:8080", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%25eth0]:80", "fe80::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        (b"192.0.2.1", "192.0.2.1"),
    ],
)
def test_addresses_parse_with_ports_brackets_and_zones(text: str | bytes, expected: str) -> None:
    """Ports, brackets and zone ids are dropped, and IPv4-mapped IPv6 becomes IPv4."""
    assert parse_address(text) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unknown",
        "_hidden",
        "example.org",
        "192.0.2.1:x",
        "[2001:db8::1",
        "[::1]x",
        "1" * 100,
        "300.1.1.1",
        b"\xff\xfe",
        "192.0.2.1:80:80",
    ],
)
def test_garbage_is_no_address(text: str | bytes) -> None:
    """Anything that is not an address (obfuscated, unknown, garbage) parses to None."""
    assert parse_address(text) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_parse_address_never_raises(text: str | bytes) -> None:
    """parse_address returns an address or None for any input, and never raises."""
    result = parse_address(text)
    assert result is None or isinstance(result, (ipaddress.IPv4Address, ipaddress.IPv6Address))


def test_ipv4_clients_are_keyed_per_address() -> None:
    """Two IPv4 addresses are two clients."""
    clients = resolver()
    one, two = (clients.resolve(host, None, None).key for host in ("192.0.2.1", "192.0.2.2"))
    assert one != two


def test_ipv6_clients_are_keyed_per_64_by_default() -> None:
    """Addresses in one /64 are one client; the next /64 is another."""
    clients = resolver()
    one = clients.resolve("2001:db8:0:1::1", None, None).key
    assert one == "2001:db8:0:1::/64"
    assert clients.resolve("2001:db8:0:1:ffff::9", None, None).key == one
    assert clients.resolve("2001:db8:0:2::1", None, None).key != one


def test_ipv6_prefix_is_configurable() -> None:
    """With a /48 prefix, two /64s of one /48 are one client."""
    clients = resolver(ipv6_prefix_length=48)
    assert clients.resolve("2001:db8:0:1::1", None, None).key == "2001:db8::/48"
    assert clients.resolve("2001:db8:0:2::1", None, None).key == "2001:db8::/48"


def test_a_unix_socket_peer_is_a_trusted_proxy() -> None:
    """
    A peer without an IP address (a UNIX socket, reached only from this
    host) names its client like a trusted proxy; without a header its
    requests share one key that no network names.
    """
    clients = resolver(deny=("192.0.2.0/24",))
    client = clients.resolve(None, [b"198.51.100.1, 203.0.113.1"], [b"https"])
    assert client.address == ipaddress.ip_address("203.0.113.1") and client.secure
    assert clients.denied(clients.resolve(None, [b"192.0.2.1"], None))
    alone = clients.resolve(None, None, None)
    assert alone.address is None and alone.key == "non-IP"
    assert not clients.denied(alone)
    assert clients.resolve(None, [b"unknown"], None).key == "non-IP"


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    """X-Forwarded-For and X-Forwarded-Proto from a peer that is no trusted proxy change nothing."""
    clients = resolver(trusted_proxies=("10.0.0.0/8",))
    client = clients.resolve("192.0.2.7", [b"203.0.113.1"], [b"https"])
    assert client.address == ipaddress.ip_address("192.0.2.7")
    assert client.secure is None


@pytest.mark.parametrize(
    ("header", "client"),
    [
        ([b"203.0.113.1"], "203.0.113.1"),
        # A client-written entry on the left cannot hide the real client.
        ([b"198.51.100.66, 203.0.113.1"], "203.0.113.1"),
        # Our own proxies' entries are skipped, from the right.
        ([b"203.0.113.1, 10.0.0.2, 10.0.0.3"], "203.0.113.1"),
        ([b"203.0.113.1", b"10.0.0.2"], "203.0.113.1"),
        # Every hop trusted: the leftmost is the client.
        ([b"10.0.0.5, 10.0.0.2"], "10.0.0.5"),
        # An entry that is no address ends the walk at the hop that wrote it.
        ([b"203.0.113.1, unknown"], "10.0.0.1"),
        ([b"203.0.113.1, garbage, 10.0.0.2"], "10.0.0.2"),
        ([b"203.0.113.1:5555"], "203.0.113.1"),
        ([b"[2001:db8::5]:80"], "2001:db8::5"),
        (None, "10.0.0.1"),
        ([b""], "10.0.0.1"),
    ],
)
def test_trusted_proxy_names_the_first_untrusted_hop_from_the_right(
    header: list[bytes] | None, client: str
) -> None:
    """From a trusted proxy, the client is the rightmost X-Forwarded-For entry that is not ours."""
    clients = resolver(trusted_proxies=("10.0.0.0/8",))
    assert clients.resolve("10.0.0.1", header, None).address == ipaddress.ip_address(client)


@pytest.mark.parametrize(
    ("header", "client"),
    [
        ([b"for=203.0.113.1"], "203.0.113.1"),
        ([b'for="[2001:db8::7]:4711";proto=https;by=10.0.0.1'], "2001:db8::7"),
        ([b"for=198.51.100.66, for=203.0.113.1;proto=http"], "203.0.113.1"),
        ([b"for=203.0.113.1, for=_hidden"], "10.0.0.1"),
        ([b"for=unknown"], "10.0.0.1"),
        ([b"proto=https"], "10.0.0.1"),
        ([b'For="203.0.113.9"'], "203.0.113.9"),
    ],
)
def test_forwarded_header_per_rfc_7239(header: list[bytes], client: str) -> None:
    """
    With proxy_header "forwarded", the for= of RFC 7239 elements names the client, obfuscated ones
    nobody.
    """
    clients = resolver(trusted_proxies=("10.0.0.0/8",), proxy_header="forwarded")
    assert clients.resolve("10.0.0.1", header, None).address == ipaddress.ip_address(client)


@pytest.mark.parametrize(
    ("values", "secure"),
    [
        ([b"https"], True),
        ([b"HTTP"], False),
        ([b"https, http"], None),
        ([b"ftp"], None),
        ([b"https", b"https"], None),
        (None, None),
    ],
)
def test_forwarded_proto_from_a_trusted_proxy(
    values: list[bytes] | None, secure: bool | None
) -> None:
    """X-Forwarded-Proto from a trusted proxy counts when it is exactly one http or https."""
    clients = resolver(trusted_proxies=("10.0.0.0/8",))
    assert clients.resolve("10.0.0.1", [b"203.0.113.1"], values).secure is secure


@settings(max_examples=300, deadline=None)
@given(
    forwarded=st.one_of(st.none(), st.lists(st.binary(max_size=200), max_size=5)),
    proto=st.one_of(st.none(), st.lists(st.binary(max_size=20), max_size=3)),
    header=st.sampled_from(["x-forwarded-for", "forwarded"]),
)
def test_hostile_headers_never_raise(
    forwarded: list[bytes] | None, proto: list[bytes] | None, header: str
) -> None:
    """
    Any forwarding header resolves to some client without raising; from an untrusted peer, to the
    peer.
    """
    clients = resolver(trusted_proxies=("10.0.0.0/8", "::1/128"), proxy_header=header)
    assert clients.resolve("10.0.0.1", forwarded, proto).key
    assert clients.resolve("::1", forwarded, proto).key
    assert clients.resolve(None, forwarded, proto).key
    untrusted = clients.resolve("192.0.2.1", forwarded, proto)
    assert untrusted.address == ipaddress.ip_address("192.0.2.1")


def test_huge_forwarded_lists_are_cut_to_the_right() -> None:
    """A list of thousands of entries is read only from its right end, our proxies' side."""
    clients = resolver(trusted_proxies=("10.0.0.0/8",))
    header = [b", ".join([b"198.51.100.1"] * 5000 + [b"203.0.113.1"])]
    assert clients.resolve("10.0.0.1", header, None).address == ipaddress.ip_address("203.0.113.1")


def test_deny_and_allow_create() -> None:
    """deny networks are denied; with allow_create set, only its networks may create."""
    clients = resolver(deny=("192.0.2.0/24",), allow_create=("198.51.100.0/24", "2001:db8::/32"))
    denied = clients.resolve("192.0.2.9", None, None)
    allowed = clients.resolve("198.51.100.9", None, None)
    v6 = clients.resolve("2001:db8::1", None, None)
    other = clients.resolve("203.0.113.9", None, None)
    assert clients.denied(denied) and not clients.denied(allowed) and not clients.denied(other)
    assert clients.may_create(allowed) and clients.may_create(v6)
    assert not clients.may_create(other)
    assert resolver().may_create(other), "without allow_create, everyone may create"


def test_ipv4_mapped_peer_matches_ipv4_networks() -> None:
    """A peer seen as ::ffff:192.0.2.9 (a dual-stack listener) is 192.0.2.9 for every rule."""
    clients = resolver(deny=("192.0.2.0/24",), trusted_proxies=("10.0.0.0/8",))
    assert clients.denied(clients.resolve("::ffff:192.0.2.9", None, None))
    assert clients.trusted(parse_address("::ffff:10.0.0.1"))


@pytest.mark.parametrize(
    ("header", "secure"),
    [
        ([b"for=203.0.113.1;proto=https"], True),
        ([b'for=203.0.113.1;proto="http"'], False),
        # The client's own element counts, not a later hop's.
        ([b"for=203.0.113.1;proto=https, for=10.0.0.2;proto=http"], True),
        # A proxy that hides its client still says how it was reached.
        ([b"for=_hidden;proto=https"], True),
        ([b"for=203.0.113.1"], None),
        (None, None),
    ],
)
def test_forwarded_proto_is_the_clients_element(
    header: list[bytes] | None, secure: bool | None
) -> None:
    """
    With proxy_header "forwarded", the scheme is the proto= of the element
    that named the client, and X-Forwarded-Proto is not read.
    """
    clients = resolver(trusted_proxies=("10.0.0.0/8",), proxy_header="forwarded")
    x_forwarded_proto = [b"https" if secure is None else b"http"]
    assert clients.resolve("10.0.0.1", header, x_forwarded_proto).secure is secure
