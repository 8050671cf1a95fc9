"""
Every limit and default of the server, in one place.

The command line (L{rendezvous_twisted.tap}) and the C{.tac} file build a
L{Config}; everything else receives one and never reads the environment or
the command line itself.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

#: Where a newcomer's server listens when no C{--listen} is given.
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"

#: MSC4108's payload limit ("the server enforces a maximum payload size of
#: 4KB"), fixed by the proposal; the general C{max_bytes} caps it too.
MSC4108_MAX_BYTES = 4096
#: Where MSC4108 session URLs live by default: beside the create endpoint.
MSC4108_DEFAULT_SESSION_PREFIX = "/_matrix/client/unstable/org.matrix.msc4108/rendezvous/"
# A path prefix of one or more non-empty segments of URL-safe characters.
_SESSION_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)+/\Z")


def check_positive(name: str, value: float) -> None:
    """
    Refuse a limit that is not a positive, finite number.
    """
    # NaN fails every comparison, so "not > 0" also refuses it.
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, not {value!r}")


def _check_public_url(url: str) -> None:
    """
    Refuse a base URL that could not prefix an id: it must be absolute
    http(s) with a host, and have nothing that urlsplit would quietly drop
    or that would end up inside Location unescaped.
    """
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError(f"public_url must not contain spaces or control characters: {url!r}")
    if "?" in url or "#" in url:
        raise ValueError(f"public_url must not have a query or a fragment: {url!r}")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        raise ValueError(f"public_url has a bad port: {url!r}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"public_url must be an absolute http(s) URL with a host, not {url!r}")


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    A network in CIDR notation (a bare address is a /32 or /128).  Raises
    ValueError, naming the value, for anything else, and for a network with
    host bits set (C{10.0.0.1/8} is almost always a typo for C{10.0.0.0/8}).
    """
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"not a network in CIDR notation: {text!r} ({e})") from e


#: The fields that are not positive numbers.
_NOT_LIMITS = frozenset(
    (
        "public_url",
        "msc4108_session_prefix",
        "trusted_proxies",
        "proxy_header",
        "allow_create",
        "deny",
    )
)


@dataclass(frozen=True, slots=True)
class Config:
    """
    The server's limits, with their units in their names.

    Invariants (checked on construction, so an impossible configuration
    never starts):
      - every count, size and duration is positive;
      - the per-address cap on rendezvous is at most the global one, and the
        per-rendezvous cap on parked readers at most the global one (a larger
        local cap could never be reached);
      - the per-address cap on connections is at most the global one;
      - the IPv6 prefix is 1 to 128 bits; networks are CIDR without host bits;
      - the poll timeout may exceed the TTL, but a parked reader is never
        held past its rendezvous' expiry: the store caps each wait at the
        time the rendezvous has left, and its expiry answers the reader.
    """

    #: Lifetime of a rendezvous, fixed at creation; writes do not extend it.
    ttl_seconds: float = 60.0
    #: Largest payload accepted on create and on write.
    max_bytes: int = 10240
    #: Longest time a GET with a matching If-None-Match is held.
    poll_timeout_seconds: float = 20.0
    #: Rendezvous alive at once, across the server.
    max_rendezvous: int = 10000
    #: Rendezvous alive at once that one client address created.
    max_rendezvous_per_address: int = 32
    #: Parked GETs across the server.
    max_parked: int = 50000
    #: Parked GETs on one rendezvous.
    max_parked_per_rendezvous: int = 8
    #: Longest a graceful stop (SIGTERM) waits for requests being answered
    #: and their connections to close before aborting them.  Parked readers
    #: are answered at once, so this bounds slow uploads and slow readers.
    shutdown_timeout_seconds: float = 5.0
    #: Longest a request waits for the store (Redis) to answer before it is
    #: refused with 503; also the time to connect.
    store_timeout_seconds: float = 1.0
    #: Longest Content-Type a writer may store, so that a header cannot
    #: smuggle more bytes into memory than the payload limit admits.
    max_content_type_bytes: int = 255
    #: Base URL for Location (scheme, host and any path prefix); None means
    #: the request's own scheme and Host.
    public_url: str | None = None
    #: The path under which MSC4108 session URLs live, with a slash at each
    #: end; never "/" alone, which is the native protocol's.
    msc4108_session_prefix: str = MSC4108_DEFAULT_SESSION_PREFIX

    # Abuse limits (docs/security.md).  A client is the
    # key of ClientResolver: an IPv4 address, or an IPv6 network of
    # ipv6_prefix_length bits.
    #: Creates one client may make at once (tokens in its create bucket).
    create_burst: int = 10
    #: Creates per second that refill a client's create bucket.
    create_per_second: float = 0.5
    #: Requests of any kind (creates included) one client may make at once.
    request_burst: int = 60
    #: Requests per second that refill a client's request bucket.
    request_per_second: float = 10.0
    #: Buckets kept per limiter (two limiters); past it the least recently
    #: used is dropped, so a spray of addresses costs bounded memory.
    max_rate_buckets: int = 100000
    #: Bits of an IPv6 address that name one client (1 to 128).
    ipv6_prefix_length: int = 64
    #: Seconds a connection may take to send a request's line and headers,
    #: from its first byte (or from the connection's start).
    header_timeout_seconds: float = 10.0
    #: Seconds a request may take to send its body, once its headers are in.
    body_timeout_seconds: float = 10.0
    #: Seconds a connection may stay open with no request on it (an idle
    #: keep-alive connection, or an HTTP/2 one with no stream open) before it
    #: is closed.  Balancers that keep connections to the server open must
    #: close theirs sooner (contrib/nginx: keepalive_timeout 10s).
    idle_timeout_seconds: float = 15.0
    #: Bytes of request line and headers of one request (Twisted's own
    #: default; it also bounds any one line).
    max_header_bytes: int = 16384
    #: Header lines of one request.
    max_headers: int = 64
    #: Open connections across the server (past it: 503).  Every parked
    #: long-poll holds one, so it bounds parked readers too.
    max_connections: int = 4096
    #: Open connections from one client key (past it: 429); connections from
    #: trusted proxies are counted only against max_connections.
    max_connections_per_address: int = 100
    #: Connections refused at a connection cap that may wait at once for
    #: their request (at most header_timeout_seconds), to be answered 503 or
    #: 429 after it rather than before, which a client still sending would
    #: see as a broken pipe.  They are beyond max_connections, so they have
    #: a cap of their own; past it a refused connection is answered at once
    #: and closed.
    max_waiting_refusals: int = 64
    #: Networks (CIDR) whose peers are proxies we trust to name the client.
    #: Peers on a UNIX socket are always trusted: only local processes reach
    #: one, and a reverse proxy on the same host is what does.
    trusted_proxies: tuple[str, ...] = ()
    #: The header trusted proxies name the client in: "x-forwarded-for" or
    #: "forwarded" (RFC 7239).  Only one is read: a proxy passes the other
    #: through from the client unchecked.  The scheme comes with it:
    #: X-Forwarded-Proto, or the proto= of the client's Forwarded element.
    proxy_header: str = "x-forwarded-for"
    #: Networks (CIDR) allowed to create; empty means everyone.
    allow_create: tuple[str, ...] = ()
    #: Networks (CIDR) refused everything (403).
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name in _NOT_LIMITS:
                continue
            check_positive(field.name, getattr(self, field.name))
        if self.max_rendezvous_per_address > self.max_rendezvous:
            raise ValueError("max_rendezvous_per_address must not exceed max_rendezvous")
        if self.max_connections_per_address > self.max_connections:
            raise ValueError("max_connections_per_address must not exceed max_connections")
        if self.ipv6_prefix_length > 128:
            raise ValueError("ipv6_prefix_length must be at most 128")
        if self.proxy_header not in ("x-forwarded-for", "forwarded"):
            raise ValueError(
                f"proxy_header must be x-forwarded-for or forwarded, not {self.proxy_header!r}"
            )
        for name in ("trusted_proxies", "allow_create", "deny"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a tuple of networks, not a string")
            for network in getattr(self, name):
                try:
                    parse_network(network)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from e
        if self.max_parked_per_rendezvous > self.max_parked:
            raise ValueError("max_parked_per_rendezvous must not exceed max_parked")
        if self.public_url is not None:
            _check_public_url(self.public_url)
        if _SESSION_PREFIX.match(self.msc4108_session_prefix) is None:
            raise ValueError(
                "msc4108_session_prefix must be a path of one or more segments of letters, "
                f"digits and ._~- with a slash at each end, not {self.msc4108_session_prefix!r}"
            )

    @property
    def base_url(self) -> str | None:
        """
        The public URL with exactly one trailing slash, ready to have an id
        appended, or None when Location follows each request's Host.
        """
        if self.public_url is None:
            return None
        return self.public_url.rstrip("/") + "/"
