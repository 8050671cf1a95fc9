"""
Where the Redis is: C{--store}'s URL, and the client endpoint that reaches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

#: Prepended to every key and to the channel, unless C{?prefix=} says otherwise.
DEFAULT_PREFIX = "rendezvous:"


@dataclass(frozen=True)
class StoreURL:
    """
    Where the Redis is, as C{--store} names it.
    """

    #: "tcp", "tls" or "unix".
    transport: str
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: A PEM file of the CA that signed the server's certificate (TLS only);
    #: None trusts the system's CAs.
    ca: str | None = None
    #: Prepended to every key and to the channel.
    prefix: str = DEFAULT_PREFIX

    def __str__(self) -> str:
        """
        The URL without its password, for logs.
        """
        if self.transport == "unix":
            return f"unix://{self.path}?db={self.db}"
        scheme = "rediss" if self.transport == "tls" else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_store_url(text: str) -> StoreURL:
    """
    Parse C{redis://[user:password@]host[:port][/db]}, C{rediss://...}
    (TLS; C{?ca=FILE} for a private CA) or C{unix:///path[?db=N]};
    C{?prefix=} and, for unix, C{?user=} and C{?password=} are accepted too.

    @raise ValueError: with a message fit for the command line.
    """
    parts = urlsplit(text)
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    known = {"prefix", "db", "user", "password", "ca"}
    unknown = set(query) - known
    if unknown:
        raise ValueError(f"--store: unknown parameter {sorted(unknown)[0]!r} in {text!r}")
    prefix = query.get("prefix", DEFAULT_PREFIX)
    if parts.scheme == "unix":
        if not parts.path or parts.netloc:
            raise ValueError(f"--store: a unix URL is unix:///absolute/path, not {text!r}")
        return StoreURL(
            "unix",
            path=unquote(parts.path),
            db=_db(query.get("db", "0"), text),
            username=query.get("user"),
            password=query.get("password"),
            prefix=prefix,
        )
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"--store must be memory:, redis://, rediss:// or unix:///path, not {text!r}"
        )
    if not parts.hostname:
        raise ValueError(f"--store: no host in {text!r}")
    try:
        port = parts.port or 6379
    except ValueError as e:
        raise ValueError(f"--store: {e} in {text!r}") from None
    path = parts.path.strip("/")
    if parts.scheme == "redis" and "ca" in query:
        raise ValueError("--store: ca= applies to rediss:// only")
    if "user" in query:
        raise ValueError("--store: a redis:// URL names its user before the host, as user@host")
    return StoreURL(
        "tls" if parts.scheme == "rediss" else "tcp",
        host=parts.hostname,
        port=port,
        db=_db(path or query.get("db", "0"), text),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else query.get("password"),
        ca=query.get("ca"),
        prefix=prefix,
    )


def _db(value: str, text: str) -> int:
    if not value.isdigit():
        raise ValueError(f"--store: the database is a number, not {value!r} in {text!r}")
    return int(value)


def store_endpoint(reactor: Any, url: StoreURL, timeout_seconds: float) -> IStreamClientEndpoint:
    """
    The client endpoint that reaches C{url}.
    """
    timeout = max(1, math.ceil(timeout_seconds))
    if url.transport == "unix":
        return UNIXClientEndpoint(reactor, url.path, timeout=timeout)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if url.transport == "tls":
        if url.ca is None:
            trust = platformTrust()
        else:
            with open(url.ca, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(optionsForClientTLS(url.host, trustRoot=trust), endpoint)
    return endpoint
