"""Throwaway PKI for the TLS tests: a CA, a certificate it signs for servers and clients alike (as a
cluster shares one), and a second, unrelated CA with a certificate of its own. EC P-256 keys, one
day of validity; written as PEM files, the key unencrypted (as a mounted secret holds it)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "baton-grpc"
"""A DNS name the shared certificate carries besides localhost and 127.0.0.1 (BATON_GRPC_TLS_SERVER_NAME)."""


@dataclass(frozen=True)
class Pki:
    """PEM files: `ca` signed `cert` (with `key`); `other_ca` signed `other_cert` (with `other_key`)."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    other_cert: Path
    other_key: Path


def write_pki(directory: Path) -> Pki:
    """Generate both CAs and their certificates into `directory`."""
    ca_key, ca_cert = _ca("Baton test CA")
    other_ca_key, other_ca_cert = _ca("Someone else's CA")
    key, cert = _leaf(ca_key, ca_cert)
    other_key, other_cert = _leaf(other_ca_key, other_ca_cert)
    files = {
        "ca.crt": _pem(ca_cert),
        "tls.crt": _pem(cert),
        "tls.key": _key_pem(key),
        "other-ca.crt": _pem(other_ca_cert),
        "other.crt": _pem(other_cert),
        "other.key": _key_pem(other_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    names = ["ca.crt", "tls.crt", "tls.key", "other-ca.crt", "other.crt", "other.key"]
    return Pki(*(directory / name for name in names))


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _builder(name, name, key.public_key())
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    return key, builder.add_extension(usage, critical=True).sign(key, hashes.SHA256())


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for server and client authentication alike, naming localhost, 127.0.0.1 and
    SERVER_NAME."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    builder = _builder(subject, ca_cert.subject, key.public_key())
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    names = [x509.DNSName(SERVER_NAME), x509.DNSName("localhost"), loopback]
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
