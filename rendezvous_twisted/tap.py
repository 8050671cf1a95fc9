"""
The command line: C{twistd rendezvous} options, and the service they build.

This is the only module that reads options or environment variables, and
the only one that may fall back to the global reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.python import usage

from rendezvous_twisted.config import DEFAULT_LISTEN, Config, check_positive, parse_network
from rendezvous_twisted.service import StoreService
from rendezvous_twisted.store import MemoryStore
from rendezvous_twisted.web import RendezvousAPI

_DEFAULTS = Config()
#: The prefix of the environment variables that the .tac file reads.
ENVIRONMENT_PREFIX = "RENDEZVOUS_"


def _positive(kind: type[float], option: str) -> Callable[[str], Any]:
    def coerce(value: str) -> float:
        number = kind(value)
        check_positive(f"--{option}", number)
        return number

    coerce.coerceDoc = "A positive number."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """
    C{twistd rendezvous} options.  Every limit defaults to L{Config}'s.
    """

    synopsis = "[options]"
    longdesc = (
        "A rendezvous server for the Matrix log-in-with-a-QR-code handshake "
        "(MSC3886), holding rendezvous in memory, with long-polling."
    )

    # (option, Config field, help, number type)
    _limits: tuple[tuple[str, str, str, type[float]], ...] = (
        (
            "ttl",
            "ttl_seconds",
            "Lifetime of a rendezvous, in seconds, fixed at creation.",
            float,
        ),
        ("max-bytes", "max_bytes", "Largest payload, in bytes.", int),
        (
            "poll-timeout",
            "poll_timeout_seconds",
            "Longest wait of a long-poll GET, in seconds (never past the rendezvous' expiry).",
            float,
        ),
        (
            "max-rendezvous",
            "max_rendezvous",
            "Rendezvous alive at once, across the server.",
            int,
        ),
        (
            "max-rendezvous-per-address",
            "max_rendezvous_per_address",
            "Rendezvous alive at once per client address.",
            int,
        ),
        ("max-parked", "max_parked", "Parked long-poll GETs across the server.", int),
        (
            "max-parked-per-rendezvous",
            "max_parked_per_rendezvous",
            "Parked long-poll GETs on one rendezvous.",
            int,
        ),
        ("create-burst", "create_burst", "Creates one client may make at once.", int),
        (
            "create-per-second",
            "create_per_second",
            "Creates per second refilling a client's create budget.",
            float,
        ),
        (
            "request-burst",
            "request_burst",
            "Requests of any kind one client may make at once.",
            int,
        ),
        (
            "request-per-second",
            "request_per_second",
            "Requests per second refilling a client's request budget.",
            float,
        ),
        (
            "max-rate-buckets",
            "max_rate_buckets",
            "Clients whose rate budgets are remembered (least recently seen dropped).",
            int,
        ),
        (
            "ipv6-prefix-length",
            "ipv6_prefix_length",
            "Bits of an IPv6 address that name one client (1 to 128).",
            int,
        ),
        (
            "header-timeout",
            "header_timeout_seconds",
            "Seconds a request's line and headers may take to arrive.",
            float,
        ),
        (
            "body-timeout",
            "body_timeout_seconds",
            "Seconds a request's body may take to arrive, after its headers.",
            float,
        ),
        (
            "max-header-bytes",
            "max_header_bytes",
            "Bytes of a request's line and headers.",
            int,
        ),
        ("max-headers", "max_headers", "Header lines of one request.", int),
        ("max-connections", "max_connections", "Open connections across the server.", int),
        (
            "max-connections-per-address",
            "max_connections_per_address",
            "Open connections from one client address (trusted proxies exempt).",
            int,
        ),
    )
    # (option, Config field): repeatable networks in CIDR notation.
    _networks: tuple[tuple[str, str], ...] = (
        ("trusted-proxy", "trusted_proxies"),
        ("allow-create", "allow_create"),
        ("deny", "deny"),
    )

    optParameters = [
        [option, None, getattr(_DEFAULTS, field), help_text, _positive(kind, option)]
        for option, field, help_text, kind in _limits
    ] + [
        [
            "public-url",
            None,
            None,
            "Base URL of the server as clients reach it (scheme, host, any path prefix), "
            "for the Location header. Default: the request's own scheme and Host.",
        ],
        [
            "msc4108-session-prefix",
            None,
            _DEFAULTS.msc4108_session_prefix,
            "Path under which MSC4108 session URLs live (a slash at each end).",
        ],
        [
            "proxy-header",
            None,
            _DEFAULTS.proxy_header,
            "The header trusted proxies name the client in: x-forwarded-for or forwarded "
            "(RFC 7239). Only that one is read.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        for option, _ in self._networks:
            self[option] = []

    def opt_trusted_proxy(self, network: str) -> None:
        """
        A network (CIDR) of reverse proxies whose X-Forwarded-For (or
        Forwarded) and X-Forwarded-Proto are believed (repeatable).
        """
        self["trusted-proxy"].append(network)

    def opt_allow_create(self, network: str) -> None:
        """
        A network (CIDR) allowed to create rendezvous (repeatable; default:
        everyone).
        """
        self["allow-create"].append(network)

    def opt_deny(self, network: str) -> None:
        """
        A network (CIDR) refused everything with 403 (repeatable).
        """
        self["deny"].append(network)

    def opt_listen(self, description: str) -> None:
        """
        Listen on a Twisted endpoint, e.g. tcp:8080:interface=127.0.0.1
        (repeatable; default tcp:8080:interface=127.0.0.1).
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for option, _ in self._networks:
            for network in self[option]:
                try:
                    parse_network(network)
                except ValueError as e:
                    raise usage.UsageError(f"--{option}: {e}") from e
        try:
            fields: dict[str, Any] = {
                field: tuple(self[option]) for option, field in self._networks
            }
            fields.update({field: self[option] for option, field, _, _ in self._limits})
            self["config"] = Config(
                public_url=self["public-url"],
                msc4108_session_prefix=self["msc4108-session-prefix"],
                proxy_header=self["proxy-header"],
                **fields,
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from e


def options_from_environment(environ: Mapping[str, str]) -> Options:
    """
    Parse L{Options} from C{RENDEZVOUS_*} environment variables, one per
    option: C{--max-bytes} is C{RENDEZVOUS_MAX_BYTES}, and
    C{RENDEZVOUS_LISTEN} holds space-separated endpoints, as do the
    repeatable networks (C{RENDEZVOUS_TRUSTED_PROXY}, C{RENDEZVOUS_ALLOW_CREATE},
    C{RENDEZVOUS_DENY}).
    """
    repeatable = {"listen", *(option for option, _ in Options._networks)}
    argv: list[str] = []
    for name in [
        *sorted(repeatable),
        "public-url",
        "msc4108-session-prefix",
        "proxy-header",
        *(option for option, *_ in Options._limits),
    ]:
        value = environ.get(ENVIRONMENT_PREFIX + name.upper().replace("-", "_"))
        if value is None:
            continue
        for one in value.split() if name in repeatable else [value]:
            argv.append(f"--{name}={one}")
    options = Options()
    options.parseOptions(argv)  # type: ignore[no-untyped-call]
    return options


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    The whole server: the store, and a listener per C{--listen}.

    @param reactor: provides L{IReactorTime} (the store's clock) and can
        listen as the endpoints ask; the global reactor when None.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: Config = options["config"]
    store = MemoryStore(config, reactor)
    site = RendezvousAPI(store, config, reactor).site(reactor)

    root = MultiService()
    # First in, last out: the listeners stop before the store answers its
    # parked readers.
    StoreService(store, config, reactor).setServiceParent(root)  # type: ignore[no-untyped-call]
    for description in options["listen"]:
        strports.service(description, site, reactor=reactor).setServiceParent(root)
    return root
