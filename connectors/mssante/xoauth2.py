"""SASL XOAUTH2 (Google's spec, as Dovecot implements it), client side.

The client response is ``base64("user=" addr "\\x01auth=Bearer " token "\\x01\\x01")``. It is sent
WITHOUT initial response: ``AUTH XOAUTH2`` (SMTP) or ``AUTHENTICATE XOAUTH2`` (IMAP) alone, then
the response on its own line after the server's empty challenge, because PSC tokens are long
and Dovecot refuses a long initial response ("Line too long"). When the server refuses the token
it sends a second challenge, base64 JSON such as ``{"status":"401","schemes":"bearer",
"scope":"mail"}``; the client must answer it with an empty line, after which the server ends
the exchange with a failure (SMTP 535, IMAP NO). ``next_response`` is that rule.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

_FORBIDDEN = ("\x01", "\r", "\n", "\x00")


def client_response(address: str, access_token: str) -> bytes:
    """The raw (not base64) XOAUTH2 client response."""
    for value in (address, access_token):
        if any(c in value for c in _FORBIDDEN):
            raise ValueError("XOAUTH2 user and token must not contain control characters")
    return f"user={address}\x01auth=Bearer {access_token}\x01\x01".encode()


def encoded_response(address: str, access_token: str) -> bytes:
    """The base64 XOAUTH2 client response, as sent on the wire."""
    return base64.b64encode(client_response(address, access_token))


@dataclass(frozen=True)
class ErrorChallenge:
    """What a server's error challenge said (its JSON, decoded), never the token."""

    status: str | None
    schemes: str | None
    scope: str | None
    raw: str

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("status", self.status), ("scope", self.scope)) if v]
        return "token refused by the server" + (f" ({', '.join(parts)})" if parts else "")


def decode_error_challenge(challenge: bytes | str) -> ErrorChallenge:
    """Decode an error challenge (base64 JSON); anything undecodable gives empty fields."""
    text = challenge.decode("ascii", "replace") if isinstance(challenge, bytes) else challenge
    text = text.strip()
    try:
        decoded = base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ErrorChallenge(None, None, None, text[:200])
    try:
        data = json.loads(decoded)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return ErrorChallenge(None, None, None, decoded[:200])

    def field(name: str) -> str | None:
        value = data.get(name)
        return None if value is None else str(value)[:100]

    return ErrorChallenge(field("status"), field("schemes"), field("scope"), decoded[:200])


class Exchange:
    """The client side of one XOAUTH2 exchange without initial response.

    Feed each server challenge (the text after ``334 `` or ``+ ``) to ``next_response``; send
    what it returns as one line. The first challenge (empty) gets the credentials; any later one
    is the error challenge: it is decoded into ``error`` and answered with an empty line."""

    def __init__(self, address: str, access_token: str) -> None:
        self._response = encoded_response(address, access_token)
        self.sent_credentials = False
        self.error: ErrorChallenge | None = None

    def next_response(self, challenge: bytes | str) -> bytes:
        if not self.sent_credentials:
            self.sent_credentials = True
            return self._response
        self.error = decode_error_challenge(challenge)
        return b""
