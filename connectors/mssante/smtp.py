"""Sending mail to the operator, through ``aiosmtplib`` (a maintained asyncio SMTP client).

One ``SmtpSender.send`` opens a connection (STARTTLS or implicit TLS per ``ServerSettings``,
the TLS context of ``tlsconfig``: CA bundle only, TLS >= 1.2), says EHLO, reads ``SIZE`` and
refuses a larger message before authenticating or sending (``TooLarge``), authenticates by XOAUTH2
WITHOUT initial response (``AUTH XOAUTH2``, then the credentials after the server's empty 334;
an error 334 is answered with an empty line, see ``xoauth2``), and sends with DSN parameters
(``RET=HDRS``, ``ENVID``, ``NOTIFY=SUCCESS,FAILURE,DELAY``) when the server offers DSN. A refused
token is forgotten and a fresh one tried once, on a new connection; a second refusal raises
``TokenRefused`` (the connector reports "credentials rejected"). aiosmtplib's own ``auth_xoauth2``
is not used: it sends the token as an initial response.

Each ``send`` uses its own connection (simple and robust to the server closing idle sessions);
a sender may be shared by tasks, the connections being independent.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings

from connectors.mssante.mime import OUTGOING_POLICY
from connectors.mssante.tlsconfig import ServerSettings, client_context
from connectors.mssante.tokens import CachedToken, Token, TokenError
from connectors.mssante.xoauth2 import ErrorChallenge, Exchange

DSN_NOTIFY = "SUCCESS,FAILURE,DELAY"


class SmtpError(Exception):
    """Sending failed; ``str()`` is a sentence without content or credential."""


class Unreachable(SmtpError):
    """The server could not be reached or the connection broke (try later)."""


class TokenRefused(SmtpError):
    """The server refused the access token, twice (the second one freshly issued)."""

    def __init__(self, message: str, challenge: ErrorChallenge | None = None) -> None:
        super().__init__(message)
        self.challenge = challenge


class TooLarge(SmtpError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the message is {size} bytes, over the server's SIZE of {limit}")
        self.size = size
        self.limit = limit


class SendRefused(SmtpError):
    """The server refused the sender, every recipient, or the data."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SendResult:
    envid: str | None
    dsn_requested: bool
    """False when the server does not offer the DSN extension (no receipt will come)."""
    size_limit: int | None
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Recipients the server refused while accepting others: address -> (code, text)."""


def xtext(value: str) -> str:
    """RFC 3461 xtext: printable ASCII except ``+`` and ``=``, the rest as ``+HH``."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
        for c in value.encode("utf-8").decode("latin-1")
    )


class SmtpSender:
    def __init__(
        self,
        settings: ServerSettings,
        mailbox: str,
        tokens: CachedToken,
        *,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.mailbox = mailbox
        self.tokens = tokens
        self.local_hostname = local_hostname
        self._tls = tls_context or client_context(
            settings.ca_file, settings.client_cert, settings.client_key
        )
        self.size_limit: int | None = None
        """The last SIZE the server announced (None: no limit announced, or not yet seen)."""

    def _client(self) -> aiosmtplib.SMTP:
        implicit = self.settings.tls == "implicit"
        return aiosmtplib.SMTP(
            hostname=self.settings.host,
            port=self.settings.port,
            use_tls=implicit,
            start_tls=not implicit,  # STARTTLS required: never send credentials in clear
            tls_context=self._tls,
            timeout=self.settings.timeout_s,
            local_hostname=self.local_hostname,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = self._client()
        try:
            await client.connect()
            if client.last_ehlo_response is None:
                # After STARTTLS aiosmtplib says EHLO lazily; SIZE and AUTH need it now.
                await client.ehlo()
        except ssl.SSLError as exc:
            raise Unreachable(f"TLS with the SMTP server failed ({exc.reason})") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise Unreachable(f"SMTP server unreachable ({type(exc).__name__})") from None
        size = client.esmtp_extensions.get("size", "").strip()
        self.size_limit = int(size) if size.isdigit() and int(size) > 0 else None
        return client

    async def _authenticate(self, client: aiosmtplib.SMTP, token: Token) -> ErrorChallenge | None:
        """XOAUTH2 without initial response. None on success, else what the server said."""
        exchange = Exchange(self.mailbox, token.access_token)
        try:
            response = await client.execute_command(b"AUTH", b"XOAUTH2")
            rounds = 0
            while response.code == 334 and rounds < 3:
                rounds += 1
                response = await client.execute_command(exchange.next_response(response.message))
        except aiosmtplib.SMTPServerDisconnected:
            # Dovecot-style servers may hang up right after the error challenge.
            if exchange.error is not None:
                return exchange.error
            raise Unreachable("the SMTP server closed the connection during AUTH") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise Unreachable(f"SMTP AUTH failed ({type(exc).__name__})") from None
        if response.code == 235:
            return None
        if response.code in (454, 421) and exchange.error is None:
            raise Unreachable(f"the SMTP server cannot authenticate now ({response.code})")
        if exchange.error is None and response.code != 535:
            # Not about the token (mechanism not offered, TLS required ...): a setup problem.
            raise SmtpError(f"the SMTP server refused AUTH XOAUTH2 ({response.code})")
        return exchange.error or ErrorChallenge(str(response.code), None, None, "")

    async def _authenticated(self, size: int) -> aiosmtplib.SMTP:
        """A connected, authenticated client; a refused token is retried once, fresh. A
        message of ``size`` bytes over the server's SIZE is refused before AUTH (no token
        spent on a mail that cannot go)."""
        challenge: ErrorChallenge | None = None
        for attempt in range(2):
            try:
                token = await self.tokens.token()
            except TokenError as exc:
                raise TokenRefused(f"no access token: {exc}") from None
            client = await self._connect()
            if self.size_limit is not None and size > self.size_limit:
                await _close(client)
                raise TooLarge(size, self.size_limit)
            challenge = await self._authenticate(client, token)
            if challenge is None:
                return client
            self.tokens.invalidate(token)
            await _close(client)
            if attempt == 0:
                continue
        assert challenge is not None
        raise TokenRefused(challenge.describe() + ", twice (once with a fresh token)", challenge)

    async def send(
        self,
        message: EmailMessage,
        *,
        recipients: Sequence[str] | None = None,
        envid: str | None = None,
        ret: str = "HDRS",
        notify: str = DSN_NOTIFY,
    ) -> SendResult:
        """Send ``message`` from the bridge's mailbox (envelope sender) to ``recipients``
        (default: its To and Cc). ``envid`` comes back in the DSN (Original-Envelope-Id)."""
        data = normalize_message_line_endings(message.as_bytes(policy=OUTGOING_POLICY))
        rcpts = list(recipients) if recipients is not None else _header_recipients(message)
        if not rcpts:
            raise SendRefused("the message has no recipient")
        client = await self._authenticated(len(data))
        try:
            dsn = client.supports_extension("dsn")
            mail_options: list[str] = []
            rcpt_options: list[str] = []
            if dsn:
                mail_options.append(f"RET={ret}")
                if envid:
                    mail_options.append(f"ENVID={xtext(envid)}")
                rcpt_options.append(f"NOTIFY={notify}")
            try:
                errors, _ = await client.sendmail(
                    self.mailbox, rcpts, data, mail_options=mail_options, rcpt_options=rcpt_options
                )
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes = ", ".join(sorted({str(r.code) for r in exc.recipients}))
                raise SendRefused(f"every recipient was refused ({codes})") from None
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == 552:
                    raise TooLarge(len(data), self.size_limit or 0) from None
                raise SendRefused(
                    f"the SMTP server refused the message ({exc.code})", exc.code
                ) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise Unreachable(f"sending failed ({type(exc).__name__})") from None
            return SendResult(
                envid=envid,
                dsn_requested=dsn,
                size_limit=self.size_limit,
                refused={r: (resp.code, resp.message[:200]) for r, resp in errors.items()},
            )
        finally:
            await _close(client)


def _header_recipients(message: EmailMessage) -> list[str]:
    from email.utils import getaddresses

    values = [str(v) for name in ("To", "Cc") for v in (message.get_all(name) or [])]
    return [addr for _, addr in getaddresses(values) if addr]


async def _close(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()
