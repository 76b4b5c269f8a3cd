"""A throw-away certificate authority for local test and demo servers.

Names mimic the IGC-Santé chain that secure health mail trusts (root "ACR-EL TEST", intermediate
"ACI-EL-ORG TEST"), so a client that must trust one configured CA bundle only, never the system
store, is exercised the way it will be in production. Keys are RSA 2048 (fast to make, accepted
everywhere); certificates live a day, which is plenty for a test run or a demo.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.private_files import write_private

__all__ = ["ServerCertificate", "TestCA"]

ROOT_NAME = "ACR-EL TEST"
INTERMEDIATE_NAME = "ACI-EL-ORG TEST"
_ORG = "EIMIS bridge test PKI"
_LIFETIME = dt.timedelta(days=1)


@dataclass(frozen=True)
class ServerCertificate:
    """Paths of a server's PEM files: key (private), chain (leaf then intermediate)."""

    key_file: Path
    chain_file: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestCA:
    """A root and an intermediate CA in memory; ``ca_file`` (the root, PEM) written to
    ``directory``.

    Private keys never leave memory except a server's own key, written with mode 0600 in a
    private directory (``directory``/private).
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        self._root_key = _key()
        root_name = _name(ROOT_NAME)
        self.root = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(self._root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._root_key.public_key()),
                critical=False,
            )
            .sign(self._root_key, hashes.SHA256())
        )
        self._intermediate_key = _key()
        self.intermediate = (
            x509.CertificateBuilder()
            .subject_name(_name(INTERMEDIATE_NAME))
            .issuer_name(root_name)
            .public_key(self._intermediate_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._intermediate_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._root_key.public_key()),
                critical=False,
            )
            .sign(self._root_key, hashes.SHA256())
        )
        self.ca_file = self.directory / "ca.pem"
        self.ca_file.write_bytes(_pem(self.root))

    def issue_server(
        self, name: str, dns_names: Sequence[str], ip_addresses: Sequence[str] = ("127.0.0.1",)
    ) -> ServerCertificate:
        """A server certificate for ``dns_names`` (+ IP SANs), signed by the intermediate."""
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        key = _key()
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(dns_names[0] if dns_names else name))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._intermediate_key.public_key()
                ),
                critical=False,
            )
            .sign(self._intermediate_key, hashes.SHA256())
        )
        key_file = self.directory / "private" / f"{name}.key"
        write_private(key_file, _key_pem(key).decode("ascii"))
        chain_file = self.directory / f"{name}.chain.pem"
        chain_file.write_bytes(_pem(cert) + _pem(self.intermediate))
        return ServerCertificate(key_file=key_file, chain_file=chain_file)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
