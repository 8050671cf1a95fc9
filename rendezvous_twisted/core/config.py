"""
Every limit and default of the server, in one place.

The command line (L{rendezvous_twisted.tap}) and the C{.tac} file build a
L{Config}; everything else receives one and never reads the environment or
the command line itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TypeVar
from urllib.parse import urlsplit

#: Where a newcomer's server listens when no C{--listen} is given.
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"

#: MSC4108's payload limit ("the server enforces a maximum payload size of
#: 4KB"), fixed by the proposal; the general C{max_bytes} caps it too.
MSC4108_MAX_BYTES = 4096
#: Where MSC4108 session URLs live by default: beside the create endpoint.
MSC4108_DEFAULT_SESSION_PREFIX = "/_matrix/client/unstable/org.matrix.msc4108/rendezvous/"
#: MSC4388's paths: its create and discovery endpoint under the unstable
#: prefix and the stable one (which MSC4108's create shares), and its
#: sessions beneath each.
MSC4388_UNSTABLE_PATH = "/_matrix/client/unstable/io.element.msc4388/rendezvous"
MSC4388_STABLE_PATH = "/_matrix/client/v1/rendezvous"
MSC4388_PATHS = (MSC4388_UNSTABLE_PATH, MSC4388_STABLE_PATH)
#: MSC4388's limit on C{data} ("a maximum data field size of 4096 bytes");
#: the general C{max_bytes} caps it too.
MSC4388_MAX_BYTES = 4096
#: The lifetimes MSC4388 allows a session ("the minimum timeout SHOULD be 120
#: seconds ... the maximum SHOULD be 300 seconds").
MSC4388_LIFETIMES = (120.0, 300.0)
#: Who may create MSC4388 sessions: nobody (the API answers 404
#: M_UNRECOGNIZED), anyone, or the holders of a valid access token of the
#: configured homeserver (Synapse's C{msc4388_mode} has the same three).
MSC4388_MODES = ("off", "open", "authenticated")
# A path prefix of one or more non-empty segments of URL-safe characters.
_SESSION_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)+/\Z")


class ConfigError(ValueError):
    """
    A L{Config} that cannot be.  C{template} says what is wrong, with
    C{{0}}, C{{1}}... standing for the fields at fault (C{fields}), so that
    the command line can call them by its option names (L{render}).
    C{str()} calls each C{field=value} (C{values}) or, without a value,
    by its name.
    """

    def __init__(
        self, template: str, *fields: str, values: Mapping[str, object] | None = None
    ) -> None:
        self.template = template
        self.fields = fields
        self.values = dict(values or {})
        super().__init__(self.render(self._field))

    def _field(self, field: str) -> str:
        if field in self.values:
            return f"{field}={self.values[field]!r}"
        return field

    def render(self, name: Callable[[str], str]) -> str:
        """
        The message, with each field called what C{name} calls it.
        """
        return self.template.format(*(name(field) for field in self.fields))


def _literal(text: str) -> str:
    """
    C{text} (a value quoted in a message) safe inside a L{ConfigError} template.
    """
    return text.replace("{", "{{").replace("}", "}}")


def is_positive(value: float) -> bool:
    """
    Whether C{value} is a positive, finite number.
    """
    # NaN fails every comparison, so "not > 0" also refuses it.
    return bool(value > 0) and value != float("inf")


def check_positive(name: str, value: float) -> None:
    """
    Refuse a limit that is not a positive, finite number.
    """
    if not is_positive(value):
        raise ConfigError("{0} must be a positive finite number", name, values={name: value})


def _check_public_url(url: str) -> None:
    """
    Refuse a base URL that could not prefix an id: it must be absolute
    http(s) with a host, and have nothing that urlsplit would quietly drop
    or that would end up inside Location unescaped.
    """
    _check_http_url("public_url", url)


def _check_http_url(name: str, url: str) -> None:
    """
    Refuse a base URL (field C{name}) that is not absolute http(s) with a
    host, or that has anything urlsplit would quietly drop or that would
    end up in a header unescaped.
    """
    values = {name: url}
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ConfigError("{0} must not contain spaces or control characters", name, values=values)
    if "?" in url or "#" in url:
        raise ConfigError("{0} must not have a query or a fragment", name, values=values)
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError("{0} has a bad port", name, values=values) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "{0} must be an absolute http(s) URL with a host, e.g. https://rendezvous.example.org/",
            name,
            values=values,
        )


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


T = TypeVar("T")


def described(option: str, default: T, description: str) -> T:
    """
    A field of L{Config} that an option sets: the option's long name
    (C{--option}, and its .tac variable C{RENDEZVOUS_OPTION}), the default,
    and the description that the option's help shows (L{Config.help}).
    """
    return field(default=default, metadata={"option": option, "help": description})


#: The fields that are not positive numbers.
_NOT_LIMITS = frozenset(
    (
        "public_url",
        "msc4108_session_prefix",
        "msc4388",
        "homeserver",
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

    # Each field an option sets names that option and carries its help
    # (described()): the one description of the limit, which the comments
    # above it only explain.  The docs' configuration table is checked
    # against the options (tests/test_docs_options.py).

    # Writes do not extend it.
    ttl_seconds: float = described(
        "ttl", 60.0, "Lifetime of a rendezvous, in seconds, fixed at creation."
    )
    # Accepted on create and on write.
    max_bytes: int = described("max-bytes", 10240, "Largest payload, in bytes.")
    # The longest time a GET with a matching If-None-Match is held.
    poll_timeout_seconds: float = described(
        "poll-timeout",
        20.0,
        "Longest wait of a long-poll GET, in seconds (never past the rendezvous' expiry).",
    )
    max_rendezvous: int = described(
        "max-rendezvous", 10000, "Rendezvous alive at once, across the server."
    )
    # Counted by the client address that created them.
    max_rendezvous_per_address: int = described(
        "max-rendezvous-per-address", 32, "Rendezvous alive at once per client address."
    )
    max_parked: int = described("max-parked", 50000, "Parked long-poll GETs across the server.")
    max_parked_per_rendezvous: int = described(
        "max-parked-per-rendezvous", 8, "Parked long-poll GETs on one rendezvous."
    )
    # Then it aborts requests being answered and their connections.  Parked
    # readers are answered at once, so this bounds slow uploads and slow
    # readers.
    shutdown_timeout_seconds: float = described(
        "shutdown-timeout-seconds",
        5.0,
        "Longest a graceful stop (SIGTERM) waits for requests in flight, in seconds.",
    )
    # Also the time to connect.
    store_timeout_seconds: float = described(
        "store-timeout-seconds",
        1.0,
        "Longest a request waits for Redis (--store) before a 503, in seconds.",
    )
    #: Longest Content-Type a writer may store, so that a header cannot
    #: smuggle more bytes into memory than the payload limit admits.  (No
    #: option sets it.)
    max_content_type_bytes: int = 255
    # None means the request's own scheme and Host.
    public_url: str | None = described(
        "public-url",
        None,
        "Base URL of the server as clients reach it (scheme, host, any path prefix), "
        "for the Location header. Default: the request's own scheme and Host.",
    )
    # Never "/" alone, which is the native protocol's.
    msc4108_session_prefix: str = described(
        "msc4108-session-prefix",
        MSC4108_DEFAULT_SESSION_PREFIX,
        "Path under which MSC4108 session URLs live (a slash at each end).",
    )

    # MSC4388 (protocols/msc4388.py).  Its lifetime is its own: the proposal
    # asks for 120 to 300 s, whatever --ttl gives the older protocols.
    msc4388: str = described(
        "msc4388",
        "open",
        "Who may create MSC4388 sessions: off (its API answers 404), open (anyone) or "
        "authenticated (holders of a valid access token of --homeserver).",
    )
    msc4388_lifetime_seconds: float = described(
        "msc4388-lifetime",
        300.0,
        "Lifetime of an MSC4388 session, in seconds (120 to 300), fixed at creation.",
    )
    # Each recorded answer holds its txnId (up to 255 bytes) and a token.
    max_transactions_per_rendezvous: int = described(
        "max-transactions-per-rendezvous",
        32,
        "MSC4388 PUT transactions one session records for replay; past it a PUT "
        "with a new txnId is refused.",
    )
    # Its /_matrix/client/v3/account/whoami judges access tokens.
    homeserver: str | None = described(
        "homeserver",
        None,
        "Base URL of the homeserver whose access tokens are checked (on its "
        "/_matrix/client/v3/account/whoami) for --msc4388 authenticated.",
    )
    homeserver_timeout_seconds: float = described(
        "homeserver-timeout",
        5.0,
        "Longest a create or discovery waits for the homeserver to judge an access token, "
        "in seconds (then 503).",
    )
    token_cache_seconds: float = described(
        "token-cache-seconds",
        30.0,
        "How long the homeserver's verdict on an access token is remembered, in seconds.",
    )

    # Abuse limits (docs/security.md).  A client is the key of
    # ClientResolver: an IPv4 address, or an IPv6 network of
    # ipv6_prefix_length bits.
    # Tokens in a client's create bucket.
    create_burst: int = described("create-burst", 10, "Creates one client may make at once.")
    create_per_second: float = described(
        "create-per-second", 0.5, "Creates per second refilling a client's create budget."
    )
    # Creates included.
    request_burst: int = described(
        "request-burst", 60, "Requests of any kind one client may make at once."
    )
    request_per_second: float = described(
        "request-per-second", 10.0, "Requests per second refilling a client's request budget."
    )
    # Buckets kept per limiter (two limiters): past it the least recently
    # used is dropped, so a spray of addresses costs bounded memory.
    max_rate_buckets: int = described(
        "max-rate-buckets",
        100000,
        "Clients whose rate budgets are remembered (least recently seen dropped).",
    )
    ipv6_prefix_length: int = described(
        "ipv6-prefix-length", 64, "Bits of an IPv6 address that name one client (1 to 128)."
    )
    # From its first byte (or from the connection's start).
    header_timeout_seconds: float = described(
        "header-timeout", 10.0, "Seconds a request's line and headers may take to arrive."
    )
    body_timeout_seconds: float = described(
        "body-timeout", 10.0, "Seconds a request's body may take to arrive, after its headers."
    )
    # Then it is closed.  Balancers that keep connections to the server open
    # must close theirs sooner (contrib/nginx: keepalive_timeout 10s).
    idle_timeout_seconds: float = described(
        "idle-timeout",
        15.0,
        "Seconds a connection may stay open with no request on it (keep-alive; "
        "HTTP/2: no stream open).",
    )
    # Twisted's own default; it also bounds any one line.
    max_header_bytes: int = described(
        "max-header-bytes",
        16384,
        "Bytes of a request's line and headers (HTTP/2: of its header block, "
        "HEADERS and CONTINUATION, and of the decoded header list).",
    )
    max_headers: int = described("max-headers", 64, "Header lines of one request.")
    # A parked long-poll holds a stream.  A QR login needs two at once (a
    # long-poll and a write); four leave room for a second login in another
    # tab, and a browser queues what goes past it rather than failing.  Each
    # stream can hold a request's worth of memory (its header block and
    # body), so this multiplies what one connection costs (budget.py); h2's
    # own default, 100, would make it 25 times more.
    max_streams_per_connection: int = described(
        "max-streams-per-connection",
        4,
        "Requests (streams) open at once on one HTTP/2 connection, advertised in "
        "SETTINGS; more are refused for the client to retry.",
    )
    # Past it: 503.  Every parked long-poll holds one, so it bounds parked
    # readers too.
    max_connections: int = described("max-connections", 4096, "Open connections across the server.")
    # Past it: 429.  The client is ClientResolver's key; connections from
    # trusted proxies are counted only against max_connections.
    max_connections_per_address: int = described(
        "max-connections-per-address",
        100,
        "Open connections from one client address (trusted proxies exempt).",
    )
    # A refused connection may wait for its request (at most
    # header_timeout_seconds) to be answered 503 or 429 after it rather
    # than before, which a client still sending would see as a broken pipe.
    # They are beyond max_connections, so they have a cap of their own.
    max_waiting_refusals: int = described(
        "max-waiting-refusals",
        64,
        "Connections refused at a connection cap that may wait for their request "
        "before being answered (past it: answered at once and closed).",
    )
    # Peers on a UNIX socket are always trusted: only local processes reach
    # one, and a reverse proxy on the same host is what does.
    trusted_proxies: tuple[str, ...] = described(
        "trusted-proxy",
        (),
        "A network (CIDR) of reverse proxies trusted to name the client (in the "
        "--proxy-header) and its scheme (repeatable).",
    )
    # Only one is read: a proxy passes the other through from the client
    # unchecked.  The scheme comes with it: X-Forwarded-Proto, or the proto=
    # of the client's Forwarded element.
    proxy_header: str = described(
        "proxy-header",
        "x-forwarded-for",
        "The header trusted proxies name the client in: x-forwarded-for or forwarded "
        "(RFC 7239). Only that one is read.",
    )
    # Empty means everyone.
    allow_create: tuple[str, ...] = described(
        "allow-create",
        (),
        "A network (CIDR) allowed to create rendezvous (repeatable; default: everyone).",
    )
    deny: tuple[str, ...] = described(
        "deny", (), "A network (CIDR) refused everything with 403 (repeatable)."
    )

    def __post_init__(self) -> None:
        for one in fields(self):
            if one.name in _NOT_LIMITS:
                continue
            check_positive(one.name, getattr(self, one.name))
        for local, overall in (
            ("max_rendezvous_per_address", "max_rendezvous"),
            ("max_connections_per_address", "max_connections"),
            ("max_parked_per_rendezvous", "max_parked"),
        ):
            if getattr(self, local) > getattr(self, overall):
                raise ConfigError(
                    "{0} must not exceed {1}",
                    local,
                    overall,
                    values={local: getattr(self, local), overall: getattr(self, overall)},
                )
        if self.ipv6_prefix_length > 128:
            raise ConfigError(
                "{0} must be at most 128",
                "ipv6_prefix_length",
                values={"ipv6_prefix_length": self.ipv6_prefix_length},
            )
        if self.proxy_header not in ("x-forwarded-for", "forwarded"):
            raise ConfigError(
                "{0} must be x-forwarded-for or forwarded",
                "proxy_header",
                values={"proxy_header": self.proxy_header},
            )
        for name in ("trusted_proxies", "allow_create", "deny"):
            if isinstance(getattr(self, name), str):
                raise ConfigError("{0} must be a tuple of networks, not a string", name)
            for network in getattr(self, name):
                try:
                    parse_network(network)
                except ValueError as e:
                    raise ConfigError("{0}: " + _literal(str(e)), name) from e
        if self.public_url is not None:
            _check_public_url(self.public_url)
        if _SESSION_PREFIX.match(self.msc4108_session_prefix) is None:
            raise ConfigError(
                "{0} must be a path of one or more segments of letters, digits and ._~- "
                "with a slash at each end, e.g. /qr/session/",
                "msc4108_session_prefix",
                values={"msc4108_session_prefix": self.msc4108_session_prefix},
            )
        self._check_msc4388()

    def _check_msc4388(self) -> None:
        if self.msc4388 not in MSC4388_MODES:
            raise ConfigError(
                "{0} must be off, open or authenticated",
                "msc4388",
                values={"msc4388": self.msc4388},
            )
        low, high = MSC4388_LIFETIMES
        if not low <= self.msc4388_lifetime_seconds <= high:
            raise ConfigError(
                "{0} must be from 120 to 300 seconds, as MSC4388 asks",
                "msc4388_lifetime_seconds",
                values={"msc4388_lifetime_seconds": self.msc4388_lifetime_seconds},
            )
        if self.homeserver is not None:
            _check_http_url("homeserver", self.homeserver)
        elif self.msc4388 == "authenticated":
            raise ConfigError(
                "{0} needs {1}: the homeserver whose access tokens it checks",
                "msc4388",
                "homeserver",
                values={"msc4388": self.msc4388},
            )
        sessions = tuple(path + "/" for path in MSC4388_PATHS)
        if self.msc4108_session_prefix in sessions:
            raise ConfigError(
                "{0} must not be where MSC4388's sessions live (" + " or ".join(sessions) + ")",
                "msc4108_session_prefix",
                values={"msc4108_session_prefix": self.msc4108_session_prefix},
            )

    @classmethod
    def options(cls) -> dict[str, str]:
        """
        Each field that an option sets -> that option's long name, in the
        order of the fields.
        """
        return {f.name: f.metadata["option"] for f in fields(cls) if "option" in f.metadata}

    @classmethod
    def help(cls, name: str) -> str:
        """
        The description of field C{name}, as the option that sets it shows
        it in its help.
        """
        text: str = cls.__dataclass_fields__[name].metadata["help"]
        return text

    @property
    def base_url(self) -> str | None:
        """
        The public URL with exactly one trailing slash, ready to have an id
        appended, or None when Location follows each request's Host.
        """
        if self.public_url is None:
            return None
        return self.public_url.rstrip("/") + "/"
