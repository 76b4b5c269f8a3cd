"""Sending through aiosmtplib against an aiosmtpd stub: STARTTLS or implicit TLS, XOAUTH2
without initial response, the error challenge, a refused token retried once, SIZE, DSN params."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult

from bridge.devtools.ports import free_port
from connectors.mssante.mime import build_outgoing
from connectors.mssante.smtp import SmtpSender, TokenRefused, TooLarge, Unreachable, xtext
from connectors.mssante.tlsconfig import ServerSettings
from connectors.mssante.tokens import CachedToken, Token, TokenError

from .test_mssante_tls import TestPki, make_pki

MAILBOX = "eimis@bridge.mssante.test"
ERROR_JSON = {"status": "401", "schemes": "bearer", "scope": "mail"}
DSN_KEYS = ("RET=", "ENVID=", "NOTIFY=", "ORCPT=")


@dataclass
class Recorder:
    """The stub's state: which tokens are valid, what happened on the wire."""

    valid_tokens: set[str] = field(default_factory=set)
    auth_args: list[list[str]] = field(default_factory=list)
    answers_to_error: list[bytes] = field(default_factory=list)
    auth_users: list[str] = field(default_factory=list)
    mail_params: list[list[str]] = field(default_factory=list)
    rcpt_params: list[list[str]] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    offer_dsn: bool = True
    line_limit: int = 512


class Handler:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001
        session.host_name = hostname
        if self.rec.offer_dsn:
            responses.insert(len(responses) - 1, "250-DSN")
        return responses

    async def auth_XOAUTH2(self, server: SMTPServer, args: list[str]) -> AuthResult:
        self.rec.auth_args.append(list(args))
        if len(args) > 1:  # an initial response: what Dovecot refuses when long
            return AuthResult(success=False, handled=False, message="500 5.5.2 Line too long")
        blob = await server.challenge_auth("")
        if not isinstance(blob, bytes):
            return AuthResult(success=False, handled=True)
        user, _, rest = blob.decode().partition("\x01auth=Bearer ")
        token = rest.removesuffix("\x01\x01")
        self.rec.auth_users.append(user.removeprefix("user="))
        if token in self.rec.valid_tokens:
            return AuthResult(success=True)
        answer = await server.challenge_auth(json.dumps(ERROR_JSON))
        self.rec.answers_to_error.append(answer if isinstance(answer, bytes) else b"<missing>")
        return AuthResult(success=False, handled=False)

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        self.rec.messages.append(envelope.original_content)
        return "250 2.0.0 Ok: queued"


class DsnServer(SMTPServer):
    """aiosmtpd refuses unknown MAIL/RCPT parameters: the DSN ones are taken off and kept.
    A SASL response line may be long (a JWT): not a command line, so a larger read limit."""

    line_length_limit = 16384

    rec: Recorder

    def _split(self, arg: str, into: list[list[str]]) -> str:
        words = arg.split()
        into.append([w for w in words if w.upper().startswith(DSN_KEYS)])
        return " ".join(w for w in words if not w.upper().startswith(DSN_KEYS))

    async def smtp_MAIL(self, arg: str) -> None:
        await super().smtp_MAIL(self._split(arg, self.rec.mail_params) if arg else arg)

    async def smtp_RCPT(self, arg: str) -> None:
        await super().smtp_RCPT(self._split(arg, self.rec.rcpt_params) if arg else arg)


class StubController(Controller):
    def __init__(self, rec: Recorder, **kwargs: Any) -> None:
        super().__init__(Handler(rec), **kwargs)
        self.rec = rec

    def factory(self) -> SMTPServer:
        server = DsnServer(self.handler, **self.SMTP_kwargs)
        server.rec = self.rec
        return server


class FakeSource:
    """Issues tok-1, tok-2 ...; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def token(self) -> Token:
        self.calls += 1
        return Token(f"tok-{self.calls}-" + "x" * 1200, time.time() + 300)  # long, like a JWT


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def start_stub(pki: TestPki, rec: Recorder, *, implicit: bool = False, size: int = 0):
    port = free_port()
    kwargs: dict[str, Any] = dict(
        hostname="127.0.0.1",
        port=port,
        auth_require_tls=not implicit,  # aiosmtpd sees only STARTTLS as TLS
        auth_exclude_mechanism=["LOGIN", "PLAIN"],
        data_size_limit=size,
        server_hostname="localhost",
    )
    if implicit:
        kwargs["ssl_context"] = pki.server_context()
    else:
        kwargs["tls_context"] = pki.server_context()
        kwargs["require_starttls"] = True
    controller = StubController(rec, **kwargs)
    controller.start()
    return controller, port


@pytest.fixture
def stub(pki: TestPki):
    started = []

    def start(rec: Recorder, **kwargs: Any):
        controller, port = start_stub(pki, rec, **kwargs)
        started.append(controller)
        return port

    yield start
    for controller in started:
        controller.stop()


def sender(pki: TestPki, port: int, source: Any, tls: str = "starttls") -> SmtpSender:
    settings = ServerSettings("localhost", port, tls=tls, ca_file=pki.ca_file, timeout_s=10)  # type: ignore[arg-type]
    return SmtpSender(settings, MAILBOX, CachedToken(source), local_hostname="bridge.test")


def a_message(text: str = "Bonjour, résultats joints.") -> Any:
    return build_outgoing(
        mailbox=MAILBOX,
        sender=("Claire", "Martin", "Infirmière"),
        to=["dr.durand@medecin.mssante.test"],
        subject="Suivi",
        text=text,
        nil="EIMIS-TEST-0001",
    )


async def test_xoauth2_is_sent_without_initial_response_then_dsn_params(stub, pki) -> None:
    rec = Recorder(valid_tokens={"tok-1-" + "x" * 1200})
    port = stub(rec)
    result = await sender(pki, port, FakeSource()).send(a_message(), envid="out-42+a=b")
    assert rec.auth_args == [["XOAUTH2"]]  # no initial response
    assert rec.auth_users == [MAILBOX]
    assert rec.mail_params == [["RET=HDRS", "ENVID=out-42+2Ba+3Db"]]
    assert rec.rcpt_params == [["NOTIFY=SUCCESS,FAILURE,DELAY"]]
    assert result.dsn_requested and result.envid == "out-42+a=b" and result.refused == {}
    assert len(rec.messages) == 1 and b"X-MSS-NIL: EIMIS-TEST-0001" in rec.messages[0]


async def test_implicit_tls_works_too(stub, pki) -> None:
    rec = Recorder(valid_tokens={"tok-1-" + "x" * 1200})
    port = stub(rec, implicit=True)
    await sender(pki, port, FakeSource(), tls="implicit").send(a_message(), envid="e1")
    assert len(rec.messages) == 1


async def test_a_refused_token_is_acked_empty_then_refreshed_once(stub, pki) -> None:
    rec = Recorder(valid_tokens={"tok-2-" + "x" * 1200})  # the first one is "expired"
    port = stub(rec)
    source = FakeSource()
    await sender(pki, port, source).send(a_message(), envid="e2")
    assert source.calls == 2
    assert rec.answers_to_error == [b""]  # the error challenge got an empty line
    assert len(rec.messages) == 1


async def test_a_token_refused_twice_raises_token_refused(stub, pki) -> None:
    rec = Recorder()
    port = stub(rec)
    source = FakeSource()
    with pytest.raises(TokenRefused) as caught:
        await sender(pki, port, source).send(a_message(), envid="e3")
    assert source.calls == 2 and rec.messages == []
    assert caught.value.challenge is not None and caught.value.challenge.status == "401"
    assert "tok-" not in str(caught.value)


async def test_no_token_at_all_is_reported_as_refused(stub, pki) -> None:
    class Broken:
        async def token(self) -> Token:
            raise TokenError("token issuer answered HTTP 503")

    port = stub(Recorder())
    with pytest.raises(TokenRefused, match="503"):
        await sender(pki, port, Broken()).send(a_message(), envid="e4")


async def test_a_message_over_size_is_refused_before_sending(stub, pki) -> None:
    rec = Recorder(valid_tokens={"tok-1-" + "x" * 1200})
    port = stub(rec, size=2000)
    smtp = sender(pki, port, FakeSource())
    with pytest.raises(TooLarge) as caught:
        await smtp.send(a_message("x" * 5000), envid="e5")
    assert caught.value.limit == 2000 and caught.value.size > 2000
    assert rec.messages == [] and rec.mail_params == []  # no MAIL FROM was sent
    assert rec.auth_args == []  # nor AUTH: no token spent on a mail that cannot go
    await smtp.send(a_message("short"), envid="e6")
    assert smtp.size_limit == 2000 and len(rec.messages) == 1


async def test_without_dsn_support_the_mail_goes_without_params(stub, pki) -> None:
    rec = Recorder(valid_tokens={"tok-1-" + "x" * 1200}, offer_dsn=False)
    port = stub(rec)
    result = await sender(pki, port, FakeSource()).send(a_message(), envid="e7")
    assert not result.dsn_requested and rec.mail_params == [[]]


async def test_a_server_under_another_ca_is_unreachable(stub, pki, tmp_path: Path) -> None:
    rec = Recorder(valid_tokens={"tok-1-" + "x" * 1200})
    port = stub(rec)
    other = make_pki(tmp_path / "other", ca_cn="Another CA")
    with pytest.raises(Unreachable, match="TLS|unreachable"):
        await sender(other, port, FakeSource()).send(a_message(), envid="e8")
    assert rec.auth_args == []


async def test_nothing_listening_is_unreachable(pki) -> None:
    with pytest.raises(Unreachable):
        await sender(pki, free_port(), FakeSource()).send(a_message(), envid="e9")


def test_xtext_encodes_plus_equals_and_non_ascii() -> None:
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("é") == "+C3+A9"
