"""
Who a client is: its address (through trusted proxies), the key its limits
are counted under, and the network policy that applies to it.

Nothing here raises on what a client sends: a forwarding header that does
not parse is worth nothing, and the request is judged by what we do know.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from twisted.internet.address import IPv4Address as TCP4Address
from twisted.internet.address import IPv6Address as TCP6Address
from twisted.internet.interfaces import IAddress

from rendezvous_twisted.core.config import Config, parse_network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The forwarding headers a trusted proxy may be configured to write.
X_FORWARDED_FOR = "x-forwarded-for"
FORWARDED = "forwarded"
PROXY_HEADERS = (X_FORWARDED_FOR, FORWARDED)

# More hops than any real chain of proxies; a longer header is cut to its
# rightmost entries (the ones our own proxies wrote), so that a client
# cannot make us parse a megabyte of commas.
_MAX_HOPS = 32


def peer_host(address: IAddress | None) -> str | None:
    """
    The IP address of a connection's peer as Twisted reports it, None for
    a peer that has none (a UNIX socket).
    """
    if isinstance(address, (TCP4Address, TCP6Address)):
        return address.host
    return None


def parse_address(text: str | bytes) -> IPAddress | None:
    """
    An IP address as a peer or a proxy reports it, or None.  Accepts a port
    (C{192.0.2.1:80}, C{[2001:db8::1]:80}) and a zone id (C{fe80::1%eth0},
    dropped), and maps IPv4-mapped IPv6 (C{::ffff:192.0.2.1}) to IPv4, so
    that one client has one address however it reached us.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    text = text.strip(" \t")
    if len(text) > 64:  # longer than any address with a port and a zone
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        # IPv4 with a port; a bare IPv6 address has two colons or more.
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split_list(values: Sequence[bytes] | None) -> list[bytes]:
    """
    The elements of a comma-separated header, over all its lines, at most
    the last L{_MAX_HOPS}.
    """
    if not values:
        return []
    elements = b",".join(values).split(b",")
    return [element.strip(b" \t") for element in elements[-_MAX_HOPS:]]


def _forwarded_parameter(element: bytes, wanted: bytes) -> bytes | None:
    """
    One parameter (C{for}, C{proto}) of an RFC 7239 C{Forwarded} element,
    unquoted, or None when it has none.
    """
    for pair in element.split(b";"):
        name, equals, value = pair.partition(b"=")
        if equals and name.strip(b" \t").lower() == wanted:
            value = value.strip(b" \t")
            if len(value) >= 2 and value[:1] == b'"' == value[-1:]:
                value = value[1:-1].replace(b"\\", b"")
            return value
    return None


@dataclass(frozen=True, slots=True)
class Client:
    """
    A client as the limits see it.

    C{address} is its IP address, None when unknown (a UNIX socket peer).
    C{key} is what its limits are counted under: the IPv4 address, the IPv6
    network of the configured prefix, or one shared key for peers without
    an IP address.  C{secure} is the scheme a trusted proxy reported, or
    None to use the connection's own.
    """

    address: IPAddress | None
    key: str
    secure: bool | None = None
    #: Its address as the logs show it (None when unknown), written once:
    #: the access log shows it for every request, and an address object
    #: writes itself anew each time.
    text: str | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Frozen: set as dataclasses' own __init__ sets fields.
        object.__setattr__(self, "text", None if self.address is None else str(self.address))


class ClientResolver:
    """
    Turns a peer address and the request's headers into a L{Client}, and
    answers the network policy of L{Config}.
    """

    def __init__(self, config: Config) -> None:
        self._trusted = tuple(parse_network(n) for n in config.trusted_proxies)
        self._allow_create = tuple(parse_network(n) for n in config.allow_create)
        self._deny = tuple(parse_network(n) for n in config.deny)
        self._ipv6_prefix = config.ipv6_prefix_length
        self._header = config.proxy_header.encode("ascii")
        # Every request of a connection comes from the same peer: parse its
        # address and build its key once, not per request (bounded, for
        # peers spread over many IPv6 addresses).
        self._untrusted_peer = lru_cache(maxsize=4096)(self._untrusted_peer_of)

    def _untrusted_peer_of(self, host: str) -> Client | None:
        """
        The client that is the peer at C{host}, unless that peer is a
        trusted proxy (None: its headers name the client).
        """
        address = parse_address(host)
        if self.trusted(address):
            return None
        return Client(address, self.key(address))

    def key(self, address: IPAddress | None) -> str:
        """
        The limit key of an address: IPv4 per address, IPv6 per network of
        the configured prefix (one host usually owns a whole /64).
        """
        if address is None:
            return "non-IP"
        if isinstance(address, ipaddress.IPv6Address):
            network = ipaddress.IPv6Network((address, self._ipv6_prefix), strict=False)
            return str(network)
        return str(address)

    def trusted(self, address: IPAddress | None) -> bool:
        """
        Whether C{address} is a configured trusted proxy.
        """
        return address is not None and _within(address, self._trusted)

    def denied(self, client: Client) -> bool:
        """
        Whether C{client} is in a C{deny} network.  A client of unknown
        address is never denied: no network names it.
        """
        if not self._deny:
            return False
        return client.address is not None and _within(client.address, self._deny)

    def may_create(self, client: Client) -> bool:
        """
        Whether C{client} may create rendezvous: anyone when no
        C{allow_create} network is configured, otherwise only its members.
        """
        if not self._allow_create:
            return True
        return client.address is not None and _within(client.address, self._allow_create)

    def peer(self, host: str | None) -> Client:
        # (Connections are counted before any header is read, so the peer
        # is all there is to go by.)
        """
        The client that is the peer itself, as seen before any header is
        read (for limits on connections).
        """
        address = parse_address(host) if host is not None else None
        return Client(address, self.key(address))

    def untrusted_peer(self, host: str) -> Client | None:
        """
        The client that is the peer at C{host} (its headers then name
        nobody), or None when that peer is a trusted proxy and its headers
        must be read (L{resolve}).
        """
        return self._untrusted_peer(host)

    def resolve(
        self,
        peer_host: str | None,
        forwarded: Sequence[bytes] | None,
        forwarded_proto: Sequence[bytes] | None,
    ) -> Client:
        """
        The client behind a request from C{peer_host} (None for a peer
        without an IP address), given the raw values of the configured
        forwarding header and of C{X-Forwarded-Proto} (read only along with
        C{X-Forwarded-For}).

        The headers count only when the peer is a trusted proxy, or has no
        IP address: a UNIX socket only local processes can reach, which is
        how a reverse proxy on the same host talks to us.  Then the chain of
        hops is read from the right (the entries our own proxies wrote) and
        the first untrusted address is the client.  When every hop is
        trusted, the leftmost is the client.  An entry that is not an
        address (C{unknown}, an obfuscated identifier, garbage) ends the
        walk: the hop that wrote it could not say who its client was, so the
        request is counted under that hop.
        """
        if peer_host is not None:
            peer = self._untrusted_peer(peer_host)
            if peer is not None:
                return peer
        address = parse_address(peer_host) if peer_host is not None else None
        rfc7239 = self._header == FORWARDED.encode("ascii")
        client = address
        # With X-Forwarded-For the scheme is X-Forwarded-Proto's.  RFC 7239
        # carries it in each element instead, beside the address: the proto
        # of the last element read says how its hop was reached, and
        # X-Forwarded-Proto is not read.
        proto = None if rfc7239 else forwarded_proto
        for element in reversed(_split_list(forwarded)):
            if rfc7239:
                element_proto = _forwarded_parameter(element, b"proto")
                proto = None if element_proto is None else [element_proto]
                named = _forwarded_parameter(element, b"for")
            else:
                named = element
            hop = parse_address(named) if named is not None else None
            if hop is None:
                break
            client = hop
            if not self.trusted(hop):
                break
        return Client(client, self.key(client), _proto(proto))


def _within(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def _proto(values: Sequence[bytes] | None) -> bool | None:
    """
    Whether C{X-Forwarded-Proto} says https (True), http (False), or
    nothing usable (None): one value, exactly C{http} or C{https}.
    """
    if not values or len(values) != 1:
        return None
    value = values[0].strip(b" \t").lower()
    if value == b"https":
        return True
    if value == b"http":
        return False
    return None
