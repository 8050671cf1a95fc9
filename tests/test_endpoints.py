"""
Tests for L{rendezvous_twisted.ops.endpoints}: the one parser of the
C{--listen} and C{--metrics} descriptions, and the L{Listener} the start
listens on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from rendezvous_twisted import tap
from rendezvous_twisted.ops import endpoints, tls
from rendezvous_twisted.ops.service import ListenerService

from .certificates import CA
from .test_tap import descendants

# Descriptions.


@pytest.mark.parametrize(
    ("description", "args", "kwargs"),
    [
        ("ssl:443", ["ssl", "443"], {}),
        (
            r"ssl:port=8443:interface=\:\::privateKey=/k\:ey.pem",
            ["ssl"],
            {"port": "8443", "interface": "::", "privateKey": "/k:ey.pem"},
        ),
        ("tcp:80:interface=a=b", ["tcp", "80"], {"interface": "a=b"}),
    ],
)
def test_split_description(description: str, args: list[str], kwargs: dict[str, str]) -> None:
    """Descriptions split on unescaped colons, with backslash escapes and name=value keywords."""
    assert endpoints.split_description(description) == (args, kwargs)


def test_parse_ssl_honours_every_keyword() -> None:
    """An ssl: description gives its port, interface, backlog, key, certificate and chain."""
    parsed = endpoints.parse_ssl(
        "ssl:8443:interface=127.0.0.1:backlog=9:privateKey=k.pem:certKey=c.pem:extraCertChain=x.pem"
    )
    assert parsed == endpoints.SSLListen(
        8443, "127.0.0.1", 9, tls.CertificateFiles(Path("c.pem"), Path("k.pem"), Path("x.pem"))
    )


def test_parse_ssl_certificate_defaults_to_the_key_file() -> None:
    """As in Twisted, certKey defaults to the privateKey file; the backlog to 50, all interfaces."""
    parsed = endpoints.parse_ssl("ssl:port=443:privateKey=both.pem")
    assert parsed == endpoints.SSLListen(
        443, "", 50, tls.CertificateFiles(Path("both.pem"), Path("both.pem"))
    )


@pytest.mark.parametrize(
    ("description", "complaint"),
    [
        ("ssl:443:privateKey=k:sslmethod=TLSv1_METHOD", "unsupported sslmethod"),
        ("ssl:443:privateKey=k:dhParameters=dh.pem", "unsupported dhParameters"),
        ("ssl:privateKey=k", "exactly one port"),
        ("ssl:http:privateKey=k", "numbers"),
        ("ssl:99999:privateKey=k", "out of range"),
        ("ssl:443:certKey=c.pem", "need privateKey"),
        ("ssl:443:privateKey=a:privateKey=b", "repeats"),
    ],
)
def test_parse_ssl_refuses(description: str, complaint: str) -> None:
    """A malformed ssl: description, or one asking for what we do not honour, is refused by name."""
    with pytest.raises(ValueError, match=complaint):
        endpoints.parse_ssl(description)


# Listeners.


@pytest.mark.parametrize(
    ("description", "scheme", "address"),
    [
        ("tcp:9000:interface=127.0.0.1", "http", (4, 9000, "127.0.0.1")),
        ("tcp6:9000", "http", (6, 9000, "")),
        (r"ssl:8443:interface=\:\::privateKey=k.pem", "https", (6, 8443, "")),
        ("ssl:port=8443:privateKey=k.pem", "https", (4, 8443, "")),
        ("tls:tcp:8443:interface=0.0.0.0", "https", (4, 8443, "")),
        ("tcp:0", "http", None),
        ("unix:/tmp/rendezvous-endpoints-test.sock", "http", None),
        ("tls:systemd:domain=INET:name=https", "https", None),
    ],
)
def test_parse_gives_the_scheme_and_address(
    description: str, scheme: str, address: tuple[int, int, str] | None
) -> None:
    """A parsed description knows whether it serves TLS and which TCP address it takes."""
    listener = endpoints.parse(description, "--listen X")
    assert (listener.scheme, listener.address, listener.label) == (scheme, address, "--listen X")


def test_serving_gives_a_tls_listener_its_files() -> None:
    """ssl: keeps its own privateKey= files; tls: takes the default; plain needs none."""
    default = tls.CertificateFiles(Path("d.pem"), Path("dk.pem"))
    own = endpoints.serving(endpoints.parse("ssl:8443:privateKey=k.pem"), default)
    assert own.files == tls.CertificateFiles(Path("k.pem"), Path("k.pem"))
    wrapped = endpoints.serving(endpoints.parse("tls:tcp:8443"), default)
    assert wrapped.files == default
    assert endpoints.serving(endpoints.parse("tcp:8080"), default).files is None
    with pytest.raises(endpoints.EndpointError) as caught:
        endpoints.serving(endpoints.parse("tls:tcp:8443"), None)
    assert caught.value.needs_certificate


@pytest.mark.parametrize("metrics", ["tls:tcp:9100", "ssl:9100"])
def test_a_tls_metrics_listener_serves_the_tls_options_files(tmp_path: Path, metrics: str) -> None:
    """--metrics on tls: or ssl: without privateKey= serves --tls-cert and --tls-key files."""
    CA.make("metrics").write_leaf(tmp_path)
    options = tap.Options()
    options.parseOptions(
        [
            *("--listen", "ssl:8443", "--metrics", metrics),
            *("--tls-cert", str(tmp_path / "fullchain.pem")),
            *("--tls-key", str(tmp_path / "key.pem")),
        ]
    )
    service = tap.makeService(options, MemoryReactorClock(), {})
    listeners: list[Any] = [s for s in descendants(service) if isinstance(s, ListenerService)]
    assert [(s.label, s.scheme) for s in listeners] == [
        ("--listen ssl:8443", "https"),
        (f"--metrics {metrics}", "https"),
    ]
    assert listeners[1].endpoint.context.files == options["tls-default"]
