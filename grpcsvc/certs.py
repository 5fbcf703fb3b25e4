"""A development PKI for mutual TLS (README, "Security"): one CA, server
certificates for the services' host names, client certificates whose
identity is a principal.  What `vfioctl certs` writes, the compose file's
one-shot job runs, and the tests use.  Not for production: keys are written
unencrypted, and the CA key sits beside the certificates.

A client certificate for principal NAME has the subject CN=NAME and the URI
SAN `spiffe://vfio-mlx5-emu/NAME`; the services take the URI SAN as the
principal, so `--admin-principals` and `--driver-principals` name
`spiffe://vfio-mlx5-emu/NAME`, or NAME for certificates with a CN only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_DOMAIN = "vfio-mlx5-emu"
DEFAULT_DAYS = 365
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY = "ca.pem", "ca.key"  # a DevCa's files in its directory


def spiffe_id(name: str) -> str:
    """The URI SAN (and so the principal) of a client certificate for `name`."""
    return f"spiffe://{SPIFFE_DOMAIN}/{name}"


@dataclass(frozen=True, slots=True)
class Issued:
    """Paths of one certificate and its key."""

    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class DevCa:
    """A CA that issues server and client certificates into a directory."""

    def __init__(self, directory: Path, *, days: int = DEFAULT_DAYS, key_mode: int = 0o600):
        self.dir = directory
        self.days = days
        self.key_mode = key_mode
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = _key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vfio-mlx5-emu dev CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
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
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.dir / CA_CERT
        _write(self.cert_path, self._cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(self.dir / CA_KEY, _key_pem(self._key), self.key_mode)

    @classmethod
    def load(cls, directory: Path, *, days: int = DEFAULT_DAYS, key_mode: int = 0o600) -> DevCa:
        """The CA a DevCa wrote into `directory` before, to issue more
        certificates (OSError, ValueError when its files are missing or not a
        CA's)."""
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ValueError(f"{directory / CA_KEY} is not the key of {directory / CA_CERT}")
        ca = cls.__new__(cls)
        ca.dir, ca.days, ca.key_mode = directory, days, key_mode
        ca._key, ca._cert, ca._name = key, cert, cert.subject
        ca.cert_path = directory / CA_CERT
        return ca

    def _issue(
        self,
        stem: str,
        cn: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> Issued:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        issued = Issued(self.dir / f"{stem}.pem", self.dir / f"{stem}.key")
        _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(issued.key, _key_pem(key), self.key_mode)
        return issued

    def server(self, stem: str, hosts: Iterable[str] = ()) -> Issued:
        """A server certificate valid for `hosts` and this host's loopback names."""
        names = list(dict.fromkeys([*hosts, *LOCAL_NAMES]))
        return self._issue(
            stem, names[0], [_san(n) for n in names], ExtendedKeyUsageOID.SERVER_AUTH
        )

    def client(self, name: str, *, uri: bool = True) -> Issued:
        """A client certificate for principal `name` (with its SPIFFE URI SAN;
        `uri=False`: a CN only, so the principal is `name` itself)."""
        sans: list[x509.GeneralName] = (
            [x509.UniformResourceIdentifier(spiffe_id(name))] if uri else []
        )
        if not sans:
            sans = [x509.DNSName(f"{name}.client.invalid")]
        return self._issue(name, name, sans, ExtendedKeyUsageOID.CLIENT_AUTH)
