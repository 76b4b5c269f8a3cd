"""The TLS context of the MSSanté connector: the configured CA only, TLS >= 1.2, names checked.

Also hosts ``TestPki`` (a CA named like IGC-Santé's, a server certificate for 127.0.0.1 and
localhost) used by the SMTP and IMAP tests of this connector.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connectors.mssante.tlsconfig import client_context


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class TestPki:
    __test__ = False
    ca_file: str
    cert_file: str
    key_file: str

    def server_context(self, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        if maximum is not None:
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = maximum
        return context


def make_pki(directory: Path, ca_cn: str = "ACR-EL TEST", host_names=("localhost",)) -> TestPki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_cn))
        .issuer_name(_name(ca_cn))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in host_names] + [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host_names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TestPki(str(ca_file), str(cert_file), str(key_file))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=host
        )
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_a_ca_bundle_is_required() -> None:
    with pytest.raises(ValueError, match="CA bundle"):
        client_context("")


def test_the_context_trusts_the_bundle_only_and_wants_tls_1_2(pki: TestPki) -> None:
    context = client_context(pki.ca_file)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    # Only the configured CA: nothing from the system store.
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "ACR-EL TEST"),),)]


async def test_a_server_under_the_configured_ca_is_accepted(pki: TestPki) -> None:
    await _handshake(pki.server_context(), client_context(pki.ca_file), "localhost")


async def test_a_server_under_another_ca_is_refused(pki: TestPki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ca_cn="Some public CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(other.server_context(), client_context(pki.ca_file), "localhost")


async def test_a_wrong_host_name_is_refused(pki: TestPki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(pki.server_context(), client_context(pki.ca_file), "mail.example.org")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_1_1_is_refused(pki: TestPki) -> None:
    server = pki.server_context(maximum=ssl.TLSVersion.TLSv1_1)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(server, client_context(pki.ca_file), "localhost")
