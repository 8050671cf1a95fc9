"""
Native TLS: our own pyOpenSSL context, reloadable without a restart, and the
listeners that serve on it.

Twisted's stock C{ssl:} endpoint builds its context through
L{twisted.internet.ssl.CertificateOptions}, which calls pyOpenSSL APIs that
current pyOpenSSL deprecates, and it cannot swap a certificate in place.
Here a L{ReloadableContext} holds one C{SSL.Context} at a time: every new
connection is made from the current one, a connection already open keeps the
context it was made with, and L{ReloadableContext.reload} builds a new
context from the files and swaps it in only if the files are sound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from rendezvous_twisted.http.answers import closing_answer
from rendezvous_twisted.http.clients import peer_host

#: TLS 1.2 suites: forward secret (ECDHE) and AEAD only.  TLS 1.3 suites are
#: all AEAD and configured apart (OpenSSL's defaults are right).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?\r?\n-----END \1-----", re.DOTALL)


def h2_available() -> bool:
    """
    Whether HTTP/2 can be served: Twisted switches a TLS connection to HTTP/2
    when ALPN picked "h2", but only if the C{h2} package is importable (the
    C{http2} extra).
    """
    from twisted.web import http

    return bool(getattr(http, "H2_ENABLED", False))


class CertificateError(ValueError):
    """
    A certificate, chain or key file is missing, unreadable, malformed, or
    the key does not belong to the certificate.  The message says which file
    and why, and never contains key material.
    """


@dataclass(frozen=True)
class CertificateFiles:
    """
    Where one TLS identity lives: the certificate (the leaf, optionally
    followed by its chain, as Let's Encrypt's C{fullchain.pem}), the private
    key, and optionally a separate file of further chain certificates.
    """

    certificate: Path
    private_key: Path
    extra_chain: Path | None = None

    def describe(self) -> str:
        return f"certificate {self.certificate}, key {self.private_key}" + (
            f", chain {self.extra_chain}" if self.extra_chain else ""
        )


@dataclass(frozen=True)
class LoadedIdentity:
    """
    A certificate chain and its key, parsed and checked to belong together.
    """

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: Any


def _pem_blocks(path: Path, data: bytes, kinds: tuple[bytes, ...]) -> list[bytes]:
    return [m.group(0) for m in _PEM_BLOCK.finditer(data) if m.group(1) in kinds]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CertificateError(f"cannot read {path}: {e.strerror or e}") from e


def _certificates(path: Path) -> list[x509.Certificate]:
    blocks = _pem_blocks(path, _read(path), (b"CERTIFICATE",))
    if not blocks:
        raise CertificateError(f"{path} holds no PEM certificate")
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise CertificateError(f"certificate {number} in {path} is malformed: {e}") from e
    return certificates


def _private_key(path: Path) -> Any:
    kinds = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY")
    blocks = _pem_blocks(path, _read(path), kinds)
    if len(blocks) != 1:
        raise CertificateError(f"{path} must hold exactly one PEM private key, not {len(blocks)}")
    if b"ENCRYPTED" in blocks[0].split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in blocks[0]:
        raise CertificateError(f"{path} holds an encrypted private key; the server needs it plain")
    try:
        key = serialization.load_pem_private_key(blocks[0], password=None)
    except (ValueError, TypeError) as e:
        # Never the exception text alone: make sure no key bytes are echoed.
        raise CertificateError(f"the private key in {path} is malformed") from e
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise CertificateError(f"the private key in {path} is of an unsupported kind")
    return key


def load_identity(files: CertificateFiles) -> LoadedIdentity:
    """
    Read and check a TLS identity.  Raises L{CertificateError} when a file is
    unreadable or malformed, or the key is not the certificate's.
    """
    certificates = _certificates(files.certificate)
    if files.extra_chain is not None:
        certificates += _certificates(files.extra_chain)
    key = _private_key(files.private_key)
    leaf = certificates[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise CertificateError(
            f"the private key in {files.private_key} does not belong to the certificate "
            f"in {files.certificate}"
        )
    return LoadedIdentity(leaf, tuple(certificates[1:]), key)


def build_context(identity: LoadedIdentity, alpn: tuple[bytes, ...]) -> SSL.Context:
    """
    A server context: TLS 1.2 or newer, forward-secret AEAD suites only, the
    whole chain sent, no compression or renegotiation, and ALPN answering
    with the first of C{alpn} that the client offers.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
    )
    context.set_cipher_list(CIPHERS)
    context.use_certificate(identity.leaf)
    for certificate in identity.chain:
        context.add_extra_chain_cert(certificate)
    context.use_privatekey(identity.key)
    # OpenSSL's own check, on top of ours: it raises if they do not match.
    context.check_privatekey()
    # Sessions are resumed only by the context that made them: fine, since a
    # reload is rare and a full handshake after it costs one round trip.
    context.set_session_id(b"rendezvous-twisted")
    if alpn:

        def select(connection: SSL.Connection, offered: list[bytes]) -> bytes:
            for protocol in alpn:
                if protocol in offered:
                    return protocol
            # No protocol in common: carry on without ALPN, as HTTP/1.1.
            return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

        context.set_alpn_select_callback(select)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableContext:
    """
    The TLS context of one identity (certificate files), shared by every
    listener that serves it, and reloadable in place.

    Construction loads the files and raises L{CertificateError} if they are
    not sound: a server must not start without its certificate.
    """

    log = Logger()

    def __init__(self, files: CertificateFiles, alpn: tuple[bytes, ...] | None = None) -> None:
        self.files = files
        if alpn is None:
            alpn = (b"h2", b"http/1.1") if h2_available() else (b"http/1.1",)
        self.alpn = alpn
        #: How many reloads succeeded and failed, for metrics.
        self.reloads = {"success": 0, "failure": 0}
        identity = load_identity(files)
        self._context = build_context(identity, alpn)
        self.leaf = identity.leaf
        self._log_identity("TLS certificate loaded")

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N803
        """
        A connection from the current context; it keeps that context for its
        whole life, whatever reloads come later.
        """
        return SSL.Connection(self._context, None)

    def reload(self) -> bool:
        """
        Read the files again and serve new connections with them.  On any
        problem, log it as an error and keep serving the old certificate.
        Returns whether the new files are now in service.
        """
        try:
            identity = load_identity(self.files)
            context = build_context(identity, self.alpn)
        except (CertificateError, SSL.Error) as e:
            self.reloads["failure"] += 1
            self.log.error(
                "TLS reload failed, still serving the previous certificate "
                "(serial {serial:x}): {error}",
                serial=self.leaf.serial_number,
                error=str(e),
            )
            return False
        unchanged = identity.leaf == self.leaf
        self._context = context
        self.leaf = identity.leaf
        self.reloads["success"] += 1
        # Say so when the files hold the same certificate: a renewal that
        # did not reach us (stale copies) must not look like one that did.
        self._log_identity(
            "TLS files re-read; the certificate is unchanged"
            if unchanged
            else "TLS certificate reloaded"
        )
        return True

    def _log_identity(self, what: str) -> None:
        self.log.info(
            "{what}: {files}; subject {subject}, serial {serial:x}, valid until {not_after}",
            what=what,
            files=self.files.describe(),
            subject=self.leaf.subject.rfc4514_string(),
            serial=self.leaf.serial_number,
            not_after=self.leaf.not_valid_after_utc.isoformat(),
        )


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    Any stream server endpoint (TCP, UNIX, an inherited systemd socket), with
    TLS on our L{ReloadableContext} in front of the factory it serves.
    """

    def __init__(self, inner: IStreamServerEndpoint, context: ReloadableContext) -> None:
        self.inner = inner
        self.context = context

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        wrapped = _TLSFactory(self.context, False, protocolFactory)
        listening: Deferred[IListeningPort] = self.inner.listen(wrapped)
        return listening


class _TLSOrPlain(TLSMemoryBIOProtocol):
    """
    Twisted's TLS protocol, unless a connection's first byte shows plain
    HTTP (a method's first letter, where TLS starts with a handshake
    record): that client gets a JSON 400 in plain HTTP saying to use
    https://, as nginx does, rather than a TLS failure it would see as an
    empty reply.
    """

    _log = Logger()
    _decided = False

    def dataReceived(self, data: bytes) -> None:
        if not self._decided:
            self._decided = True
            if data[:1].isalpha():
                transport = self.transport
                assert transport is not None
                self._log.info(
                    "answering plain HTTP on a TLS listener from {client} with 400",
                    client=peer_host(transport.getPeer()) or "-",
                )
                transport.write(
                    closing_answer(
                        400, "M_BAD_REQUEST", "this port speaks HTTPS: use an https:// URL"
                    )
                )
                transport.loseConnection()
                return
        super().dataReceived(data)  # type: ignore[no-untyped-call]


class _TLSFactory(TLSMemoryBIOFactory):
    protocol = _TLSOrPlain


class ContextRegistry:
    """
    One L{ReloadableContext} per set of certificate files, so that listeners
    sharing files share a context and one SIGHUP reloads each file set once.
    """

    _log = Logger()

    def __init__(self) -> None:
        self._contexts: dict[CertificateFiles, ReloadableContext] = {}

    def context(self, files: CertificateFiles) -> ReloadableContext:
        """
        The context for C{files}, loading them the first time.
        """
        context = self._contexts.get(files)
        if context is None:
            context = self._contexts[files] = ReloadableContext(files)
        return context

    @property
    def contexts(self) -> list[ReloadableContext]:
        return list(self._contexts.values())

    def reload(self) -> bool:
        """
        Reload every context; True if all of them took their new files.
        """
        if not self._contexts:
            self._log.info("nothing to reload: no TLS listener")
            return True
        results = [context.reload() for context in self._contexts.values()]
        return all(results)
