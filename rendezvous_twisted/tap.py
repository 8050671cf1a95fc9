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

from rendezvous_twisted.config import DEFAULT_LISTEN, Config, check_positive
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
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on a Twisted endpoint, e.g. tcp:8080:interface=127.0.0.1
        (repeatable; default tcp:8080:interface=127.0.0.1).
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self["config"] = Config(
                public_url=self["public-url"],
                msc4108_session_prefix=self["msc4108-session-prefix"],
                **{field: self[option] for option, field, _, _ in self._limits},
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from e


def options_from_environment(environ: Mapping[str, str]) -> Options:
    """
    Parse L{Options} from C{RENDEZVOUS_*} environment variables, one per
    option: C{--max-bytes} is C{RENDEZVOUS_MAX_BYTES}, and
    C{RENDEZVOUS_LISTEN} holds space-separated endpoints.
    """
    argv: list[str] = []
    for name in [
        "listen",
        "public-url",
        "msc4108-session-prefix",
        *(option for option, *_ in Options._limits),
    ]:
        value = environ.get(ENVIRONMENT_PREFIX + name.upper().replace("-", "_"))
        if value is None:
            continue
        for one in value.split() if name == "listen" else [value]:
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
    site = RendezvousAPI(store, config).site(reactor)

    root = MultiService()
    # First in, last out: the listeners stop before the store answers its
    # parked readers.
    StoreService(store, config, reactor).setServiceParent(root)  # type: ignore[no-untyped-call]
    for description in options["listen"]:
        strports.service(description, site, reactor=reactor).setServiceParent(root)
    return root
