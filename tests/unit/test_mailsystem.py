"""The local MSSanté-like operator (bridge/devtools/mailsystem.py) seen from a mail client.

The client is what a professional's would be: plain smtplib/imaplib, STARTTLS, SASL XOAUTH2 with
a token from the Pro Santé Connect stand-in, sent without initial response, the server's error
challenge answered with an empty line. One LocalMailSystem serves the whole module.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import imaplib
import json
import os
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.devtools.mailsystem import (
    LocalMailSystem,
    MailSystemError,
    _pid_alive,
    ensure_packages,
    instance_pids,
    packages_missing,
)
from tests.conftest import unavailable

pytestmark = pytest.mark.timeout(120)

ALICE = ("810000000001", "alice@op1.mssante.localhost")
BOB = ("810000000002", "bob@op2.mssante.localhost")


def _require_system() -> None:
    if os.geteuid() != 0:
        unavailable("the local mail system needs root (Postfix)")
    if packages_missing():
        try:
            ensure_packages()
        except MailSystemError as exc:
            unavailable(f"Dovecot/Postfix not installable: {exc}")


@pytest.fixture(scope="module")
async def mail() -> AsyncIterator[LocalMailSystem]:
    _require_system()
    state = Path(tempfile.mkdtemp(prefix="eimis-mail-test-"))
    system = LocalMailSystem(state, users=[ALICE, BOB], message_size_limit=2_000_000)
    try:
        async with system:
            yield system
    finally:
        if not os.environ.get("EIMIS_KEEP_MAIL_STATE"):
            shutil.rmtree(state, ignore_errors=True)


# -- client helpers (a professional's mail client) ------------------------------------------


async def token_for(mail: LocalMailSystem, idnps: str, **extra: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(mail.token_url, json={"idnps": idnps, **extra}) as response,
    ):
        assert response.status == 200
        body = await response.json()
    assert body["expires_in"] == 300
    return str(body["access_token"])


def xoauth2(address: str, token: str) -> Callable[[bytes | None], str]:
    """smtplib authobject: the XOAUTH2 string first, then an empty answer to the error challenge."""
    answers = iter([f"user={address}\x01auth=Bearer {token}\x01\x01", ""])

    def authobject(challenge: bytes | None = None) -> str:
        return next(answers)

    return authobject


def split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def smtp_client(mail: LocalMailSystem, context: ssl.SSLContext | None = None) -> smtplib.SMTP:
    smtp = smtplib.SMTP(*split(mail.smtp), local_hostname="client.localhost", timeout=10)
    smtp.ehlo()
    smtp.starttls(context=context or mail.client_ssl_context())
    smtp.ehlo()
    return smtp


def smtp_login(mail: LocalMailSystem, address: str, token: str) -> smtplib.SMTP:
    smtp = smtp_client(mail)
    smtp.auth("XOAUTH2", xoauth2(address, token), initial_response_ok=False)
    return smtp


def imap_login(mail: LocalMailSystem, address: str, token: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(*split(mail.imap), timeout=10)
    imap.starttls(ssl_context=mail.client_ssl_context())
    raw = f"user={address}\x01auth=Bearer {token}\x01\x01".encode()
    imap.authenticate("XOAUTH2", lambda challenge: raw if challenge == b"" else b"")
    return imap


def message(
    sender: str, to: str, subject: str, body: str = "Bonjour"
) -> email.message.EmailMessage:
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content(body)
    return msg


async def wait_for_mail(
    mail: LocalMailSystem, who: tuple[str, str], criterion: str, timeout: float = 20
) -> list[email.message.Message]:
    """Messages of ``who``'s INBOX matching an IMAP SEARCH ``criterion`` (waits for one)."""
    token = await token_for(mail, who[0])
    deadline = time.monotonic() + timeout

    def look() -> list[email.message.Message]:
        imap = imap_login(mail, who[1], token)
        try:
            imap.select("INBOX")
            _, data = imap.search(None, criterion)
            found = []
            for num in data[0].split():
                _, parts = imap.fetch(num, "(RFC822)")
                found.append(email.message_from_bytes(parts[0][1], policy=email.policy.default))
            return found
        finally:
            imap.logout()

    while time.monotonic() < deadline:
        found = await asyncio.to_thread(look)
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"no mail matching {criterion} for {who[1]}")


def foreign_token(mail: LocalMailSystem, address: str) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {
        "iss": mail.psc.issuer,
        "aud": mail.psc.audience,
        "azp": mail.psc.azp,
        "sub": ALICE[0],
        "email": address,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    return jwt.encode(claims, other, algorithm="RS256", headers={"kid": mail.psc.kid})


# -- tests -----------------------------------------------------------------------------------


async def test_mail_from_op1_reaches_op2_over_imap(mail: LocalMailSystem) -> None:
    token = await token_for(mail, ALICE[0])
    assert len(token) > 512  # too long for an SMTP AUTH line: hence no initial response

    def send() -> None:
        smtp = smtp_login(mail, ALICE[1], token)
        try:
            smtp.send_message(message(ALICE[1], BOB[1], "Compte rendu op1-op2"))
        finally:
            smtp.quit()

    await asyncio.to_thread(send)
    [got] = await wait_for_mail(mail, BOB, '(SUBJECT "Compte rendu op1-op2")')
    assert got["From"] == ALICE[1]
    assert got.get_content().strip() == "Bonjour"


async def test_imaps_implicit_tls_login(mail: LocalMailSystem) -> None:
    token = await token_for(mail, BOB[0])

    def login() -> str:
        imap = imaplib.IMAP4_SSL(*split(mail.imaps), ssl_context=mail.client_ssl_context())
        raw = f"user={BOB[1]}\x01auth=Bearer {token}\x01\x01".encode()
        typ, _ = imap.authenticate("XOAUTH2", lambda challenge: raw if challenge == b"" else b"")
        imap.logout()
        return typ

    assert await asyncio.to_thread(login) == "OK"


@pytest.mark.parametrize("kind", ["expired", "foreign key", "other identity's mailbox"])
async def test_bad_tokens_are_refused_on_smtp_and_imap(mail: LocalMailSystem, kind: str) -> None:
    if kind == "expired":
        token = mail.psc.mint(ALICE[0], ALICE[1], now=time.time() - 3600)
    elif kind == "foreign key":
        token = foreign_token(mail, ALICE[1])
    else:
        token = await token_for(mail, BOB[0])  # Bob's token presented for Alice's mailbox
    challenges: list[bytes] = []
    answers = iter([f"user={ALICE[1]}\x01auth=Bearer {token}\x01\x01", ""])

    def authobject(challenge: bytes | None = None) -> str:
        if challenge is not None:
            challenges.append(challenge)
        return next(answers)

    def smtp_try() -> int:
        smtp = smtp_client(mail)
        try:
            smtp.auth("XOAUTH2", authobject, initial_response_ok=False)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        finally:
            smtp.close()
        return 235

    assert await asyncio.to_thread(smtp_try) == 535
    assert json.loads(challenges[-1])["status"] == "401"

    def imap_try() -> None:
        imap_login(mail, ALICE[1], token)

    with pytest.raises(imaplib.IMAP4.error):
        await asyncio.to_thread(imap_try)


async def test_auth_requires_starttls(mail: LocalMailSystem) -> None:
    def ehlo_plain() -> str:
        with smtplib.SMTP(*split(mail.smtp), timeout=10) as smtp:
            smtp.ehlo()
            return str(smtp.esmtp_features.get("auth", ""))

    def ehlo_tls() -> tuple[str, str]:
        smtp = smtp_client(mail)
        try:
            return smtp.esmtp_features.get("auth", ""), smtp.esmtp_features.get("size", "")
        finally:
            smtp.quit()

    assert await asyncio.to_thread(ehlo_plain) == ""
    auth, size = await asyncio.to_thread(ehlo_tls)
    assert "XOAUTH2" in auth.split()
    assert int(size) == 2_000_000


async def test_ca_file_only_trust(mail: LocalMailSystem) -> None:
    only_ca = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    only_ca.load_verify_locations(cafile=str(mail.ca_file))
    await asyncio.to_thread(lambda: smtp_client(mail, only_ca).quit())
    system_store = ssl.create_default_context()  # what a careless client trusts
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(lambda: smtp_client(mail, system_store))

    def named_host() -> None:  # the certificate names mail.<domain> for every domain
        context = mail.client_ssl_context()
        with smtplib.SMTP(*split(mail.smtp), timeout=10) as smtp:
            smtp.ehlo()
            smtp._host = mail.host_name("op2.mssante.localhost")  # SNI/hostname to check
            smtp.starttls(context=context)

    await asyncio.to_thread(named_host)


async def test_tls_below_1_2_is_refused(mail: LocalMailSystem) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=str(mail.ca_file))
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib_suppress_ssl_error() as failed:
        await asyncio.to_thread(lambda: smtp_client(mail, old).quit())
    assert failed


class contextlib_suppress_ssl_error:  # noqa: N801 - reads as a context manager helper
    def __enter__(self) -> list[bool]:
        self.failed: list[bool] = []
        return self.failed

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is not None and issubclass(exc_type, (ssl.SSLError, OSError)):
            self.failed.append(True)
            return True
        return False


async def test_unknown_mailbox_bounces_with_a_dsn(mail: LocalMailSystem) -> None:
    token = await token_for(mail, ALICE[0])
    nobody = "nobody@op2.mssante.localhost"

    def send() -> None:
        smtp = smtp_login(mail, ALICE[1], token)
        try:
            smtp.send_message(
                message(ALICE[1], nobody, "Pour personne"),
                mail_options=["RET=HDRS", "ENVID=eimis-test-1"],
                rcpt_options=["NOTIFY=FAILURE,DELAY"],
            )
        finally:
            smtp.quit()

    await asyncio.to_thread(send)
    found = await wait_for_mail(mail, ALICE, "(HEADER Content-Type delivery-status)")
    dsn = found[0]
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert nobody in text and "Action: failed" in text and "eimis-test-1" in text


async def test_no_relay_outside_the_domains(mail: LocalMailSystem) -> None:
    token = await token_for(mail, ALICE[0])

    def send() -> dict[str, tuple[int, bytes]]:
        smtp = smtp_login(mail, ALICE[1], token)
        try:
            return smtp.send_message(message(ALICE[1], "someone@example.org", "Ailleurs"))
        finally:
            smtp.quit()

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await asyncio.to_thread(send)
    assert refused.value.recipients["someone@example.org"][0] == 554


async def test_too_large_is_refused(mail: LocalMailSystem) -> None:
    token = await token_for(mail, ALICE[0])

    def send() -> None:
        smtp = smtp_login(mail, ALICE[1], token)
        try:
            smtp.send_message(message(ALICE[1], BOB[1], "Gros", "x" * 2_100_000))
        finally:
            smtp.close()

    with pytest.raises(smtplib.SMTPException):
        await asyncio.to_thread(send)


async def test_psc_stand_in_errors_and_claims(mail: LocalMailSystem) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(mail.token_url, json={"idnps": "000"}) as response:
            assert response.status == 404
            assert (await response.json())["error"] == "unknown_identity"
        async with http.post(mail.token_url, data=b"not json") as response:
            assert response.status == 400
        async with http.post(mail.token_url, json={"idnps": ALICE[0], "email": BOB[1]}) as resp:
            assert resp.status == 404
    token = await token_for(mail, ALICE[0], email=ALICE[1])
    claims = jwt.decode(
        token,
        mail.psc.public_key_pem,
        algorithms=["RS256"],
        audience=mail.psc.audience,
        issuer=mail.psc.issuer,
    )
    assert claims["sub"] == ALICE[0] and claims["email"] == ALICE[1]
    assert claims["exp"] - claims["iat"] == 300 and claims["azp"] == mail.psc.azp
    assert mail.users == [
        {"idnps": ALICE[0], "address": ALICE[1]},
        {"idnps": BOB[0], "address": BOB[1]},
    ]


async def test_added_user_gets_mail(mail: LocalMailSystem) -> None:
    carol = ("810000000003", "carol@op2.mssante.localhost")
    mail.add_user(*carol)
    token = await token_for(mail, ALICE[0])

    def send() -> None:
        smtp = smtp_login(mail, ALICE[1], token)
        try:
            smtp.send_message(message(ALICE[1], carol[1], "Pour Carol"))
        finally:
            smtp.quit()

    await asyncio.to_thread(send)
    assert await wait_for_mail(mail, carol, '(SUBJECT "Pour Carol")')


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from bridge.devtools.mailsystem import LocalMailSystem

    async def main():
        async with LocalMailSystem(Path(sys.argv[1])) as system:
            print("ready", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_process(signum: str) -> None:
    _require_system()
    state = Path(tempfile.mkdtemp(prefix="eimis-mail-sig-"))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(state)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        assert instance_pids(state)  # Postfix's and Dovecot's daemons run in the state dir
        child.send_signal(getattr(__import__("signal"), signum))
        child.wait(timeout=20)
        assert instance_pids(state) == []
        assert not (state / "dovecot" / "run" / "master.pid").exists() or not _alive(
            state / "dovecot" / "run" / "master.pid"
        )
        assert not _alive(state / "postfix" / "queue" / "pid" / "master.pid")
    finally:
        child.kill()
        child.wait()
        shutil.rmtree(state, ignore_errors=True)


def _alive(pid_file: Path) -> bool:
    """The pid file's process runs (a zombie left to a container's non-reaping init does not)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return _pid_alive(pid)
