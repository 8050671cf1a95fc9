"""
The command line: C{twistd rendezvous} options, and the service they build.

This is the only module that reads options or environment variables, and
the only one that may fall back to the global reactor.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from twisted.application.service import IService
from twisted.python import usage

from rendezvous_twisted import logs, systemd, tls
from rendezvous_twisted.config import DEFAULT_LISTEN, Config, check_positive, parse_network
from rendezvous_twisted.logs import RendezvousRoot
from rendezvous_twisted.metrics import Metrics, metrics_site
from rendezvous_twisted.redis_store import RedisStore, StoreURL, parse_store_url
from rendezvous_twisted.service import (
    HangupReloader,
    LateListenerService,
    Lifecycle,
    ListenerService,
    OpenFileLimitService,
    StoppingService,
    StoreService,
)
from rendezvous_twisted.store import MemoryStore, RendezvousStore
from rendezvous_twisted.web import RendezvousAPI, RendezvousSite

_DEFAULTS = Config()
#: The prefix of the environment variables that the .tac file reads.
ENVIRONMENT_PREFIX = "RENDEZVOUS_"
#: --store's value for the in-memory store.
MEMORY = "memory:"


def _positive(kind: type[float], option: str) -> Callable[[str], Any]:
    def coerce(value: str) -> float:
        number = kind(value)
        check_positive(f"--{option}", number)
        return number

    coerce.coerceDoc = "A positive number."  # type: ignore[attr-defined]
    return coerce


def _log_format(value: str) -> str:
    if value not in logs.FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(logs.FORMATS)}, not {value!r}")
    return value


_log_format.coerceDoc = "text or json."  # type: ignore[attr-defined]


class Options(usage.Options):
    """
    C{twistd rendezvous} options.  Every limit defaults to L{Config}'s.
    """

    synopsis = "[options]"
    longdesc = (
        "A rendezvous server for the Matrix log-in-with-a-QR-code handshake "
        "(MSC3886 and MSC4108), holding rendezvous in memory, with long-polling."
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
            "idle-timeout",
            "idle_timeout_seconds",
            "Seconds a connection may stay open with no request on it (keep-alive).",
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
        (
            "max-waiting-refusals",
            "max_waiting_refusals",
            "Connections refused at a connection cap that may wait for their request "
            "before being answered (past it: answered at once and closed).",
            int,
        ),
        (
            "shutdown-timeout-seconds",
            "shutdown_timeout_seconds",
            "Longest a graceful stop (SIGTERM) waits for requests in flight, in seconds.",
            float,
        ),
        (
            "store-timeout-seconds",
            "store_timeout_seconds",
            "Longest a request waits for Redis (--store) before a 503, in seconds.",
            float,
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
        [
            "tls-cert",
            None,
            None,
            "PEM file of the TLS certificate followed by its chain (e.g. fullchain.pem), "
            "for every ssl: listener without privateKey= and every tls:ENDPOINT listener. "
            "Reloaded on SIGHUP.",
        ],
        [
            "tls-key",
            None,
            None,
            "PEM file of the TLS private key (unencrypted) for --tls-cert. Reloaded on SIGHUP.",
        ],
        [
            "log-format",
            None,
            "text",
            "text (twistd's own lines, honouring --logfile) or json (one JSON object per "
            "line on standard output, for journald or a collector).",
            _log_format,
        ],
        [
            "store",
            None,
            MEMORY,
            "Where rendezvous are kept: memory: (this process), or a Redis shared by "
            "several processes: redis://[user:password@]host[:port][/db], "
            "rediss://...[?ca=FILE] (TLS) or unix:///path/to/redis.sock[?db=N&user=U].",
        ],
        [
            "store-password-file",
            None,
            None,
            "A file holding the Redis password (one line), so that it is not on the "
            "command line; it replaces any password in --store.",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics (/metrics) and a health check (/health) on this "
            "endpoint, e.g. tcp:9090:interface=127.0.0.1. Off by default.",
        ],
    ]

    #: (flag, help); environment variables set them with 1 (or 0).
    _flags: tuple[tuple[str, str], ...] = (("no-access-log", "Do not log a line per request."),)
    optFlags: ClassVar[list[list[str | None]]] = [[flag, None, text] for flag, text in _flags]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # The opt_* docstrings are the help of their options, and Twisted
        # keeps their line breaks and indentation as runs of spaces.
        self.docs = {name: " ".join(doc.split()) for name, doc in self.docs.items() if doc}
        self["listen"] = []
        for option, _ in self._networks:
            self[option] = []

    def opt_trusted_proxy(self, network: str) -> None:
        """
        A network (CIDR) of reverse proxies trusted to name the client (in
        the --proxy-header) and its scheme (repeatable).
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
        self["store-url"] = self._store_url()
        self._check_ports()
        self._check_tls()

    def _check_ports(self) -> None:
        """
        Refuse a TCP port outside 0-65535 now, rather than with a traceback
        when the listener starts.
        """
        metrics = [("metrics", self["metrics"])] if self["metrics"] else []
        for option, description in [*(("listen", d) for d in self["listen"]), *metrics]:
            kind, _, rest = description.removeprefix("tls:").partition(":")
            port = rest.partition(":")[0]
            if kind in ("tcp", "tcp6", "ssl") and port.isdigit() and int(port) > 65535:
                raise usage.UsageError(f"--{option} {description}: port {port} is not in 0-65535")

    def _store_url(self) -> StoreURL | None:
        """
        Where --store and --store-password-file say the rendezvous live:
        None for this process' memory.
        """
        password_file = self["store-password-file"]
        if self["store"] == MEMORY:
            if password_file is not None:
                raise usage.UsageError("--store-password-file needs a --store redis URL")
            return None
        try:
            url = parse_store_url(self["store"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from e
        if password_file is None:
            return self._check_user(url)
        try:
            password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise usage.UsageError(f"--store-password-file: {e}") from e
        if not password:
            raise usage.UsageError(f"--store-password-file: {password_file} is empty")
        return dataclasses.replace(url, password=password)

    @staticmethod
    def _check_user(url: StoreURL) -> StoreURL:
        # Redis' AUTH takes a user only with its password.
        if url.username is not None and url.password is None:
            raise usage.UsageError(
                f"--store {url}: user {url.username!r} without a password "
                "(in the URL or in --store-password-file)"
            )
        return url

    def _check_tls(self) -> None:
        """
        Refuse TLS settings that cannot serve: one of --tls-cert and
        --tls-key without the other, files given that no listener uses (a
        server an operator meant to be TLS must not quietly serve plain
        HTTP), a TLS listener without files, or files that do not load.
        """
        cert, key = self["tls-cert"], self["tls-key"]
        if (cert is None) != (key is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        default = tls.CertificateFiles(Path(cert), Path(key)) if cert and key else None
        used = False
        try:
            metrics = [self["metrics"]] if self["metrics"] else []
            for description in [*self["listen"], *metrics]:
                files = tls.tls_files(description, default)
                if files is not None:
                    tls.load_identity(files)
                    used = used or files == default
        except ValueError as e:  # CertificateError included
            raise usage.UsageError(str(e)) from e
        if default is not None and not used:
            raise usage.UsageError(
                "--tls-cert/--tls-key are given but no listener uses them: "
                "listen with ssl:PORT or tls:ENDPOINT"
            )
        self["tls-default"] = default


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
        "tls-cert",
        "tls-key",
        "log-format",
        "metrics",
        "store",
        "store-password-file",
        *(option for option, *_ in Options._limits),
    ]:
        value = environ.get(ENVIRONMENT_PREFIX + name.upper().replace("-", "_"))
        if value is None:
            continue
        for one in value.split() if name in repeatable else [value]:
            argv.append(f"--{name}={one}")
    for flag, _ in Options._flags:
        variable = ENVIRONMENT_PREFIX + flag.upper().replace("-", "_")
        value = environ.get(variable, "").lower()
        if value in ("1", "true", "yes"):
            argv.append(f"--{flag}")
        elif value not in ("", "0", "false", "no"):
            raise usage.UsageError(f"{variable} must be 1 or 0, not {value!r}")
    options = Options()
    options.parseOptions(argv)  # type: ignore[no-untyped-call]
    return options


def makeService(
    options: Options, reactor: Any = None, environ: Mapping[str, str] | None = None
) -> IService:
    """
    The whole server: the store, a listener per C{--listen}, certificate
    reload on SIGHUP, and systemd notifications when run by systemd.

    @param reactor: provides L{IReactorTime} (the store's clock) and can
        listen as the endpoints ask; the global reactor when None.
    @param environ: where C{NOTIFY_SOCKET} and C{WATCHDOG_*} are read;
        C{os.environ} when None.
    """
    if environ is None:
        environ = os.environ
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: Config = options["config"]
    store: RendezvousStore
    if options["store-url"] is None:
        store = MemoryStore(config, reactor)
    else:
        redis = RedisStore(config, reactor, reactor, options["store-url"])
        store = redis
    metrics = Metrics()
    api = RendezvousAPI(store, config, reactor, metrics, access_log=not options["no-access-log"])
    site = api.site(reactor)

    json_logs = options["log-format"] == "json"
    log_observer = logs.observer("json") if json_logs else None
    if not json_logs and logs.twistd_logs_to_stdout(getattr(options, "parent", None)):
        # The same lines twistd's own observer would write, cheaper per
        # access line; twistd keeps its own for a log file or syslog.
        log_observer = logs.observer("text")
    root = RendezvousRoot(log_observer)
    OpenFileLimitService().setServiceParent(root)  # type: ignore[no-untyped-call]
    # First in, last out: the listeners stop before the store answers its
    # parked readers.
    lifecycle = Lifecycle()
    connections = store.service if isinstance(store, RedisStore) else None
    StoreService(store, config, reactor, site, lifecycle, connections).setServiceParent(root)  # type: ignore[no-untyped-call]
    contexts = tls.ContextRegistry()
    # Always, and before any listener listens: SIGHUP's default action would
    # kill the process, and a "systemctl reload" must never do that.
    HangupReloader(contexts.reload, reactor).setServiceParent(root)  # type: ignore[no-untyped-call]
    listeners = []
    for description in options["listen"]:
        endpoint = tls.listen_endpoint(reactor, description, contexts, options["tls-default"])
        listener = ListenerService(endpoint, site)  # type: ignore[no-untyped-call]
        listener.setServiceParent(root)  # type: ignore[no-untyped-call]
        listeners.append(listener)

    def status() -> str:
        return (
            f"{store.rendezvous_count} rendezvous, {store.parked_count} parked readers, "
            f"{site.in_flight} requests in flight, {site.connection_count} connections"
        )

    systemd.SystemdService(
        systemd.Notifier.from_environment(environ),
        listeners,
        status,
        lifecycle,
        reactor,
        systemd.watchdog_interval_seconds(environ, os.getpid()),
    ).setServiceParent(root)  # type: ignore[no-untyped-call]
    if options["metrics"]:
        _watch(metrics, store, site, contexts)
        endpoint = tls.listen_endpoint(reactor, options["metrics"], contexts, None)
        LateListenerService(  # type: ignore[no-untyped-call]
            endpoint,
            metrics_site(
                metrics,
                lambda: lifecycle.stopping,
                reactor,
                store_available=lambda: store.available,
                saturated=lambda: site.saturated,
            ),
            lifecycle,
        ).setServiceParent(root)
    # Last in, first out: on stop, tell everyone at once that we are stopping.
    StoppingService(lifecycle).setServiceParent(root)  # type: ignore[no-untyped-call]
    return root


def _watch(
    metrics: Metrics, store: RendezvousStore, site: RendezvousSite, contexts: tls.ContextRegistry
) -> None:
    """
    Export the counts that the store, the site and the TLS contexts keep.
    """
    metrics.watch(
        "rendezvous_created", "Rendezvous created.", "counter", lambda: store.created_total
    )
    metrics.watch(
        "rendezvous_deleted",
        "Rendezvous deleted by a client.",
        "counter",
        lambda: store.deleted_total,
    )
    metrics.watch(
        "rendezvous_expired",
        "Rendezvous that reached their expiry.",
        "counter",
        lambda: store.expired_total,
    )
    metrics.watch(
        "rendezvous_live",
        "Rendezvous held now (expired ones not reclaimed yet included).",
        "gauge",
        lambda: store.rendezvous_count,
    )
    metrics.watch(
        "rendezvous_parked_readers",
        "Long-poll GETs parked now.",
        "gauge",
        lambda: store.parked_count,
    )
    if isinstance(store, RedisStore):
        metrics.watch(
            "rendezvous_store_available",
            "1 while both connections to Redis are up, else 0.",
            "gauge",
            lambda: int(store.available),
        )
    metrics.watch(
        "rendezvous_http_connections",
        "Open HTTP connections.",
        "gauge",
        lambda: site.connection_count,
    )
    metrics.watch(
        "rendezvous_http_connections_max",
        "The connection cap (--max-connections): past it new connections get 503.",
        "gauge",
        lambda: site.admission.max_connections,
    )
    metrics.watch(
        "rendezvous_http_saturated",
        "1 from when the open connections reach the cap until they fall a tenth below it "
        "(/health answers 503 saturated meanwhile), else 0.",
        "gauge",
        lambda: int(site.saturated),
    )
    metrics.watch(
        "rendezvous_http_refusals_waiting",
        "Connections refused at a connection cap, waiting for their request to be answered.",
        "gauge",
        lambda: site.admission.waiting_refusals,
    )
    metrics.watch(
        "rendezvous_http_requests_in_flight",
        "Requests being received or answered.",
        "gauge",
        lambda: site.in_flight,
    )

    def reloads() -> dict[str, int]:
        total = {"success": 0, "failure": 0}
        for context in contexts.contexts:
            for outcome, count in context.reloads.items():
                total[outcome] += count
        return total

    metrics.watch(
        "rendezvous_tls_reloads", "TLS certificate reloads, by outcome.", "counter", reloads
    )
