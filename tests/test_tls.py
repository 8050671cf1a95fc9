"""
Tests for L{rendezvous_twisted.ops.tls}: certificate loading, and real TLS
listeners on the real reactor, talked to by treq with service-identity
checking the host name, across a certificate reload.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import treq
from OpenSSL import SSL
from twisted.application.service import IService
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, capturedLogs, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import provider

from rendezvous_twisted import tap
from rendezvous_twisted.ops import tls
from rendezvous_twisted.ops.service import HangupReloader, ListenerService

from .certificates import CA, cert_pem, key_pem
from .conftest import on_reactor, reactor_fixture
from .test_tap import descendants

reactor: Any = _reactor


# Loading certificates.


@pytest.fixture
def ca_a() -> CA:
    return CA.make("A")


@pytest.fixture
def ca_b() -> CA:
    return CA.make("B")


def test_load_identity_full_chain(tmp_path: Path, ca_a: CA) -> None:
    """A fullchain.pem gives the leaf and its intermediate; the key is checked to be the leaf's."""
    leaf = ca_a.write_leaf(tmp_path)
    identity = tls.load_identity(
        tls.CertificateFiles(tmp_path / "fullchain.pem", tmp_path / "key.pem")
    )
    assert identity.leaf == leaf
    assert identity.chain == (ca_a.intermediate,)


def test_load_identity_combined_file(tmp_path: Path, ca_a: CA) -> None:
    """One PEM file holding both the key and the chain serves as privateKey and certKey."""
    leaf = ca_a.write_leaf(tmp_path)
    both = tmp_path / "both.pem"
    key, chain = (tmp_path / "key.pem").read_bytes(), (tmp_path / "fullchain.pem").read_bytes()
    both.write_bytes(key + chain)
    identity = tls.load_identity(tls.CertificateFiles(both, both))
    assert identity.leaf == leaf


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        ("missing key", "cannot read"),
        ("garbage key", "exactly one PEM private key"),
        ("corrupt key", "is malformed"),
        ("other key", "does not belong to the certificate"),
        ("no certificate", "holds no PEM certificate"),
        ("encrypted key", "encrypted"),
    ],
)
def test_load_identity_refuses(tmp_path: Path, ca_a: CA, breakage: str, complaint: str) -> None:
    """Unreadable, malformed, encrypted or mismatched files are refused with a clear message."""
    ca_a.write_leaf(tmp_path)
    key = tmp_path / "key.pem"
    if breakage == "missing key":
        key.unlink()
    elif breakage == "garbage key":
        key.write_bytes(b"not a key\n")
    elif breakage == "corrupt key":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    elif breakage == "other key":
        _, other = ca_a.leaf()
        key.write_bytes(key_pem(other))
    elif breakage == "no certificate":
        (tmp_path / "fullchain.pem").write_bytes(b"")
    else:
        _, other = ca_a.leaf()
        key.write_bytes(key_pem(other, password=b"secret"))
    with pytest.raises(tls.CertificateError, match=complaint) as raised:
        tls.load_identity(tls.CertificateFiles(tmp_path / "fullchain.pem", key))
    assert "PRIVATE KEY-----" not in str(raised.value)


def test_options_refuse_tls_that_cannot_serve(tmp_path: Path, ca_a: CA) -> None:
    """
    Half of --tls-cert/--tls-key, unused files, a TLS listener without files
    and bad files are usage errors.
    """
    ca_a.write_leaf(tmp_path)
    cert, key = str(tmp_path / "fullchain.pem"), str(tmp_path / "key.pem")
    for argv, complaint in [
        (["--tls-cert", cert], "go together"),
        (["--tls-cert", cert, "--tls-key", key], "no listener uses them"),
        (["--listen", "ssl:8443"], "needs a certificate"),
        (["--listen", "tls:tcp:8443"], "needs a certificate"),
        (["--listen", f"ssl:8443:privateKey={tmp_path}/nope.pem"], "cannot read"),
        (["--listen", "tls:tcp:8443", "--tls-cert", key, "--tls-key", key], "no PEM certificate"),
    ]:
        with pytest.raises(usage.UsageError, match=complaint):
            tap.Options().parseOptions(argv)


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        ("missing key", "--tls-key: cannot read"),
        ("encrypted key", "--tls-key: "),
        ("missing certificate", "--tls-cert: cannot read"),
        ("key as certificate", "--tls-cert: "),
        ("other key", "--tls-cert and --tls-key: "),
    ],
)
def test_a_bad_tls_file_names_its_option(
    tmp_path: Path, ca_a: CA, breakage: str, named: str
) -> None:
    """A usage error about --tls-key's file names --tls-key, not --tls-cert; a mismatch both."""
    ca_a.write_leaf(tmp_path)
    cert, key = tmp_path / "fullchain.pem", tmp_path / "key.pem"
    if breakage == "missing key":
        key.unlink()
    elif breakage == "encrypted key":
        _, other = ca_a.leaf()
        key.write_bytes(key_pem(other, password=b"secret"))
    elif breakage == "missing certificate":
        cert.unlink()
    elif breakage == "key as certificate":
        cert.write_bytes(key.read_bytes())
    else:
        _, other = ca_a.leaf()
        key.write_bytes(key_pem(other))
    argv = ["--listen", "ssl:8443", "--tls-cert", str(cert), "--tls-key", str(key)]
    with pytest.raises(usage.UsageError) as caught:
        tap.Options().parseOptions(argv)
    assert str(caught.value).startswith(named), str(caught.value)


@pytest.mark.parametrize(
    ("h2_installed", "listen", "said"),
    [(False, "ssl:0", True), (True, "ssl:0", False), (False, "tcp:0", False)],
)
def test_a_tls_server_without_h2_says_http2_is_off(
    tmp_path: Path,
    ca_a: CA,
    monkeypatch: pytest.MonkeyPatch,
    h2_installed: bool,
    listen: str,
    said: bool,
) -> None:
    """Without h2, a server with a TLS listener logs at start that HTTP/2 is off, and the fix."""
    from twisted.internet.testing import MemoryReactorClock

    from rendezvous_twisted.http import wire

    monkeypatch.setattr(wire, "H2_AVAILABLE", h2_installed)
    ca_a.write_leaf(tmp_path)
    argv = ["--listen", listen]
    if listen.startswith("ssl:"):
        argv += [
            "--tls-cert",
            str(tmp_path / "fullchain.pem"),
            "--tls-key",
            str(tmp_path / "key.pem"),
        ]
    options = tap.Options()
    options.parseOptions(argv)
    service = tap.makeService(options, reactor=MemoryReactorClock())
    with capturedLogs() as events:
        service.startService()
    service.stopService()
    lines = [formatEvent(e) for e in events if "HTTP/2 is off" in formatEvent(e)]
    assert len(lines) == (1 if said else 0), lines
    if said:
        assert "pip install 'rendezvous-twisted[http2]'" in lines[0]


# Real listeners.


class Live:
    """
    Certificate files in one place, swapped whole as certbot renews them.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def install(self, ca: CA) -> None:
        staging = self.directory.parent / (self.directory.name + ".new")
        ca.write_leaf(staging)
        for name in ("fullchain.pem", "cert.pem", "chain.pem", "key.pem"):
            os.replace(staging / name, self.directory / name)

    def path(self, name: str) -> str:
        return str(self.directory / name)


@pytest.fixture
def live(tmp_path: Path, ca_a: CA) -> Live:
    files = Live(tmp_path / "live")
    files.directory.mkdir()
    files.install(ca_a)
    return files


def client(ca: CA, persistent: bool = False) -> Any:
    """
    A treq client that trusts only C{ca}'s root and checks the host name
    with service-identity, as a browser does.
    """
    policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(cert_pem(ca.root)))
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.retryAutomatically = False
    return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool)), pool


async def serve(argv: list[str]) -> tuple[IService, int]:
    """
    makeService on the real reactor, started; the port of its one listener.
    """
    options = tap.Options()
    options.parseOptions(argv)
    service = tap.makeService(options, reactor)
    service.startService()
    [listener] = [s for s in descendants(service) if isinstance(s, ListenerService)]
    port = await listener.whenListening()
    assert port is not None
    return service, port.getHost().port  # type: ignore[attr-defined]


async def create(http: Any, port: int, body: bytes = b"hello") -> int:
    response = await http.post(f"https://localhost:{port}/", data=body)
    await response.content()
    code: int = response.code
    return code


async def refused(http: Any, port: int) -> BaseException:
    """
    The error a request ends with when the server's certificate is not trusted.
    """
    try:
        await create(http, port)
    except Exception as e:
        return e
    raise AssertionError("the request succeeded")


def logged(text: str) -> Deferred[LogEvent]:
    """
    Fires with the next log event whose format contains C{text}.
    """
    seen: Deferred[LogEvent] = Deferred()

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if text in formatEvent(event) and not seen.called:
            globalLogPublisher.removeObserver(observe)
            seen.callback(event)

    globalLogPublisher.addObserver(observe)
    return seen


@reactor_fixture
async def started() -> AsyncIterator[list[IService]]:
    """
    Services a test started, stopped after it.
    """
    services: list[IService] = []
    yield services
    for service in services:
        await service.stopService()


@on_reactor
async def test_ssl_listener_serves_the_full_chain_and_reloads_on_sighup(
    live: Live, ca_a: CA, ca_b: CA, started: list[IService]
) -> None:
    """
    An ssl: listener serves certificate A with its chain; after the files are
    replaced and SIGHUP is sent, new connections get certificate B while a
    connection opened before goes on with A.
    """
    service, port = await serve(
        [
            "--listen",
            f"ssl:0:interface=127.0.0.1:privateKey={live.path('key.pem')}"
            f":certKey={live.path('cert.pem')}:extraCertChain={live.path('chain.pem')}",
        ]
    )
    started.append(service)
    old, old_pool = client(ca_a, persistent=True)
    assert await create(old, port) == 200
    assert isinstance(await refused(client(ca_b)[0], port), Exception)

    live.install(ca_b)
    reloaded = logged("TLS certificate reloaded")
    os.kill(os.getpid(), signal.SIGHUP)
    await reloaded

    new, new_pool = client(ca_b)
    assert await create(new, port) == 200
    assert isinstance(await refused(client(ca_a)[0], port), Exception)
    # The pool reuses the connection made under A: were it a new one, A's
    # trust root would refuse B's certificate.
    assert await create(old, port) == 200
    await old_pool.closeCachedConnections()
    await new_pool.closeCachedConnections()


@on_reactor
async def test_tls_prefix_with_tls_options(
    live: Live, ca_a: CA, ca_b: CA, started: list[IService]
) -> None:
    """
    tls:ENDPOINT serves with --tls-cert/--tls-key, and a direct reload
    switches new connections to the new files.
    """
    service, port = await serve(
        [
            "--listen=tls:tcp:0:interface=127.0.0.1",
            f"--tls-cert={live.path('fullchain.pem')}",
            f"--tls-key={live.path('key.pem')}",
        ]
    )
    started.append(service)
    assert await create(client(ca_a)[0], port) == 200
    live.install(ca_b)
    [reloader] = [s for s in descendants(service) if isinstance(s, HangupReloader)]
    reloader._reloadNow()
    assert await create(client(ca_b)[0], port) == 200


@pytest.mark.parametrize("breakage", ["garbage", "mismatch"])
@on_reactor
async def test_broken_reload_keeps_the_old_certificate(
    live: Live, ca_a: CA, ca_b: CA, started: list[IService], breakage: str
) -> None:
    """
    A reload from broken or mismatched files logs an error naming the file
    and the reason, and keeps serving the previous certificate.
    """
    service, port = await serve(
        [
            "--listen",
            f"ssl:0:interface=127.0.0.1:privateKey={live.path('key.pem')}"
            f":certKey={live.path('fullchain.pem')}",
        ]
    )
    started.append(service)
    live.install(ca_b)
    key = Path(live.path("key.pem"))
    if breakage == "garbage":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    else:
        key.write_bytes(key_pem(ca_b.leaf()[1]))
    [reloader] = [s for s in descendants(service) if isinstance(s, HangupReloader)]
    with capturedLogs() as events:
        reloader._reloadNow()
    [failure] = [e for e in events if "TLS reload failed" in e["log_format"]]
    assert failure["log_level"].name == "error"
    assert str(key) in failure["error"]
    assert await create(client(ca_a)[0], port) == 200


def _handshake(port: int, context: ssl.SSLContext) -> tuple[str, str | None, str | None]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as wrapped,
    ):
        cipher = wrapped.cipher()
        assert cipher is not None
        return cipher[0], wrapped.version(), wrapped.selected_alpn_protocol()


@on_reactor
async def test_protocol_versions_and_ciphers(
    live: Live, ca_a: CA, tmp_path: Path, started: list[IService]
) -> None:
    """
    TLS 1.3 and 1.2 with AEAD suites are served; a client limited to TLS 1.1
    or to CBC suites is refused; ALPN offers http/1.1.
    """
    service, port = await serve(
        [
            "--listen",
            f"ssl:0:interface=127.0.0.1:privateKey={live.path('key.pem')}"
            f":certKey={live.path('fullchain.pem')}",
        ]
    )
    started.append(service)
    root = tmp_path / "root.pem"
    root.write_bytes(cert_pem(ca_a.root))

    def context(
        maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED, ciphers: str | None = None
    ) -> ssl.SSLContext:
        made = ssl.create_default_context(cafile=str(root))
        with warnings.catch_warnings():
            # The client's own ssl module frowns at TLS 1.1; offering it is the point.
            warnings.simplefilter("ignore", DeprecationWarning)
            made.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            made.maximum_version = maximum
        if ciphers:
            made.set_ciphers(ciphers)
        made.set_alpn_protocols(["http/1.1"])
        return made

    cipher, version, alpn = await deferToThread(_handshake, port, context())
    assert (version, alpn) == ("TLSv1.3", "http/1.1")
    cipher, version, _ = await deferToThread(_handshake, port, context(ssl.TLSVersion.TLSv1_2))
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    for refusal in (
        context(ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0"),
        context(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384"),
    ):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await deferToThread(_handshake, port, refusal)


def test_context_refuses_old_protocols_by_itself(tmp_path: Path, ca_a: CA) -> None:
    """Our context itself refuses TLS 1.1: an in-memory handshake offering only 1.1 fails."""
    ca_a.write_leaf(tmp_path)
    context = tls.ReloadableContext(
        tls.CertificateFiles(tmp_path / "fullchain.pem", tmp_path / "key.pem")
    )
    server = context.serverConnectionForTLS(None)
    server.set_accept_state()
    old = SSL.Context(SSL.TLS_METHOD)
    old.set_min_proto_version(SSL.TLS1_1_VERSION)
    old.set_max_proto_version(SSL.TLS1_1_VERSION)
    old.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    client_side = SSL.Connection(old, None)
    client_side.set_connect_state()

    def handshake() -> None:
        for _ in range(10):
            for one, other in ((client_side, server), (server, client_side)):
                with contextlib.suppress(SSL.WantReadError):
                    one.do_handshake()
                with contextlib.suppress(SSL.WantReadError):
                    other.bio_write(one.bio_read(65536))

    with pytest.raises(SSL.Error):
        handshake()


def test_reload_of_the_same_files_says_unchanged(tmp_path: Path, ca_a: CA, ca_b: CA) -> None:
    """A reload that finds the same certificate says so, so a renewal that never arrived shows."""
    ca_a.write_leaf(tmp_path)
    context = tls.ReloadableContext(
        tls.CertificateFiles(tmp_path / "fullchain.pem", tmp_path / "key.pem")
    )
    with capturedLogs() as events:
        assert context.reload()
    assert any("certificate is unchanged" in formatEvent(e) for e in events)
    ca_b.write_leaf(tmp_path)
    with capturedLogs() as events:
        assert context.reload()
    assert any("TLS certificate reloaded" in formatEvent(e) for e in events)
    assert context.reloads == {"success": 2, "failure": 0}


def test_sighup_without_tls_does_not_kill_the_server(tmp_path: Path) -> None:
    """SIGHUP (systemctl reload) on a server without TLS is logged and changes nothing."""
    from .test_end_to_end import CLEAN_EXIT, Conn, start_plugin_server

    process = start_plugin_server(tmp_path)
    try:
        process.send_signal(signal.SIGHUP)
        process.signalled = False  # SIGHUP is not the stop
        process.wait_for(re.compile(rb"nothing to reload: no TLS listener"), 5)
        with Conn(process.port) as conn:
            assert conn.exchange("POST", "/", body=b"still here").status == 200
    finally:
        code = process.stop()
    assert code in CLEAN_EXIT, process.text()


def test_plain_http_on_a_tls_listener_is_told_to_use_https(tmp_path: Path, ca_a: CA) -> None:
    """
    A plain HTTP request sent to a TLS listener gets a plain JSON 400 saying to use https://
    (not a TLS failure, which clients show as an empty reply), and TLS goes on being served.
    """
    from .test_end_to_end import HOST, running, start_tls_server

    process = start_tls_server(tmp_path, ca_a)
    for _ in running(process):
        with socket.create_connection((HOST, process.port), timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := plain.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert b"\r\nContent-Type: application/json\r\n" in head
        assert b"use an https:// URL" in body
        context = ssl.create_default_context(cadata=cert_pem(ca_a.root).decode("ascii"))
        raw = socket.create_connection((HOST, process.port), timeout=5)
        with context.wrap_socket(raw, server_hostname="localhost") as secure:
            secure.sendall(b"OPTIONS / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert secure.recv(65536).startswith(b"HTTP/1.1 204 ")
