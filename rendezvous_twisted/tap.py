"""
The command line: C{twistd rendezvous} options, and the service they build.

This is the only module that reads options or environment variables, and
the only one that may fall back to the global reactor.

Mistakes end the program with one or two lines naming the option (or the
environment variable) as the user wrote it: L{Options.parseOptions} under
twistd, L{environment_service} for the C{.tac}, and L{makeService} for what
only the start can tell.  Never a traceback, and never twistd's whole help.
"""

from __future__ import annotations

import dataclasses
import difflib
import getopt
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from twisted.application.service import IService, Service
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from rendezvous_twisted.core.config import (
    DEFAULT_LISTEN,
    Config,
    ConfigError,
    is_positive,
    parse_network,
)
from rendezvous_twisted.core.metrics import Metrics
from rendezvous_twisted.core.store import MemoryStore, RendezvousStore
from rendezvous_twisted.http import wire
from rendezvous_twisted.http.web import RendezvousAPI, RendezvousSite
from rendezvous_twisted.ops import endpoints, logs, systemd, tls
from rendezvous_twisted.ops.logs import RendezvousRoot
from rendezvous_twisted.ops.metrics import metrics_site
from rendezvous_twisted.ops.service import (
    HangupReloader,
    LateListenerService,
    Lifecycle,
    ListenerService,
    OpenFileLimitService,
    StartupError,
    StoppingService,
    StoreService,
)
from rendezvous_twisted.redis.store import RedisStore, StoreURL, parse_store_url
from rendezvous_twisted.version import version_line
from rendezvous_twisted.words import quantity

_DEFAULTS = Config()
#: The prefix of the environment variables that the .tac file reads.
ENVIRONMENT_PREFIX = "RENDEZVOUS_"
#: --store's value for the in-memory store.
MEMORY = "memory:"
#: What the usage errors of twistd rendezvous point to.
HELP_HINT = "see: twistd rendezvous --help"
#: How the .tac is named in its usage errors.
TAC = "rendezvous.tac"
#: Options users reach for to set the port, which --listen does.
_PORT_WORDS = frozenset(("port", "p", "host", "bind", "address", "interface", "http-port"))


def _number(kind: type[float], text: str) -> float:
    """
    C{text} as a positive finite number of C{kind}; ValueError saying what
    is wrong with it otherwise.
    """
    try:
        number = kind(text)
    except ValueError:
        raise ValueError("not a whole number" if kind is int else "not a number") from None
    if math.isnan(number):
        raise ValueError("not a number")
    if not is_positive(number):
        raise ValueError("must be finite" if math.isinf(number) else "must be more than 0")
    return number


def _example(value: Any) -> str:
    """
    A default as an example value: C{60.0} as C{60}.
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Options(usage.Options):
    """
    C{twistd rendezvous} options.  Every limit defaults to L{Config}'s.
    """

    synopsis = "[options]"
    longdesc = (
        "A rendezvous server for the Matrix log-in-with-a-QR-code handshake "
        "(MSC3886 and MSC4108), with long-polling. Rendezvous live in this "
        "process' memory, or with --store in a Redis shared by several processes. "
        "twistd's own options (-n, --pidfile, --logfile, ...) go before 'rendezvous'."
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
            "Seconds a connection may stay open with no request on it (keep-alive; "
            "HTTP/2: no stream open).",
            float,
        ),
        (
            "max-header-bytes",
            "max_header_bytes",
            "Bytes of a request's line and headers (HTTP/2: of its header block, "
            "HEADERS and CONTINUATION, and of the decoded header list).",
            int,
        ),
        ("max-headers", "max_headers", "Header lines of one request.", int),
        (
            "max-streams-per-connection",
            "max_streams_per_connection",
            "Requests (streams) open at once on one HTTP/2 connection, advertised in "
            "SETTINGS; more are refused for the client to retry.",
            int,
        ),
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
        [
            option,
            None,
            getattr(_DEFAULTS, field),
            f"{help_text} A positive {'whole ' if kind is int else ''}number.",
        ]
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

    #: How the program is named in usage errors ("twistd rendezvous", or the
    #: .tac's name), or None when these options are parsed by a library
    #: caller: then a usage error is raised as UsageError rather than
    #: ending the program.
    program: str | None = None

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # The opt_* docstrings are the help of their options, and Twisted
        # keeps their line breaks and indentation as runs of spaces.
        self.docs = {name: " ".join(doc.split()) for name, doc in self.docs.items() if doc}
        self["listen"] = []
        for option, _ in self._networks:
            self[option] = []
        #: The options given, with their values as written (the last one
        #: of a repeated option), for messages.
        self.given: dict[str, str] = {}
        #: Option -> environment variable, when the options came from the
        #: environment (L{options_from_environment}).
        self.variables: dict[str, str] = {}

    # Naming options as the user wrote them.

    def name(self, option: str) -> str:
        """
        C{option} as the user spells it: C{--ttl}, or C{RENDEZVOUS_TTL}.
        """
        return self.variables.get(option, f"--{option}")

    def spelled(self, option: str, value: str | None = None) -> str:
        """
        C{option} with a value as the user would write it: C{--ttl 60}, or
        C{RENDEZVOUS_TTL=60}; with no value, the one given.
        """
        if value is None:
            value = self.given.get(option, "")
        if option in self.variables:
            return f"{self.variables[option]}={value}"
        return f"--{option} {shlex.quote(value)}"

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
        return f"{self.name(option)} (default {_example(getattr(_DEFAULTS, field))})"

    def usage_error(self, message: str) -> str:
        """
        The whole text of a usage error: the program, the message, and
        where to read more.
        """
        hint = HELP_HINT
        if self.variables:
            hint += f" (each {ENVIRONMENT_PREFIX}NAME variable is the option --name)"
        return f"{self.program}: {message}\n{hint}"

    # Parsing.

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse C{options} (C{sys.argv[1:]} when None).  A mistake raises
        C{UsageError} with a message naming the option as written; when
        run as a program (under twistd, or the .tac through
        L{environment_service}) it ends the program with that message and
        a pointer to the help instead, since twistd would print its whole
        help before it.
        """
        if self.program is None and self.parent is not None:
            self.program = "twistd rendezvous"
        argv = list(sys.argv[1:] if options is None else options)
        try:
            if "--_shell-completion" not in argv:  # Twisted's own, for shells
                self._read_words(argv)
            super().parseOptions(argv)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            # Twisted's words for a coercer's ValueError: the value is what counts.
            message = str(e).removeprefix("Parameter type enforcement failed: ")
            if self.program is None:
                raise usage.UsageError(message) from None
            raise SystemExit(self.usage_error(message)) from None

    def _read_words(self, argv: list[str]) -> None:
        """
        Check the words of the command line as Twisted's parser will read
        them (with getopt), so that a mistake is told in our words: an
        unknown option with a guess at the one meant, an option of twistd
        given after "rendezvous", a missing value.  Remember each value as
        written, for later messages.
        """
        try:
            found, _ = getopt.getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(self._getopt_message(e)) from None
        for opt, value in found:
            name = opt.lstrip("-")
            self.given[self.synonyms.get(name.replace("-", "_"), name).replace("_", "-")] = value

    def _getopt_message(self, error: getopt.GetoptError) -> str:
        opt = error.opt
        spelled = ("--" if len(opt) > 1 else "-") + opt
        if "not recognized" in error.msg:
            if opt.lower() in _PORT_WORDS:
                return (
                    f"no option {spelled}: give the port with --listen, e.g. --listen 9000 "
                    "(on 127.0.0.1) or --listen tcp:9000:interface=0.0.0.0"
                )
            if self.parent is not None and _knows(self.parent, opt):
                value = ""
                if _takes_value(self.parent, opt):
                    value = " VALUE" if len(opt) == 1 else "=VALUE"
                return (
                    f"{spelled} is an option of twistd itself: it goes before 'rendezvous' "
                    f"(twistd {spelled}{value} rendezvous ...)"
                )
            names = sorted({n.rstrip("=") for n in self.longOpt})
            close = difflib.get_close_matches(opt, names, n=1)
            guess = f"; did you mean --{close[0]}?" if close else ""
            return f"no option {spelled}{guess}"
        if "requires argument" in error.msg:
            default = self.defaults.get(opt.replace("-", "_"), self.defaults.get(opt))
            example = f", e.g. {spelled} {_example(default)}" if default is not None else ""
            return f"{spelled} needs a value{example}"
        if "must not have an argument" in error.msg:
            return f"{spelled} takes no value"
        if "not a unique prefix" in error.msg:
            names = sorted(n.rstrip("=") for n in self.longOpt if n.startswith(opt))
            return f"{spelled} could be any of --{', --'.join(names)}"
        return error.msg

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
        limits: dict[str, Any] = {}
        for option, field, _, kind in self._limits:
            value = self[option]
            if isinstance(value, str):
                try:
                    value = _number(kind, value)
                except ValueError as e:
                    example = self.spelled(option, _example(getattr(_DEFAULTS, field)))
                    raise usage.UsageError(
                        f"{self.spelled(option, value)}: {e}, e.g. {example}"
                    ) from None
            limits[field] = self[option] = value
        for option, _ in self._networks:
            for network in self[option]:
                try:
                    parse_network(network)
                except ValueError as e:
                    example = self.spelled(option, "10.0.0.0/8")
                    raise usage.UsageError(
                        f"{self.spelled(option, network)}: {e}, e.g. {example}"
                    ) from None
        try:
            fields: dict[str, Any] = {
                field: tuple(self[option]) for option, field in self._networks
            }
            self["config"] = Config(
                public_url=self["public-url"],
                msc4108_session_prefix=self["msc4108-session-prefix"],
                proxy_header=self["proxy-header"],
                **fields,
                **limits,
            )
        except ConfigError as e:
            raise usage.UsageError(e.render(self._field_name)) from None
        self["store-url"] = self._store_url()
        self._parse_listeners()
        self._check_tls()
        self._check_clashes()
        self._check_twistd()

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

    def _check_twistd(self) -> None:
        """
        Refuse a log or PID file of twistd's (given before "rendezvous")
        that twistd could not write: it would fail with a traceback once
        it opens them, after these options.
        """
        parent = self.parent
        if parent is None:
            return
        for option in ("logfile", "pidfile"):
            try:
                path = parent[option]
            except KeyError:
                continue
            if not path or path == "-":
                continue
            if option == "pidfile":
                path = os.path.join(parent.get("rundir") or ".", path)
            problem = _unwritable(Path(path))
            if problem:
                raise usage.UsageError(f"twistd's --{option} {path}: {problem}")
        if self["log-format"] == "json":
            self._check_json_logs(parent)

    def _check_json_logs(self, parent: Any) -> None:
        """
        Refuse JSON logs that would reach nobody: they go to standard
        output, which a daemonized twistd closes, and twistd's --logfile or
        --syslog would be silently left unused.
        """
        json = self.spelled("log-format", "json")
        where = None
        if parent.get("logfile") not in (None, "", "-"):
            where = f"--logfile {parent['logfile']}"
        elif parent.get("syslog"):
            where = "--syslog"
        if where is not None:
            raise usage.UsageError(
                f"{json} writes to standard output, not to twistd's {where}: drop one of them "
                "(journald and log collectors read standard output)"
            )
        if not parent.get("nodaemon"):
            raise usage.UsageError(
                f"{json} writes to standard output, which twistd closes when it daemonizes: "
                "add -n before 'rendezvous' (twistd -n rendezvous ...), or log text to "
                "twistd.log without it"
            )


def _unwritable(path: Path) -> str | None:
    """
    Why C{path} could not be opened for writing, or None.
    """
    if path.is_dir():
        return "is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else "permission denied"
    directory = path.parent
    if not directory.is_dir():
        return f"no such directory: {directory}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create a file in {directory}: permission denied"
    return None


def _knows(options: Any, opt: str) -> bool:
    """
    Whether C{options} (twistd's own) has the option C{opt}.
    """
    synonyms = getattr(options, "synonyms", {})
    return opt in synonyms or opt.replace("-", "_") in synonyms


def _takes_value(options: Any, opt: str) -> bool:
    long = options.synonyms.get(opt, options.synonyms.get(opt.replace("-", "_"), opt))
    return f"{long}=" in options.longOpt or f"{long.replace('_', '-')}=" in options.longOpt


#: Two good examples for each option that takes an endpoint.
_ENDPOINT_EXAMPLES = {
    "listen": ("9000", "tcp:9000:interface=0.0.0.0"),
    "metrics": ("9090", "tcp:9090:interface=127.0.0.1"),
}
#: Config field -> the option that sets it.
_FIELD_OPTIONS: dict[str, str] = {
    **{field: option for option, field, _, _ in Options._limits},
    **{field: option for option, field in Options._networks},
    "public_url": "public-url",
    "msc4108_session_prefix": "msc4108-session-prefix",
    "proxy_header": "proxy-header",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """
    One option of L{Options} as users set it: on the command line, or
    through its environment variable for the .tac.
    """

    #: The option's long name, without dashes.
    option: str
    #: The .tac's environment variable.
    variable: str
    #: Whether it takes a value (else it is a flag).
    takes_value: bool
    #: Whether it may be given more than once (the variable then holds
    #: several values, separated by spaces).
    repeatable: bool
    #: What an empty command line gives it.
    default: Any


def settings() -> list[Setting]:
    """
    Every option of L{Options}, whoever declared it and however (a
    parameter, a flag, an C{opt_} method), but C{--help} and C{--version}.
    """
    blank = Options()
    effective = Options()
    effective.parseOptions([])
    found = []
    for long in blank.longOpt:
        option = long.rstrip("=")
        if option in ("help", "version"):
            continue
        key = blank.synonyms.get(option.replace("-", "_"), option)
        key = key if key in effective else option
        found.append(
            Setting(
                option=option,
                variable=ENVIRONMENT_PREFIX + option.upper().replace("-", "_"),
                takes_value=long.endswith("="),
                repeatable=isinstance(blank.get(key), list),
                default=effective.get(key),
            )
        )
    return found


def options_from_environment(environ: Mapping[str, str], program: str | None = None) -> Options:
    """
    Parse L{Options} from C{RENDEZVOUS_*} environment variables, one per
    option (L{settings}): C{--max-bytes} is C{RENDEZVOUS_MAX_BYTES}, a
    repeatable option's variable holds its values separated by spaces
    (C{RENDEZVOUS_LISTEN}, C{RENDEZVOUS_TRUSTED_PROXY}...), and a flag's is
    1 or 0.  A C{RENDEZVOUS_*} variable that is no option's is refused
    (a typo would otherwise be silently ignored).  Mistakes name the
    variable; with a C{program} they end it (see L{Options.parseOptions}).
    """
    options = Options()
    options.program = program
    known = {s.variable: s for s in settings()}
    options.variables = {s.option: s.variable for s in known.values()}
    argv: list[str] = []
    try:
        for variable in sorted(environ):
            if not variable.startswith(ENVIRONMENT_PREFIX):
                continue
            value = environ[variable]
            setting = known.get(variable)
            if setting is None:
                close = difflib.get_close_matches(variable, list(known), n=1)
                guess = f"; did you mean {close[0]}?" if close else ""
                word = variable.removeprefix(ENVIRONMENT_PREFIX).lower().replace("_", "-")
                if word in _PORT_WORDS:
                    listen = f"{ENVIRONMENT_PREFIX}LISTEN"
                    guess = (
                        f": give the port with {listen}, e.g. {listen}=9000 (on 127.0.0.1) "
                        f"or {listen}=tcp:9000:interface=0.0.0.0"
                    )
                raise usage.UsageError(f"{variable}={value}: no such setting{guess}")
            if not setting.takes_value:
                if value.lower() in ("1", "true", "yes"):
                    argv.append(f"--{setting.option}")
                elif value.lower() not in ("", "0", "false", "no"):
                    raise usage.UsageError(f"{variable}={value}: must be 1 or 0")
                continue
            for one in value.split() if setting.repeatable else [value]:
                argv.append(f"--{setting.option}={one}")
    except usage.UsageError as e:
        if program is None:
            raise
        raise SystemExit(options.usage_error(str(e))) from None
    options.parseOptions(argv)
    return options


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
    root = RendezvousRoot(log_observer, program=options.program)
    OpenFileLimitService().setServiceParent(root)  # type: ignore[no-untyped-call]
    # First in, last out: the listeners stop before the store answers its
    # parked readers.
    lifecycle = Lifecycle()
    connections = store.service if isinstance(store, RedisStore) else None
    # HTTP/2 is spoken on TLS listeners when h2 is installed.
    any_tls = any(listener.tls for listener in options["listeners"])
    http2 = wire.H2_AVAILABLE and any_tls
    if any_tls and not wire.H2_AVAILABLE:
        Http2Off().setServiceParent(root)  # type: ignore[no-untyped-call]
    StoreService(store, config, reactor, site, lifecycle, connections, http2).setServiceParent(root)  # type: ignore[no-untyped-call]
    contexts = tls.ContextRegistry()
    # Always, and before any listener listens: SIGHUP's default action would
    # kill the process, and a "systemctl reload" must never do that.
    HangupReloader(contexts.reload, reactor).setServiceParent(root)  # type: ignore[no-untyped-call]
    listeners = []
    for parsed in options["listeners"]:
        endpoint = _endpoint(options, parsed, reactor, contexts)
        listener = ListenerService(endpoint, site)  # type: ignore[no-untyped-call]
        listener.label = parsed.label
        listener.scheme = parsed.scheme
        listener.setServiceParent(root)  # type: ignore[no-untyped-call]
        listeners.append(listener)

    def status() -> str:
        return ", ".join(
            (
                quantity(store.rendezvous_count, "rendezvous", "rendezvous"),
                quantity(store.parked_count, "parked reader"),
                quantity(site.in_flight, "request") + " in flight",
                quantity(site.connection_count, "connection"),
            )
        )

    systemd.SystemdService(
        systemd.Notifier.from_environment(environ),
        listeners,
        status,
        lifecycle,
        reactor,
        systemd.watchdog_interval_seconds(environ, os.getpid()),
    ).setServiceParent(root)  # type: ignore[no-untyped-call]
    if options["metrics-listener"] is not None:
        _watch(metrics, store, site, contexts)
        endpoint = _endpoint(options, options["metrics-listener"], reactor, contexts)
        late = LateListenerService(
            endpoint,
            metrics_site(
                metrics,
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
    # Last in, first out: on stop, tell everyone at once that we are stopping.
    StoppingService(lifecycle).setServiceParent(root)  # type: ignore[no-untyped-call]
    return root


class Http2Off(Service):
    """
    Says at start that the TLS listeners speak HTTP/1.1 only, and how to get
    HTTP/2: without the C{http2} extra, C{curl --http2} and browsers are
    served HTTP/1.1 without a word.
    """

    log = Logger()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.log.info(
            "HTTP/2 is off (h2 is not installed): TLS listeners speak HTTP/1.1 only; "
            "for HTTP/2, install the http2 extra (pip install 'rendezvous-twisted[http2]')"
        )


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
