"""
Real X.509 certificates for the TLS tests, made with C{cryptography}: a CA,
and leaves it signs for "localhost" and 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    """
    C{key} in PEM (PKCS #8), encrypted with C{password} if one is given.
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password is not None
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass
class CA:
    """
    A certificate authority: a root, and an intermediate that signs leaves,
    so that serving the whole chain matters.
    """

    name: str
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls, name: str) -> CA:
        root_key = _key()
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])
        root = _sign(root_name, root_name, root_key.public_key(), root_key, ca=True)
        intermediate_key = _key()
        intermediate_name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"{name} intermediate")]
        )
        intermediate = _sign(
            intermediate_name, root_name, intermediate_key.public_key(), root_key, ca=True
        )
        return cls(name, root, root_key, intermediate, intermediate_key)

    def leaf(self, host: str = "localhost") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """
        A server certificate for C{host} and 127.0.0.1, and its key.
        """
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
        certificate = _sign(
            subject,
            self.intermediate.subject,
            key.public_key(),
            self.intermediate_key,
            ca=False,
            names=[x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )
        return certificate, key

    def write_leaf(self, directory: Path, host: str = "localhost") -> x509.Certificate:
        """
        Write C{fullchain.pem} (leaf and intermediate), C{cert.pem} (leaf
        alone), C{chain.pem} (intermediate alone) and C{key.pem} in
        C{directory}, as certbot lays them out; return the leaf.
        """
        certificate, key = self.leaf(host)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cert.pem").write_bytes(cert_pem(certificate))
        (directory / "chain.pem").write_bytes(cert_pem(self.intermediate))
        (directory / "fullchain.pem").write_bytes(
            cert_pem(certificate) + cert_pem(self.intermediate)
        )
        (directory / "key.pem").write_bytes(key_pem(key))
        return certificate


def _sign(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(days=1))
        .not_valid_after(_NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(x509.SubjectAlternativeName(names or []), critical=False)
    if subject != issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())
