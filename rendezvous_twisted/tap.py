"""
The command line: C{twistd rendezvous} options, and the service they build.

This is the only module that declares options and the only one that may
fall back to the global reactor; it composes the store, the site, and the
services of L{rendezvous_twisted.ops}.

Mistakes end the program with one or two lines naming the option (or the
environment variable) as the user wrote it (L{ops.options.WordedOptions}):
L{Options.parseOptions} under twistd, L{environment_service} for the
C{.tac}, and L{makeService} for what only the start can tell.  Never a
traceback, and never twistd's whole help.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from twisted.application.service import IService
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python import usage

from rendezvous_twisted.core.config import DEFAULT_LISTEN, Config, ConfigError, parse_network
from rendezvous_twisted.core.metrics import Metrics
from rendezvous_twisted.http import wire
from rendezvous_twisted.http.guard import Guard
from rendezvous_twisted.http.site import RendezvousSite
from rendezvous_twisted.http.tokens import create_policy
from rendezvous_twisted.ops import endpoints, environment, logs, metrics, systemd, tls
from rendezvous_twisted.ops.environment import Setting
from rendezvous_twisted.ops.logs import RendezvousRoot
from rendezvous_twisted.ops.options import ENVIRONMENT_PREFIX, WordedOptions, example, number
from rendezvous_twisted.ops.service import (
    FrozenHeap,
    HangupReloader,
    Http2Off,
    LateListenerService,
    Lifecycle,
    ListenerService,
    OpenFileLimitService,
    PolicyService,
    StartupError,
    StoppingService,
    StoreService,
)
from rendezvous_twisted.ops.stores import open_store
from rendezvous_twisted.protocols import RendezvousAPI
from rendezvous_twisted.redis.url import StoreURL, parse_store_url
from rendezvous_twisted.version import version_line

__all__ = [
    "ENVIRONMENT_PREFIX",
    "Options",
    "Setting",
    "environment_service",
    "makeService",
    "options_from_environment",
    "settings",
]

_DEFAULTS = Config()
#: --store's value for the in-memory store.
MEMORY = "memory:"
#: How the .tac is named in its usage errors.
TAC = "rendezvous.tac"
#: Config field -> the option that sets it (declared beside the field).
_FIELD_OPTIONS = Config.options()
#: (option, Config field): repeatable networks in CIDR notation.
_NETWORKS = [(o, f) for f, o in _FIELD_OPTIONS.items() if isinstance(getattr(_DEFAULTS, f), tuple)]
#: (option, Config field) of each limit: a positive number, an int or a
#: float as the field is.
_LIMITS = [(o, f) for f, o in _FIELD_OPTIONS.items() if type(getattr(_DEFAULTS, f)) in (int, float)]
#: (option, Config field) of the other settings, taken as written.
_TEXTS = [(o, f) for f, o in _FIELD_OPTIONS.items() if (o, f) not in (*_NETWORKS, *_LIMITS)]


def _kind(field: str) -> type[float]:
    """
    The type of number of a limit: C{int} or C{float}, as its field is.
    """
    return int if isinstance(getattr(_DEFAULTS, field), int) else float


def _help(field: str) -> str:
    """
    The help of a limit's option: its field's description, and what it takes.
    """
    return f"{Config.help(field)} A positive {'whole ' if _kind(field) is int else ''}number."


class Options(WordedOptions):
    """
    C{twistd rendezvous} options.  Every limit defaults to L{Config}'s, and
    is described by it.
    """

    synopsis = "[options]"
    longdesc = (
        "A rendezvous server for the Matrix log-in-with-a-QR-code handshake "
        "(MSC3886, MSC4108 and MSC4388), with long-polling. Rendezvous live in this "
        "process' memory, or with --store in a Redis shared by several processes. "
        "twistd's own options (-n, --pidfile, --logfile, ...) go before 'rendezvous'."
    )

    optParameters: ClassVar[list[list[Any]]] = [
        *([option, None, getattr(_DEFAULTS, field), _help(field)] for option, field in _LIMITS),
        *(
            [option, None, getattr(_DEFAULTS, field), Config.help(field)]
            for option, field in _TEXTS
        ),
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
            "port or endpoint, e.g. 9090 (on 127.0.0.1) or tcp:9090:interface=127.0.0.1. "
            "Off by default.",
        ],
    ]

    #: (flag, help); environment variables set them with 1 (or 0).
    _flags: tuple[tuple[str, str], ...] = (("no-access-log", "Do not log a line per request."),)
    optFlags: ClassVar[list[list[str | None]]] = [[flag, None, text] for flag, text in _flags]

    def __init__(self) -> None:
        super().__init__()
        # The networks' help is their Config field's, as the limits' is.
        for option, field in _NETWORKS:
            self.docs[option] = Config.help(field)
        self["listen"] = []
        for option, _ in _NETWORKS:
            self[option] = []

    def _field_name(self, field: str) -> str:
        """
        A Config field as the option that sets it, with its value, for a
        L{ConfigError}: C{--max-rendezvous 31}, or
        C{--max-rendezvous-per-address (default 32)}.
        """
        option = _FIELD_OPTIONS.get(field)
        if option is None:
            return field
        if option in self.given:
            return self.spelled(option)
        if getattr(_DEFAULTS, field) is None:
            return self.name(option)
        return f"{self.name(option)} (default {example(getattr(_DEFAULTS, field))})"

    def parseArgs(self, *args: str) -> None:
        if args:
            hint = ""
            if endpoints.expand(args[0]) != args[0] or ":" in args[0]:
                hint = f" (to listen there: --listen {args[0]})"
            raise usage.UsageError(f"unexpected argument {args[0]!r}{hint}")

    def opt_version(self) -> NoReturn:
        """
        Print the versions of rendezvous-twisted, Twisted and Python, and exit.
        """
        print(version_line())
        sys.exit(0)

    # The networks, repeatable; their help is Config's (see __init__).

    def opt_trusted_proxy(self, network: str) -> None:
        """
        L{Config.trusted_proxies}.
        """
        self["trusted-proxy"].append(network)

    def opt_allow_create(self, network: str) -> None:
        """
        L{Config.allow_create}.
        """
        self["allow-create"].append(network)

    def opt_deny(self, network: str) -> None:
        """
        L{Config.deny}.
        """
        self["deny"].append(network)

    def opt_listen(self, description: str) -> None:
        """
        Where to listen (repeatable): a port, e.g. 9000 (on 127.0.0.1 only),
        or a Twisted endpoint, e.g. tcp:9000:interface=0.0.0.0,
        unix:/run/rendezvous.sock, ssl:8443 or tls:ENDPOINT (with --tls-cert
        and --tls-key). Default: tcp:8080:interface=127.0.0.1.
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        #: What the listeners were given as, for messages: None for the default.
        self.listen_written: list[str | None] = list(self["listen"]) or [None]
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        self["listen"] = [endpoints.expand(d) for d in self["listen"]]
        if self["metrics"]:
            self["metrics"] = endpoints.expand(self["metrics"])
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(
                f"{self.spelled('log-format')}: must be one of {', '.join(logs.FORMATS)}"
            )
        fields: dict[str, Any] = {field: self[option] for option, field in _TEXTS}
        for option, field in _LIMITS:
            value = self[option]
            if isinstance(value, str):
                try:
                    value = number(_kind(field), value)
                except ValueError as e:
                    shown = self.spelled(option, example(getattr(_DEFAULTS, field)))
                    raise usage.UsageError(
                        f"{self.spelled(option, value)}: {e}, e.g. {shown}"
                    ) from None
            fields[field] = self[option] = value
        for option, field in _NETWORKS:
            for network in self[option]:
                try:
                    parse_network(network)
                except ValueError as e:
                    shown = self.spelled(option, "10.0.0.0/8")
                    raise usage.UsageError(
                        f"{self.spelled(option, network)}: {e}, e.g. {shown}"
                    ) from None
            fields[field] = tuple(self[option])
        try:
            self["config"] = Config(**fields)
        except ConfigError as e:
            raise usage.UsageError(e.render(self._field_name)) from None
        self["store-url"] = self._store_url()
        self._parse_listeners()
        self._check_tls()
        self._check_clashes()
        self.check_twistd(json_logs=self["log-format"] == "json")

    def _store_url(self) -> StoreURL | None:
        """
        Where --store and --store-password-file say the rendezvous live:
        None for this process' memory.
        """
        password_file = self["store-password-file"]
        if self["store"] == MEMORY:
            if password_file is not None:
                raise usage.UsageError(
                    f"{self.name('store-password-file')} needs a Redis store, "
                    f"e.g. {self.spelled('store', 'redis://127.0.0.1:6379/0')}"
                )
            return None
        try:
            url = parse_store_url(self["store"])
        except ValueError as e:
            # Its messages name --store, as on the command line.
            why = str(e).removeprefix("--store").lstrip(": ")
            raise usage.UsageError(f"{self.name('store')}: {why}") from None
        if password_file is None:
            return self._check_user(url)
        try:
            password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise usage.UsageError(
                f"{self.spelled('store-password-file')}: {e.strerror or e}"
            ) from None
        except UnicodeDecodeError:
            raise usage.UsageError(
                f"{self.spelled('store-password-file')}: not UTF-8 text"
            ) from None
        if not password:
            raise usage.UsageError(f"{self.spelled('store-password-file')}: the file is empty")
        return dataclasses.replace(url, password=password)

    def _check_user(self, url: StoreURL) -> StoreURL:
        # Redis' AUTH takes a user only with its password.
        if url.username is not None and url.password is None:
            raise usage.UsageError(
                f"{self.name('store')} {url}: user {url.username!r} without a password "
                f"(in the URL or in {self.name('store-password-file')})"
            )
        return url

    def _parse_listeners(self) -> None:
        """
        Parse each --listen and the --metrics description, once
        (L{endpoints.parse}): C{self["listeners"]} and
        C{self["metrics-listener"]} (None without --metrics) are what the
        start listens on.  Refuse one that cannot listen.
        """
        listeners = []
        metrics = [("metrics", self["metrics"])] if self["metrics"] else []
        for option, description in [*(("listen", d) for d in self["listen"]), *metrics]:
            label = self.label(option, description)
            try:
                listeners.append(endpoints.parse(description, label))
            except endpoints.EndpointError as e:
                raise self._endpoint_error(option, label, e) from None
        self["listeners"] = listeners[: len(self["listen"])]
        self["metrics-listener"] = listeners[-1] if metrics else None

    def _endpoint_error(
        self, option: str, label: str, error: endpoints.EndpointError
    ) -> usage.UsageError:
        if error.needs_certificate:
            hint = (
                f"give {self.name('tls-cert')} and {self.name('tls-key')} (or privateKey= in ssl:)"
            )
        else:
            examples = error.examples or _ENDPOINT_EXAMPLES[option]
            hint = "e.g. " + " or ".join(self.spelled(option, x) for x in examples)
        return usage.UsageError(f"{label}: {error}; {hint}")

    def _check_tls(self) -> None:
        """
        Refuse TLS settings that cannot serve: one of --tls-cert and
        --tls-key without the other, files given that no listener uses (a
        server an operator meant to be TLS must not quietly serve plain
        HTTP), a TLS listener without files, or files that do not load.
        Each TLS listener is given the files it serves (L{endpoints.serving}).
        """
        cert, key = self["tls-cert"], self["tls-key"]
        if (cert is None) != (key is None):
            raise usage.UsageError(
                f"{self.name('tls-cert')} and {self.name('tls-key')} go together"
            )
        default = tls.CertificateFiles(Path(cert), Path(key)) if cert and key else None
        used = False
        metrics = [("metrics", self["metrics-listener"])] if self["metrics"] else []
        listeners = [*(("listen", listener) for listener in self["listeners"]), *metrics]
        for index, (option, listener) in enumerate(listeners):
            try:
                listener = endpoints.serving(listener, default)
            except endpoints.EndpointError as e:
                raise self._endpoint_error(option, listener.label, e) from None
            if option == "metrics":
                self["metrics-listener"] = listener
            else:
                self["listeners"][index] = listener
            files = listener.files
            if files is None:
                continue
            try:
                tls.load_identity(files)
            except tls.CertificateError as e:
                if files == default:
                    raise usage.UsageError(f"{self._tls_options(files, str(e))}: {e}") from None
                raise usage.UsageError(f"{self.name(option)}: {e}") from None
            used = used or files == default
        if default is not None and not used:
            raise usage.UsageError(
                f"{self.name('tls-cert')} and {self.name('tls-key')} are given but no listener "
                f"uses them: listen with ssl:PORT or tls:ENDPOINT, e.g. "
                f"{self.spelled('listen', 'ssl:8443')}"
            )
        self["tls-default"] = default

    def _tls_options(self, files: tls.CertificateFiles, message: str) -> str:
        """
        The option(s) whose file a certificate error is about: C{--tls-key}
        for the key's alone, C{--tls-cert} for the certificate's alone, both
        for a key that does not match its certificate.
        """
        cert, key = str(files.certificate) in message, str(files.private_key) in message
        if key and not cert:
            return self.name("tls-key")
        if cert and not key:
            return self.name("tls-cert")
        return f"{self.name('tls-cert')} and {self.name('tls-key')}"

    def _check_clashes(self) -> None:
        """
        Refuse two listeners of this server on one TCP port (C{--listen 9000}
        twice, C{--metrics 8080} beside the default C{--listen}): the second
        would fail at start as if another process held the port.
        """
        listeners = list(self["listeners"])
        if self["metrics-listener"] is not None:
            listeners.append(self["metrics-listener"])
        seen: list[tuple[str, tuple[int, int, str]]] = []
        for listener in listeners:
            spelled, address = listener.label, listener.address
            if address is None:
                continue
            for earlier, other in seen:
                if endpoints.same_address(address, other):
                    if spelled == earlier:
                        raise usage.UsageError(f"{spelled} is given twice")
                    on = f" of {address[2] or other[2]}" if address[2] or other[2] else ""
                    raise usage.UsageError(
                        f"{spelled} and {earlier} both listen on port {address[1]}{on}: "
                        "give each its own port"
                    )
            seen.append((spelled, address))

    def label(self, option: str, description: str) -> str:
        """
        The listener C{description} (expanded: C{tcp:9000:interface=...})
        of C{option} as the user wrote it (C{--listen 9000}), or the default
        as such (C{--listen (default tcp:8080:interface=127.0.0.1)}).
        """
        if option == "metrics":
            return self.spelled(option, self.given.get(option, description))
        for written, expanded in zip(self.listen_written, self["listen"], strict=True):
            if expanded == description:
                if written is None:
                    return f"{self.name(option)} (default {description})"
                return self.spelled(option, written)
        return self.spelled(option, description)


#: Two good examples for each option that takes an endpoint.
_ENDPOINT_EXAMPLES = {
    "listen": ("9000", "tcp:9000:interface=0.0.0.0"),
    "metrics": ("9090", "tcp:9090:interface=127.0.0.1"),
}


def settings() -> list[Setting]:
    """
    Every option of L{Options}, whoever declared it and however, with its
    .tac environment variable and its default.
    """
    return environment.settings(Options)


def options_from_environment(environ: Mapping[str, str], program: str | None = None) -> Options:
    """
    L{Options} from C{RENDEZVOUS_*} environment variables, one per option
    (L{rendezvous_twisted.ops.environment.options_from_environment}).
    """
    return environment.options_from_environment(Options, environ, program)


def environment_service(environ: Mapping[str, str]) -> IService:
    """
    The service of the .tac: L{makeService} with the options of the
    environment (L{options_from_environment}); a mistake ends the program
    with a short message naming the variable.
    """
    return makeService(options_from_environment(environ, program=TAC), environ=environ)


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
    store = open_store(config, reactor, options["store-url"])
    counts = Metrics()
    guard = Guard(config, reactor, counts)
    policy = create_policy(config, reactor)
    api = RendezvousAPI(store, config, reactor, guard, policy)
    site = RendezvousSite(
        api.resource(),
        guard,
        reactor,
        access_log=not options["no-access-log"],
        public_paths=api.public_paths,
    )

    json_logs = options["log-format"] == "json"
    log_observer = logs.observer("json") if json_logs else None
    if not json_logs and logs.twistd_logs_to_stdout(getattr(options, "parent", None)):
        # The same lines twistd's own observer would write, cheaper per
        # access line; twistd keeps its own for a log file or syslog.
        log_observer = logs.observer("text")
    root = RendezvousRoot(log_observer, program=options.program)
    OpenFileLimitService().setServiceParent(root)  # type: ignore[no-untyped-call]
    # First in, last out: the listeners stop before the store answers its
    # parked readers.
    lifecycle = Lifecycle()
    # HTTP/2 is spoken on TLS listeners when h2 is installed.
    any_tls = any(listener.tls for listener in options["listeners"])
    http2 = wire.H2_AVAILABLE and any_tls
    if any_tls and not wire.H2_AVAILABLE:
        Http2Off().setServiceParent(root)  # type: ignore[no-untyped-call]
    PolicyService(policy, config).setServiceParent(root)  # type: ignore[no-untyped-call]
    StoreService(store, config, reactor, site, lifecycle, http2=http2).setServiceParent(root)  # type: ignore[no-untyped-call]
    contexts = tls.ContextRegistry()
    # Always, and before any listener listens: SIGHUP's default action would
    # kill the process, and a "systemctl reload" must never do that.
    HangupReloader(contexts.reload, reactor).setServiceParent(root)  # type: ignore[no-untyped-call]
    listeners = []
    for parsed in options["listeners"]:
        endpoint = _endpoint(options, parsed, reactor, contexts)
        listener = ListenerService(endpoint, site)
        listener.label = parsed.label
        listener.scheme = parsed.scheme
        listener.setServiceParent(root)  # type: ignore[no-untyped-call]
        listeners.append(listener)

    systemd.SystemdService(
        systemd.Notifier.from_environment(environ),
        listeners,
        lambda: systemd.status(store, site),
        lifecycle,
        reactor,
        systemd.watchdog_interval_seconds(environ, os.getpid()),
    ).setServiceParent(root)  # type: ignore[no-untyped-call]
    if options["metrics-listener"] is not None:
        metrics.watch(counts, store, site, contexts)
        endpoint = _endpoint(options, options["metrics-listener"], reactor, contexts)
        late = LateListenerService(
            endpoint,
            metrics.metrics_site(
                counts,
                lambda: lifecycle.stopping,
                reactor,
                store_available=lambda: store.available,
                saturated=lambda: site.saturated,
            ),
            lifecycle,
        )
        late.label = options["metrics-listener"].label
        late.path = "metrics"
        late.scheme = options["metrics-listener"].scheme
        late.setServiceParent(root)  # type: ignore[no-untyped-call]
    # Started after everything else: all that lives as long as the process
    # exists by then.
    FrozenHeap().setServiceParent(root)  # type: ignore[no-untyped-call]
    # Last in, first out: on stop, tell everyone at once that we are stopping.
    StoppingService(lifecycle).setServiceParent(root)  # type: ignore[no-untyped-call]
    return root


def _endpoint(
    options: Options, listener: endpoints.Listener, reactor: Any, contexts: tls.ContextRegistry
) -> IStreamServerEndpoint:
    """
    The endpoint of a parsed C{--listen} or C{--metrics} listener; what
    only the start can tell is wrong with it (a socket systemd did not
    pass, certificate files gone since) ends the program, or raises
    L{StartupError} for a library caller.
    """
    try:
        return endpoints.listen_endpoint(reactor, listener, contexts)
    except (endpoints.EndpointError, tls.CertificateError) as e:
        message = f"{listener.label}: {e}"
        if options.program is None:
            raise StartupError(message) from e
        raise SystemExit(f"{options.program}: {message}") from None
