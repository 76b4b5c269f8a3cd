"""SASL XOAUTH2: the client response and the error-challenge rule."""

from __future__ import annotations

import base64

import pytest

from connectors.mssante.xoauth2 import (
    Exchange,
    client_response,
    decode_error_challenge,
    encoded_response,
)

DOVECOT_ERROR = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')


def test_the_client_response_is_googles_format() -> None:
    assert client_response("a@b.fr", "tok") == b"user=a@b.fr\x01auth=Bearer tok\x01\x01"
    assert base64.b64decode(encoded_response("a@b.fr", "tok")) == client_response("a@b.fr", "tok")


@pytest.mark.parametrize("bad", ["a\x01b", "a\r\nb", "a\nb"])
def test_control_characters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        client_response(bad, "tok")
    with pytest.raises(ValueError):
        client_response("a@b.fr", bad)


def test_the_exchange_sends_credentials_then_an_empty_line_to_the_error() -> None:
    exchange = Exchange("a@b.fr", "tok")
    assert exchange.next_response(b"") == encoded_response("a@b.fr", "tok")
    assert exchange.error is None
    assert exchange.next_response(DOVECOT_ERROR) == b""
    assert exchange.error is not None
    assert (exchange.error.status, exchange.error.schemes, exchange.error.scope) == (
        "401",
        "bearer",
        "mail",
    )
    assert exchange.error.describe() == "token refused by the server (status=401, scope=mail)"


@pytest.mark.parametrize("challenge", [b"!!!not base64", base64.b64encode(b"[1,2]"), b""])
def test_an_undecodable_error_challenge_still_gets_its_empty_answer(challenge: bytes) -> None:
    error = decode_error_challenge(challenge)
    assert error.status is None
    exchange = Exchange("a@b.fr", "tok")
    exchange.next_response(b"")
    assert exchange.next_response(challenge) == b""
