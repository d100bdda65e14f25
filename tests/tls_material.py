"""TLS material for tests, made with ``cryptography``: a CA, a client certificate and a server
certificate it signed, their private keys (the client's encrypted when a password is given),
and a key that belongs to neither, as PEM files."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA's certificate
    cert: Path  # the client's certificate
    key: Path  # the client's private key (PKCS#8, encrypted with ``password`` if any)
    password: str | None
    server_cert: Path  # a server certificate for ``host`` (CN and SAN)
    server_key: Path  # its private key, unencrypted
    other_key: Path  # a key that belongs to no certificate here (unencrypted)
    host: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def write_tls_material(
    directory: Path, *, password: str | None, host: str = "localhost"
) -> TlsFiles:
    """A fresh CA with a client and a server certificate (for ``host``), in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("cancel-worker test CA"))
        .issuer_name(_name("cancel-worker test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        common_name: str, usage: x509.ObjectIdentifier
    ) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), key

    files = TlsFiles(
        ca=directory / "ca.pem",
        cert=directory / "client.pem",
        key=directory / "client-key.pem",
        password=password,
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        other_key=directory / "other-key.pem",
        host=host,
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    client_pem, client_key = issue("cancel-worker", ExtendedKeyUsageOID.CLIENT_AUTH)
    files.cert.write_bytes(client_pem)
    files.key.write_bytes(_pem_key(client_key, password))
    server_pem, server_key = issue(host, ExtendedKeyUsageOID.SERVER_AUTH)
    files.server_cert.write_bytes(server_pem)
    files.server_key.write_bytes(_pem_key(server_key))
    files.other_key.write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
    return files
