"""
Where the server listens: the C{--listen} and C{--metrics} descriptions,
parsed here and nowhere else, once when the options are parsed
(L{parse}, then L{serving} for the certificate files), so that a mistake
is a one-line usage error rather than a traceback when the listener starts,
and the start listens on the L{Listener} that parse made.

A description is a bare port (C{9000}, on the loopback interface), or a
Twisted endpoint string (C{tcp:9000:interface=0.0.0.0}, C{unix:/run/x.sock},
C{systemd:domain=INET:name=https}, an endpoint plugin's), or one of ours
(C{ssl:...}, C{tls:ENDPOINT}; the TLS itself is L{rendezvous_twisted.ops.tls}).  Twisted's own
descriptions are checked by Twisted's public parser,
L{twisted.internet.endpoints.serverFromString}, which builds an endpoint
without listening.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import getPlugins

from rendezvous_twisted.ops import tls
from rendezvous_twisted.ops.tls import CertificateFiles

#: The interface a bare port listens on: a newcomer's server is not on the
#: network until they say so.
BARE_PORT_INTERFACE = "127.0.0.1"

#: Twisted's endpoint kinds this server is known to serve on; any other
#: prefix must be an endpoint plugin's.
_KINDS = ("tcp", "tcp6", "unix", "systemd")

_PORT = re.compile(r"[0-9]+\Z")

#: The prefix that puts TLS, with the --tls-cert/--tls-key files, in front of
#: any other server endpoint: C{tls:systemd:domain=INET:name=https}.
TLS_PREFIX = "tls:"


class EndpointError(ValueError):
    """
    A description that cannot listen.  The message says why, without the
    option's name (the caller knows how the user wrote it).
    C{needs_certificate}: a TLS listener was given no certificate files.
    C{examples}: descriptions that say what the user most likely meant, if
    it can be told (C{tcp:9000:interface=0.0.0.0} for C{0.0.0.0:9000}).
    """

    def __init__(
        self, message: str, needs_certificate: bool = False, examples: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.needs_certificate = needs_certificate
        self.examples = examples


def expand(description: str) -> str:
    """
    The Twisted description for C{description}: a bare port becomes
    C{tcp:PORT:interface=127.0.0.1}; anything else is returned as it is.
    """
    if _PORT.match(description):
        return f"tcp:{description}:interface={BARE_PORT_INTERFACE}"
    return description


@dataclass(frozen=True)
class SSLListen:
    """
    What an C{ssl:} description asks for, in Twisted's own syntax:
    C{ssl:PORT[:interface=ADDR][:backlog=N]:privateKey=KEY[:certKey=CERT]
    [:extraCertChain=CHAIN]} (or C{port=PORT}).  Without C{privateKey}, the
    C{--tls-cert}/C{--tls-key} files are used.
    """

    port: int
    interface: str
    backlog: int
    files: tls.CertificateFiles | None


@dataclass(frozen=True)
class Listener:
    """
    One C{--listen} or C{--metrics} description, parsed (L{parse}).

    C{description}: as Twisted (or we, for C{ssl:} and C{tls:}) read it,
    bare ports L{expand}ed.  C{label}: how the user wrote it, for messages
    (C{--listen 9000}).  C{tls}: whether it serves TLS, with C{files} once
    L{serving} has given it its certificate.  C{address}: where a TCP
    listener listens (L{tcp_address}), None for any other.
    """

    description: str
    label: str
    tls: bool = False
    files: CertificateFiles | None = None
    address: tuple[int, int, str] | None = None
    ssl: SSLListen | None = None

    @property
    def scheme(self) -> str:
        """
        The scheme of the URLs it serves.
        """
        return "https" if self.tls else "http"


def parse(description: str, label: str | None = None) -> Listener:
    """
    The L{Listener} for C{description} (already L{expand}ed), or
    L{EndpointError} if it cannot listen as far as can be told without
    listening: an unknown kind, a port that is not a number in 0-65535, a
    missing argument, a UNIX socket in a directory that does not exist.
    Its certificate is L{serving}'s to find (and L{tls.load_identity}'s to
    read); whether systemd passed the socket a C{systemd:} description
    names is known only at the start (L{listen_endpoint}).
    """
    if not description:
        raise EndpointError("an empty endpoint")
    inner = description.removeprefix(TLS_PREFIX)
    wrapped = inner != description
    if wrapped and inner.startswith(("ssl:", TLS_PREFIX)):
        raise EndpointError("tls: goes in front of a plain endpoint, not ssl: or tls:")
    if wrapped and _PORT.match(inner):
        raise EndpointError(
            "tls: goes in front of an endpoint, not a bare port",
            examples=(f"ssl:{inner}", f"tls:tcp:{inner}"),
        )
    label = label or description
    if description.startswith("ssl:"):
        try:
            ssl = parse_ssl(description)
        except ValueError as e:
            why = str(e)
            for prefix in (f"endpoint {description!r}: ", f"endpoint {description!r} "):
                why = why.removeprefix(prefix)
            raise EndpointError(f"ssl: {why}") from None
        fields = {"interface": ssl.interface} if ssl.interface else {}
        address = _tcp_address(["ssl", str(ssl.port)], fields)
        return Listener(description, label, True, ssl.files, address, ssl)
    address = _tcp_address(*_check_plain(inner))
    return Listener(description, label, wrapped, None, address)


def serving(listener: Listener, tls_default: tls.CertificateFiles | None) -> Listener:
    """
    C{listener} with the certificate files it serves with: an C{ssl:}
    listener's own, else C{tls_default} (C{--tls-cert}, C{--tls-key}).
    L{EndpointError} (C{needs_certificate}) if a TLS listener has none.
    """
    if not listener.tls:
        return listener
    files = listener.files or tls_default
    if files is None:
        raise EndpointError("a TLS listener needs a certificate", needs_certificate=True)
    return replace(listener, files=files)


def _check_plain(inner: str) -> tuple[list[str], dict[str, str]]:
    """
    Check a description that is not ours (no ssl:, no tls: in front), and
    return its fields (L{split_description}).
    """
    try:
        args, kwargs = split_description(inner)
    except ValueError as e:
        raise EndpointError(str(e)) from None
    kind = args[0]
    if kind not in _KINDS and kind.lower() not in _plugin_prefixes():
        raise EndpointError(f"unknown endpoint type {kind!r}", examples=_meant(inner))
    if kind not in _KINDS:
        return args, kwargs  # a plugin's: its parser may need the reactor: at start
    if kind == "systemd":
        # Twisted's parser looks the socket up among those systemd passed:
        # that is for the start (see listen_endpoint), not for parsing.
        _check_systemd(args[1:], kwargs)
        return args, kwargs
    if kind in ("tcp", "tcp6"):
        _check_port(args[1:], kwargs)
    try:
        # Builds the endpoint, which listens only when asked: the reactor is
        # not touched by Twisted's own parsers.
        serverFromString(_NOT_A_REACTOR, inner)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise EndpointError(_twisted_complaint(kind, e)) from None
    if kind == "unix":
        _check_unix(args[1:], kwargs)
    return args, kwargs


#: Interfaces that stand for every address of their family.
_WILDCARDS = frozenset(("", "0.0.0.0", "::"))  # noqa: S104 (names them; binds nothing)


def _tcp_address(args: list[str], kwargs: dict[str, str]) -> tuple[int, int, str] | None:
    """
    Where a checked TCP description (C{tcp:}, C{tcp6:}, C{ssl:}, any of
    them behind C{tls:}) listens, from its fields, as (address family 4 or
    6, port, interface: C{""} for every address); None for any other kind,
    and for port 0 (the system picks a free one).
    """
    kind = args[0]
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port = kwargs.get("port", args[1] if len(args) > 1 else "")
    if not _PORT.match(port) or int(port) == 0:
        return None
    interface = kwargs.get("interface", args[2] if kind != "ssl" and len(args) > 2 else "")
    family = 6 if kind == "tcp6" or ":" in interface else 4
    return family, int(port), "" if interface in _WILDCARDS else interface


def same_address(one: tuple[int, int, str], other: tuple[int, int, str]) -> bool:
    """
    Whether two L{Listener} addresses cannot both listen: the same port of the
    same family, on the same interface or with either on every address.
    (Across families, whether C{::} takes IPv4 too is the system's choice:
    left to the start to tell.)
    """
    (family, port, interface), (other_family, other_port, other_interface) = one, other
    if (family, port) != (other_family, other_port):
        return False
    return interface == other_interface or "" in (interface, other_interface)


def listen_endpoint(
    reactor: Any, listener: Listener, contexts: tls.ContextRegistry
) -> IStreamServerEndpoint:
    """
    The endpoint of a parsed listener: C{ssl:} and C{tls:...} ones on a
    reloadable context from C{contexts} (L{tls.TLSServerEndpoint}), any
    other as Twisted's C{serverFromString} makes it.  L{EndpointError} for
    what only the start can tell: a systemd socket that systemd did not
    pass; L{tls.CertificateError} for certificate files gone since.
    """
    description = listener.description
    try:
        if not listener.tls:
            plain: IStreamServerEndpoint = serverFromString(reactor, description)
            return plain
        assert listener.files is not None, "a TLS listener is given its files by serving()"
        context = contexts.context(listener.files)
        if listener.ssl is None:
            inner = serverFromString(reactor, description.removeprefix(TLS_PREFIX))
        else:
            # listenTCP takes IPv6 interfaces too, so this serves "::" as well.
            ssl = listener.ssl
            inner = TCP4ServerEndpoint(reactor, ssl.port, ssl.backlog, ssl.interface)
        return tls.TLSServerEndpoint(inner, context)
    except (IndexError, KeyError) as e:
        if description.removeprefix(TLS_PREFIX).startswith("systemd:"):
            raise EndpointError(
                f"systemd passed no such socket ({e}): start it from a unit with a "
                "matching .socket unit (FileDescriptorName=, LISTEN_FDS)"
            ) from None
        raise


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description as Twisted does: fields separated by
    unescaped colons, C{name=value} fields as keywords, a backslash escaping
    the next character.  C{"ssl:443:interface=\\:\\:"} gives
    C{(["ssl", "443"], {"interface": "::"})}.
    """
    fields: list[list[str]] = [[""]]  # each field: [text] or [name, value]
    escaped = False
    for char in description:
        if escaped:
            fields[-1][-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append([""])
        elif char == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += char
    if escaped:
        raise ValueError(f"endpoint {description!r} ends in a lone backslash")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for field in fields:
        if len(field) == 1:
            args.append(field[0])
        else:
            if field[0] in kwargs:
                raise ValueError(f"endpoint {description!r} repeats {field[0]}=")
            kwargs[field[0]] = field[1]
    return args, kwargs


_SSL_KEYWORDS = {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"}


def parse_ssl(description: str) -> SSLListen:
    """
    Parse an C{ssl:} description.  Raises ValueError naming what is wrong,
    including keywords we do not honour (C{sslmethod}, C{dhParameters}):
    the protocol versions and ciphers are ours, never silently something else.
    """
    args, kwargs = split_description(description)
    if args[0] != "ssl":
        raise ValueError(f"not an ssl: endpoint: {description!r}")
    unknown = set(kwargs) - _SSL_KEYWORDS
    if unknown:
        raise ValueError(
            f"endpoint {description!r}: unsupported {', '.join(sorted(unknown))} "
            f"(supported: {', '.join(sorted(_SSL_KEYWORDS))}; TLS 1.2+ and modern "
            f"ciphers are fixed)"
        )
    positional = args[1:]
    if "port" in kwargs:
        positional.insert(0, kwargs["port"])
    if len(positional) != 1:
        raise ValueError(f"endpoint {description!r} must give exactly one port")
    try:
        port = int(positional[0])
        backlog = int(kwargs.get("backlog", "50"))
    except ValueError:
        raise ValueError(f"endpoint {description!r}: port and backlog are numbers") from None
    if not 0 <= port <= 65535 or backlog <= 0:
        raise ValueError(f"endpoint {description!r}: port or backlog out of range")
    files = None
    if "privateKey" in kwargs:
        files = tls.CertificateFiles(
            certificate=Path(kwargs.get("certKey", kwargs["privateKey"])),
            private_key=Path(kwargs["privateKey"]),
            extra_chain=Path(kwargs["extraCertChain"]) if "extraCertChain" in kwargs else None,
        )
    elif "certKey" in kwargs or "extraCertChain" in kwargs:
        raise ValueError(f"endpoint {description!r}: certKey and extraCertChain need privateKey")
    return SSLListen(port, kwargs.get("interface", ""), backlog, files)


def _meant(description: str) -> tuple[str, ...]:
    """
    The endpoint a description of an unknown kind most likely meant, if it
    can be told: a HOST:PORT (C{0.0.0.0:9000}, C{:9000}, C{localhost:9000})
    as C{tcp:PORT:interface=HOST}, a misspelt kind (C{tpc:9000}) spelt.
    """
    host, _, port = description.rpartition(":")
    if _PORT.match(port) and (host in ("", "localhost") or _is_ipv4(host)):
        # What ":9000" means elsewhere: every address (an example, not a bind).
        return (f"tcp:{port}:interface={host or '0.0.0.0'}",)  # noqa: S104
    kind, _, rest = description.partition(":")
    close = difflib.get_close_matches(kind.lower(), [*_KINDS, "ssl", "tls"], n=1)
    return (f"{close[0]}:{rest}",) if close and rest else ()


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _plugin_prefixes() -> set[str]:
    return {
        str(plugin.prefix).lower()
        for plugin in getPlugins(IStreamServerEndpointStringParser)
        if getattr(plugin, "prefix", None)
    }


def _check_port(positional: list[str], kwargs: dict[str, str]) -> None:
    ports = [*positional[:1], *([kwargs["port"]] if "port" in kwargs else [])]
    if len(ports) != 1:
        raise EndpointError("give exactly one port")
    if not _PORT.match(ports[0]):
        raise EndpointError(f"the port must be a number, not {ports[0]!r}")
    if int(ports[0]) > 65535:
        raise EndpointError(f"port {ports[0]} is not in 0-65535")
    if "backlog" in kwargs and not (_PORT.match(kwargs["backlog"]) and int(kwargs["backlog"])):
        raise EndpointError(f"backlog= must be a positive number, not {kwargs['backlog']!r}")


def _check_systemd(positional: list[str], kwargs: dict[str, str]) -> None:
    if positional or set(kwargs) - {"domain", "index", "name"}:
        raise EndpointError("systemd: takes domain= and one of index= or name= only")
    domain = kwargs.get("domain")
    if domain is None or not hasattr(socket, "AF_" + domain):
        raise EndpointError(f"systemd: domain= must be INET, INET6 or UNIX, not {domain!r}")
    if ("index" in kwargs) == ("name" in kwargs):
        raise EndpointError("systemd: give one of index= or name=")
    if "index" in kwargs and not _PORT.match(kwargs["index"]):
        raise EndpointError(f"systemd: index= is a number, not {kwargs['index']!r}")


def _check_unix(positional: list[str], kwargs: dict[str, str]) -> None:
    address = kwargs.get("address", positional[0] if positional else "")
    if not address:
        raise EndpointError("unix: needs the socket's path (unix:/run/rendezvous/http.sock)")
    directory = Path(address).parent
    if not directory.is_dir():
        raise EndpointError(f"no such directory: {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise EndpointError(f"cannot create a socket in {directory}: permission denied")


def _twisted_complaint(kind: str, error: Exception) -> str:
    """
    What Twisted's parser said, in words: its errors are Python's (a
    C{TypeError} for an unexpected keyword, C{int()}'s for a number).
    """
    text = str(error)
    if isinstance(error, TypeError) and "unexpected keyword argument" in text:
        keyword = text.rsplit(" ", 1)[-1].strip("'")
        return f"{kind}: does not take {keyword}="
    if isinstance(error, TypeError) and "missing" in text:
        return f"{kind}: a required field is missing"
    if "invalid literal for int()" in text:
        return f"{kind}: {text.rsplit(': ', 1)[-1]} is not a number"
    return f"{kind}: {text}"


class _NotAReactor:
    """
    What Twisted's parsers get for a reactor when a description is only
    checked: they store it in the endpoint and never call it.
    """


_NOT_A_REACTOR = _NotAReactor()
