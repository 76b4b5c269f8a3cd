"""The TLS context for the operator's SMTP and IMAP servers.

MSSanté trusts IGC-Santé alone, whose roots are not in the system store: the context trusts the
configured CA bundle ONLY (``load_default_certs`` is never called), checks the host name, and
refuses anything below TLS 1.2. A client certificate (applicative mailbox) may be added.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal

TlsMode = Literal["starttls", "implicit"]


@dataclass(frozen=True)
class ServerSettings:
    """Where one operator service is and how it is reached."""

    host: str
    port: int
    tls: TlsMode = "starttls"
    ca_file: str = ""
    """Path to the CA bundle (PEM) trusted for this server; required."""
    client_cert: str | None = None
    client_key: str | None = None
    timeout_s: float = 30.0


def client_context(
    ca_file: str, client_cert: str | None = None, client_key: str | None = None
) -> ssl.SSLContext:
    """A client context trusting ``ca_file`` only, TLS >= 1.2, host name checked."""
    if not ca_file:
        raise ValueError("a CA bundle path is required (the system store is never used)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=ca_file)
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context
