"""The ``settings`` block of an MSSanté connector (pydantic), and what derives from it."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from connectors.mssante.tlsconfig import ServerSettings

TlsMode = Literal["starttls", "implicit"]
_HOSTPORT = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
_ADDRESS = re.compile(r"^[A-Za-z0-9._%\-]+@[A-Za-z0-9.\-]+\.[A-Za-z0-9\-]+$")
_DOMAIN = re.compile(r"^[A-Za-z0-9.\-]+$")
_FOLDER = re.compile(r"^[A-Za-z0-9._/\-]{1,100}$")


def split_hostport(value: str) -> tuple[str, int]:
    match = _HOSTPORT.match(value.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError("must be 'host:port'")
    return match["host"].strip("[]"), int(match["port"])


class MssanteSettings(BaseModel):
    """Where the operator is, which mailbox the bridge uses, and what mail it lets in."""

    model_config = ConfigDict(extra="forbid")

    smtp: str
    """SMTP submission server, ``host:port``."""
    imap: str
    """IMAP server, ``host:port``."""
    smtp_tls: TlsMode = "starttls"
    imap_tls: TlsMode = "starttls"
    ca_file: str = Field(min_length=1)
    """The CA bundle (PEM) trusted for the operator's servers; the system store is never used."""
    client_cert: str | None = None
    """An applicative mailbox's client certificate (PEM), with ``client_key``."""
    client_key: str | None = None
    mailbox: str
    """The bridge's own mailbox address (mail is sent from and read in it)."""
    token_url: str
    """Pro Santé Connect proxy (or stand-in): ``POST {"idnps"}`` -> ``{"access_token"}``."""
    token_idnps: str = Field(min_length=1)
    """The identity whose token opens ``mailbox``."""
    reply_domain: str | None = None
    """Domain of the per-portal reply addresses ``<local>+<token>@<reply_domain>`` (default:
    the mailbox's domain)."""
    reply_local: str | None = None
    """Local part of those addresses (default: the mailbox's local part)."""
    trusted_domains: list[str] = Field(min_length=1)
    """Operator domains of the MSSanté trust space: mail from any other never enters a portal."""
    after_delivery: str = "expunge"
    """``expunge`` or ``move:<folder>``: what becomes of a processed mail."""
    x_mss_nil: str = ""
    """The ``X-MSS-NIL`` header's value, on every mail sent."""
    request_mdn: bool = False
    """Ask for a read receipt (``Disposition-Notification-To``) on every mail sent."""
    poll_interval_s: float = Field(default=30.0, gt=0)
    """Longest wait between two looks at the mailbox (IDLE returns earlier on new mail)."""
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("smtp", "imap")
    @classmethod
    def _hostport(cls, value: str) -> str:
        split_hostport(value)
        return value.strip()

    @field_validator("mailbox")
    @classmethod
    def _mailbox(cls, value: str) -> str:
        if not _ADDRESS.match(value.strip()):
            raise ValueError("must be a mail address")
        return value.strip().lower()

    @field_validator("trusted_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        out = [d.strip().lower().rstrip(".") for d in value]
        if any(not d or not _DOMAIN.match(d) for d in out):
            raise ValueError("each trusted domain is a domain name")
        return out

    @field_validator("after_delivery")
    @classmethod
    def _after(cls, value: str) -> str:
        if value == "expunge":
            return value
        kind, _, folder = value.partition(":")
        if kind != "move" or not _FOLDER.match(folder):
            raise ValueError("must be 'expunge' or 'move:<folder>'")
        return value

    @model_validator(mode="after")
    def _reply(self) -> MssanteSettings:
        if self.reply_domain is not None and not _DOMAIN.match(self.reply_domain):
            raise ValueError("reply_domain must be a domain name")
        if self.reply_local is not None and not re.fullmatch(r"[A-Za-z0-9._\-]+", self.reply_local):
            raise ValueError("reply_local must be a plain local part (no '+')")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self

    # Derived ------------------------------------------------------------------------------------

    @property
    def move_folder(self) -> str | None:
        return self.after_delivery.partition(":")[2] if self.after_delivery != "expunge" else None

    @property
    def reply_parts(self) -> tuple[str, str]:
        """(local part, domain) of the per-portal reply addresses."""
        local, _, domain = self.mailbox.rpartition("@")
        return (self.reply_local or local).lower(), (self.reply_domain or domain).lower()

    def reply_address(self, token: str) -> str:
        local, domain = self.reply_parts
        return f"{local}+{token}@{domain}"

    def server(self, which: Literal["smtp", "imap"]) -> ServerSettings:
        host, port = split_hostport(self.smtp if which == "smtp" else self.imap)
        return ServerSettings(
            host=host,
            port=port,
            tls=self.smtp_tls if which == "smtp" else self.imap_tls,
            ca_file=self.ca_file,
            client_cert=self.client_cert,
            client_key=self.client_key,
            timeout_s=self.timeout_s,
        )
