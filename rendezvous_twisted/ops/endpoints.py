"""
Where the server listens: the C{--listen} and C{--metrics} descriptions,
checked once when the options are parsed, so that a mistake is a one-line
usage error rather than a traceback when the listener starts.

A description is a bare port (C{9000}, on the loopback interface), or a
Twisted endpoint string (C{tcp:9000:interface=0.0.0.0}, C{unix:/run/x.sock},
C{systemd:domain=INET:name=https}, an endpoint plugin's), or one of ours
(C{ssl:...}, C{tls:ENDPOINT}; see L{rendezvous_twisted.ops.tls}).  Twisted's own
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
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import getPlugins

from rendezvous_twisted.ops import tls

#: The interface a bare port listens on: a newcomer's server is not on the
#: network until they say so.
BARE_PORT_INTERFACE = "127.0.0.1"

#: Twisted's endpoint kinds this server is known to serve on; any other
#: prefix must be an endpoint plugin's.
_KINDS = ("tcp", "tcp6", "unix", "systemd")

_PORT = re.compile(r"[0-9]+\Z")


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


def check(description: str, tls_default: tls.CertificateFiles | None) -> None:
    """
    Raise L{EndpointError} if C{description} (already L{expand}ed) cannot
    listen as far as can be told without listening: an unknown kind, a
    port that is not a number in 0-65535, a missing argument, a UNIX
    socket in a directory that does not exist, a TLS listener without a
    certificate.  Certificate files are read by the caller
    (L{tls.load_identity}); whether systemd passed the socket a C{systemd:}
    description names is known only at the start (L{listen_endpoint}).
    """
    if not description:
        raise EndpointError("an empty endpoint")
    inner = description.removeprefix(tls.TLS_PREFIX)
    if inner != description and inner.startswith(("ssl:", tls.TLS_PREFIX)):
        raise EndpointError("tls: goes in front of a plain endpoint, not ssl: or tls:")
    if inner != description and _PORT.match(inner):
        raise EndpointError(
            "tls: goes in front of an endpoint, not a bare port",
            examples=(f"ssl:{inner}", f"tls:tcp:{inner}"),
        )
    if description.startswith("ssl:"):
        try:
            files = tls.parse_ssl(description).files
        except ValueError as e:
            why = str(e)
            for prefix in (f"endpoint {description!r}: ", f"endpoint {description!r} "):
                why = why.removeprefix(prefix)
            raise EndpointError(f"ssl: {why}") from None
        if files is None and tls_default is None:
            raise EndpointError("a TLS listener needs a certificate", needs_certificate=True)
        return  # ssl: is ours, and parse_ssl has read all of it
    _check_plain(inner)
    if inner != description and tls_default is None:
        raise EndpointError("a TLS listener needs a certificate", needs_certificate=True)


def _check_plain(inner: str) -> None:
    """
    Check a description that is not ours (no ssl:, no tls: in front).
    """
    try:
        args, kwargs = tls.split_description(inner)
    except ValueError as e:
        raise EndpointError(str(e)) from None
    kind = args[0]
    if kind not in _KINDS and kind.lower() not in _plugin_prefixes():
        raise EndpointError(f"unknown endpoint type {kind!r}", examples=_meant(inner))
    if kind not in _KINDS:
        return  # a plugin's: its parser may need the reactor, so it runs at start
    if kind == "systemd":
        # Twisted's parser looks the socket up among those systemd passed:
        # that is for the start (see listen_endpoint), not for parsing.
        _check_systemd(args[1:], kwargs)
        return
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


#: Interfaces that stand for every address of their family.
_WILDCARDS = frozenset(("", "0.0.0.0", "::"))  # noqa: S104 (names them; binds nothing)


def tcp_address(description: str) -> tuple[int, int, str] | None:
    """
    Where a checked TCP description (C{tcp:}, C{tcp6:}, C{ssl:}, any of
    them behind C{tls:}) listens, as (address family 4 or 6, port,
    interface: C{""} for every address); None for any other kind, and for
    port 0 (the system picks a free one).
    """
    try:
        args, kwargs = tls.split_description(description.removeprefix(tls.TLS_PREFIX))
    except ValueError:
        return None
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
    Whether two L{tcp_address}es cannot both listen: the same port of the
    same family, on the same interface or with either on every address.
    (Across families, whether C{::} takes IPv4 too is the system's choice:
    left to the start to tell.)
    """
    (family, port, interface), (other_family, other_port, other_interface) = one, other
    if (family, port) != (other_family, other_port):
        return False
    return interface == other_interface or "" in (interface, other_interface)


def listen_endpoint(
    reactor: Any,
    description: str,
    contexts: tls.ContextRegistry,
    default: tls.CertificateFiles | None,
) -> IStreamServerEndpoint:
    """
    The endpoint for a checked description (L{tls.listen_endpoint}), or
    L{EndpointError} for what only the start can tell: a systemd socket
    that systemd did not pass.
    """
    try:
        return tls.listen_endpoint(reactor, description, contexts, default)
    except (IndexError, KeyError) as e:
        if description.removeprefix(tls.TLS_PREFIX).startswith("systemd:"):
            raise EndpointError(
                f"systemd passed no such socket ({e}): start it from a unit with a "
                "matching .socket unit (FileDescriptorName=, LISTEN_FDS)"
            ) from None
        raise


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
