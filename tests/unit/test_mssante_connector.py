"""The MSSanté connector against the real local mail system (Postfix + Dovecot + PSC stand-in).

One ``LocalMailSystem`` serves the module; each test reads its own bridge mailbox, so mail left
by one test never reaches another. The professionals' mail client is plain smtplib/imaplib with
XOAUTH2 (tests/unit/test_mailsystem.py); the directory is a fake ``DirectoryLookup``.
"""

from __future__ import annotations

import asyncio
import email.message
import email.policy
import imaplib
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bridge.devtools.mailsystem import LocalMailSystem
from connectors.base import (
    ConnectorContext,
    ConnectorError,
    ConversationCreated,
    Idnps,
    MessageReceived,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    RemoteEvent,
    RemoteUser,
    Sender,
)
from connectors.idnps import luhn_check_digit
from connectors.mssante.connector import CURSOR_KEY, MssanteConnector, file_limit_for
from connectors.mssante.settings import MssanteSettings
from connectors.mssante.tokens import CachedToken, PscTokenSource, Token
from tests.unit.test_mailsystem import (
    _require_system,
    imap_login,
    smtp_login,
    token_for,
    wait_for_mail,
)

pytestmark = pytest.mark.timeout(120)

OP1, OP2, OP3 = "op1.mssante.localhost", "op2.mssante.localhost", "op3.mssante.localhost"
TRUSTED = [OP1, OP2]  # op3 is a real domain of the mail system, outside the trust space


def idnps(n: int) -> str:
    partial = f"{n:010d}"
    return "8" + partial + luhn_check_digit(partial)


ALICE = (idnps(101), f"alice@{OP1}")
BOB = (idnps(102), f"bob@{OP2}")
MALLORY = (idnps(103), f"mallory@{OP1}")  # a real mailbox the directory does not know
EVE = (idnps(104), f"eve@{OP3}")  # known to the directory, but her operator is not trusted
GHOST = (idnps(105), f"ghost@{OP2}")  # in the directory, but the operator has no such mailbox
BRIDGES = [(idnps(200 + i), f"eimis{i}@{OP1}") for i in range(30)]
_next_bridge = itertools.count()


@pytest.fixture(scope="module")
async def mail() -> AsyncIterator[LocalMailSystem]:
    _require_system()
    state = Path(tempfile.mkdtemp(prefix="eimis-mss-conn-"))
    system = LocalMailSystem(
        state, domains=(OP1, OP2, OP3), users=[ALICE, BOB, MALLORY, EVE, *BRIDGES]
    )
    try:
        async with system:
            yield system
    finally:
        if not os.environ.get("EIMIS_KEEP_MAIL_STATE"):
            shutil.rmtree(state, ignore_errors=True)


# -- fakes -----------------------------------------------------------------------------------


class FakeDirectory:
    """Alice, Bob and Eve have a mailbox; Mallory is unknown."""

    people = {
        ALICE[0]: ("Alice", "Martin", "Médecin", ALICE[1]),
        BOB[0]: ("Bob", "Durand", "Infirmier", BOB[1]),
        EVE[0]: ("Eve", "Petit", "Médecin", EVE[1]),
        GHOST[0]: ("Gaston", "Fantome", "Médecin", GHOST[1]),
    }

    async def idnps_for_mailbox(self, address: str) -> Idnps | None:
        for who, (*_, box) in self.people.items():
            if box == address.strip().lower():
                return Idnps(who)
        return None

    async def mailboxes_of(self, who: Idnps) -> Sequence[str]:
        entry = self.people.get(who)
        return (entry[3],) if entry else ()

    async def describe(self, who: Idnps) -> RemoteUser | None:
        entry = self.people.get(who)
        return RemoteUser(who, *entry[:3]) if entry else None


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.data.get(key)

    async def set(self, key: str, value: str) -> None:
        self.data[key] = value


@dataclass
class Recorder:
    events: list[RemoteEvent] = field(default_factory=list)
    gate: asyncio.Event | None = None
    """When set, ``emit`` records the event, then waits for the gate (a slow durable store)."""
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    fail_once: bool = False

    async def __call__(self, event: RemoteEvent) -> None:
        self.events.append(event)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("the store failed")

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@dataclass
class Harness:
    mail: LocalMailSystem
    bridge: tuple[str, str]
    store: MemoryStore = field(default_factory=MemoryStore)
    recorder: Recorder = field(default_factory=Recorder)
    connectors: list[MssanteConnector] = field(default_factory=list)

    def make(self, tokens: Any = None, **overrides: Any) -> MssanteConnector:
        settings = {
            "smtp": self.mail.smtp,
            "imap": self.mail.imap,
            "ca_file": str(self.mail.ca_file),
            "mailbox": self.bridge[1],
            "token_url": self.mail.token_url,
            "token_idnps": self.bridge[0],
            "trusted_domains": TRUSTED,
            "x_mss_nil": "NIL-TEST-1",
            "poll_interval_s": 2.0,
        } | overrides
        ctx = ConnectorContext(
            connector_id="mss",
            settings=MssanteSettings.model_validate(settings),
            emit=self.recorder,
            store=self.store,
            public_base_url="http://127.0.0.1:1/connectors/mss",
            directory=FakeDirectory(),
        )
        connector = MssanteConnector(ctx, tokens=tokens)
        connector.backoff_initial_s = 0.05
        connector.backoff_max_s = 0.2
        self.connectors.append(connector)
        return connector


@pytest.fixture
async def h(mail: LocalMailSystem) -> AsyncIterator[Harness]:
    harness = Harness(mail, BRIDGES[next(_next_bridge)])
    try:
        yield harness
    finally:
        for connector in harness.connectors:
            await connector.stop()


# -- helpers ---------------------------------------------------------------------------------


def mail_from(
    who: tuple[str, str],
    to: str,
    subject: str,
    body: str,
    *,
    cc: str | None = None,
    in_reply_to: str | None = None,
) -> email.message.EmailMessage:
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = who[1], to, subject
    if cc:
        msg["Cc"] = cc
    if in_reply_to:
        msg["In-Reply-To"] = msg["References"] = in_reply_to
    msg["Message-ID"] = f"<{time.time_ns()}.{who[0]}@{who[1].partition('@')[2]}>"
    msg.set_content(body)
    return msg


async def send_as(
    mail: LocalMailSystem,
    who: tuple[str, str],
    msg: email.message.EmailMessage,
    envelope_to: Sequence[str],
) -> None:
    token = await token_for(mail, who[0])

    def send() -> None:
        smtp = smtp_login(mail, who[1], token)
        try:
            smtp.send_message(msg, to_addrs=list(envelope_to))
        finally:
            smtp.quit()

    await asyncio.to_thread(send)


async def inbox_count(mail: LocalMailSystem, who: tuple[str, str]) -> int:
    token = await token_for(mail, who[0])

    def count() -> int:
        imap: imaplib.IMAP4 = imap_login(mail, who[1], token)
        try:
            _, data = imap.select("INBOX")
            return int(data[0] or 0)
        finally:
            imap.logout()

    return await asyncio.to_thread(count)


async def until(check: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def outbound(request_id: str, text: str, **extra: Any) -> OutboundMessage:
    return OutboundMessage(
        request_id=request_id,
        sender=Sender(mxid="@jean:eimis.localhost", display_name="Jean DUPONT - Médecin"),
        text=text,
        timestamp=datetime.now(UTC),
        **extra,
    )


async def open_thread(connector: MssanteConnector, request_id: str, *who: str) -> str:
    return await connector.create_conversation(
        NewConversation(
            request_id=request_id,
            title="Suivi de Mme X",
            members=tuple(Idnps(w) for w in who),
            external=(Sender(mxid="@jean:eimis.localhost", display_name="Jean DUPONT"),),
        )
    )


# -- settings (no mail system) ---------------------------------------------------------------


def test_settings_validate_servers_disposal_and_reply_addresses() -> None:
    base = {
        "smtp": "127.0.0.1:587",
        "imap": "mail.example:143",
        "ca_file": "/ca.pem",
        "mailbox": "EIMIS@Op1.Example",
        "token_url": "http://127.0.0.1:1/token",
        "token_idnps": "899999999909",
        "trusted_domains": ["Op1.Example."],
    }
    settings = MssanteSettings.model_validate(base)
    assert settings.mailbox == "eimis@op1.example"
    assert settings.trusted_domains == ["op1.example"]
    assert settings.reply_address("0123456789abcdef") == "eimis+0123456789abcdef@op1.example"
    assert settings.move_folder is None
    assert settings.server("imap").port == 143 and settings.server("imap").tls == "starttls"
    moved = MssanteSettings.model_validate(base | {"after_delivery": "move:Traites"})
    assert moved.move_folder == "Traites"
    for bad in (
        {"smtp": "no-port"},
        {"after_delivery": "delete"},
        {"ca_file": ""},
        {"trusted_domains": []},
        {"mailbox": "not an address"},
        {"imap_tls": "none"},
    ):
        with pytest.raises(ValidationError):
            MssanteSettings.model_validate(base | bad)


def test_capabilities_are_what_is_implemented() -> None:
    caps = MssanteConnector.capabilities
    assert caps.formatting == "plain" and not caps.replies
    assert not (caps.edits or caps.reactions or caps.typing or caps.delivery_status)
    assert set(caps.files) == {"m.image", "m.file"}
    assert file_limit_for(10 * 1024 * 1024) < 10 * 1024 * 1024 * 3 // 4


# -- mail -> bridge --------------------------------------------------------------------------


async def test_a_reply_reaches_its_thread_once_and_the_cursor_moves_after_emit(
    h: Harness,
) -> None:
    h.recorder.gate = asyncio.Event()
    connector = h.make()
    token = await open_thread(connector, "conv-1", ALICE[0])
    first = await connector.send_message(token, outbound("m-1", "Bonjour Alice"))
    await connector.start()

    # Alice answers from her mail client: In-Reply-To the bridge's mail, to the plain mailbox.
    reply = mail_from(ALICE, h.bridge[1], "Re: Suivi de Mme X", "Bien reçu", in_reply_to=first)
    await send_as(h.mail, ALICE, reply, [h.bridge[1]])

    await asyncio.wait_for(h.recorder.entered.wait(), 20)
    # (The cursor may already have moved past the DSN "delivered" of the bridge's first mail.)
    blocked = h.store.data.get(CURSOR_KEY)
    await asyncio.sleep(0.3)
    assert h.store.data.get(CURSOR_KEY) == blocked  # emit has not returned: the cursor stays
    h.recorder.gate.set()
    await until(lambda: h.store.data.get(CURSOR_KEY) != blocked)
    [event] = h.recorder.events
    assert isinstance(event, MessageReceived)
    assert event.conversation_id == token and event.sender == ALICE[0]
    assert event.text == "Bien reçu" and event.message_id == reply["Message-ID"]
    await until(lambda: _empty(h.mail, h.bridge))

    # Another answer found by the reply address's token alone (no thread headers).
    h.recorder.entered.clear()
    by_token = mail_from(ALICE, connector.settings.reply_address(token), "Re", "Par le jeton")
    # Delivered to the reply address itself (the operator's sub-addressing: "+" detail).
    await send_as(h.mail, ALICE, by_token, [connector.settings.reply_address(token)])
    await until(lambda: len(h.recorder.events) == 2)
    assert h.recorder.events[1].conversation_id == token
    assert h.recorder.events[1].text == "Par le jeton"  # type: ignore[union-attr]
    await until(lambda: _empty(h.mail, h.bridge))  # every mail read and disposed of
    assert len(h.recorder.events) == 2  # once each


async def _empty(mail: LocalMailSystem, who: tuple[str, str]) -> bool:
    return await inbox_count(mail, who) == 0


async def test_a_restart_resumes_from_the_cursor_without_re_emitting(h: Harness) -> None:
    connector = h.make()
    token = await open_thread(connector, "conv-r", ALICE[0])
    first = await connector.send_message(token, outbound("m-r1", "Premier"))
    await connector.start()
    await send_as(
        h.mail, ALICE, mail_from(ALICE, h.bridge[1], "Re", "Un", in_reply_to=first), [h.bridge[1]]
    )
    await until(lambda: len(h.recorder.events) == 1)
    await until(lambda: CURSOR_KEY in h.store.data)
    cursor_before = h.store.data[CURSOR_KEY]
    await connector.stop()

    again = h.make()  # same store: same cursor and threads
    await again.start()
    await send_as(
        h.mail, ALICE, mail_from(ALICE, h.bridge[1], "Re", "Deux", in_reply_to=first), [h.bridge[1]]
    )
    await until(lambda: len(h.recorder.events) == 2)
    await until(lambda: _empty(h.mail, h.bridge))  # every mail read and disposed of
    assert [e.text for e in h.recorder.of(MessageReceived)] == ["Un", "Deux"]
    assert h.store.data[CURSOR_KEY] != cursor_before


async def test_a_failed_emit_is_retried_with_the_same_event_id(h: Harness) -> None:
    h.recorder.fail_once = True
    connector = h.make()
    token = await open_thread(connector, "conv-f", ALICE[0])
    first = await connector.send_message(token, outbound("m-f1", "Premier"))
    await connector.start()
    await send_as(
        h.mail,
        ALICE,
        mail_from(ALICE, h.bridge[1], "Re", "Encore", in_reply_to=first),
        [h.bridge[1]],
    )
    await until(lambda: len(h.recorder.events) == 2)
    one, two = h.recorder.events
    assert one.event_id == two.event_id  # the bridge stores it once
    await until(lambda: CURSOR_KEY in h.store.data)


async def test_a_new_mail_to_the_bridge_opens_a_conversation(h: Harness) -> None:
    connector = h.make()
    await connector.start()
    msg = mail_from(
        ALICE, h.bridge[1], "XDM/1.0/DDM+Compte rendu DUPONT", "Voici le compte rendu", cc=BOB[1]
    )
    await send_as(h.mail, ALICE, msg, [h.bridge[1]])
    await until(lambda: len(h.recorder.events) == 2)
    created, message = h.recorder.events
    assert isinstance(created, ConversationCreated) and isinstance(message, MessageReceived)
    assert created.title == "Compte rendu DUPONT"
    assert created.creator == ALICE[0] and set(created.members) == {ALICE[0], BOB[0]}
    assert message.conversation_id == created.conversation_id
    assert message.sender == ALICE[0] and message.text == "Voici le compte rendu"

    # The bridge's answer goes to both, in the thread.
    sent = await connector.send_message(created.conversation_id, outbound("m-n1", "Merci"))
    [got] = await wait_for_mail(h.mail, BOB, f'(HEADER Message-ID "{sent}")')
    assert got["In-Reply-To"] == msg["Message-ID"]


async def test_unknown_senders_and_untrusted_domains_never_enter(h: Harness) -> None:
    connector = h.make()
    await connector.start()
    await send_as(h.mail, MALLORY, mail_from(MALLORY, h.bridge[1], "Hello", "?"), [h.bridge[1]])
    await send_as(h.mail, EVE, mail_from(EVE, h.bridge[1], "Hello", "?"), [h.bridge[1]])
    # Bob is a trusted, known professional, but not in the thread he answers.
    token = await open_thread(connector, "conv-np", ALICE[0])
    first = await connector.send_message(token, outbound("m-np", "Pour Alice"))
    await send_as(
        h.mail, BOB, mail_from(BOB, h.bridge[1], "Re", "Intrus", in_reply_to=first), [h.bridge[1]]
    )
    await until(lambda: sum(connector.refused.values()) == 3)
    assert connector.refused == {
        "unknown_sender": 1,
        "untrusted_domain": 1,
        "not_a_participant": 1,
    }
    await until(lambda: _empty(h.mail, h.bridge))  # disposed of, as configured
    assert h.recorder.events == []


async def test_processed_mail_is_moved_when_configured(h: Harness) -> None:
    connector = h.make(after_delivery="move:Traites")
    await connector.start()
    await send_as(h.mail, ALICE, mail_from(ALICE, h.bridge[1], "Objet", "Texte"), [h.bridge[1]])
    await until(lambda: len(h.recorder.events) == 2)
    await until(lambda: _empty(h.mail, h.bridge))
    token = await token_for(h.mail, h.bridge[0])

    def moved() -> int:
        imap = imap_login(h.mail, h.bridge[1], token)
        try:
            _, data = imap.select("Traites")
            return int(data[0] or 0)
        finally:
            imap.logout()

    assert await asyncio.to_thread(moved) == 1


async def test_a_delivery_report_is_recognised_and_not_emitted(h: Harness) -> None:
    connector = h.make()
    await connector.start()
    token = await open_thread(connector, "conv-d", GHOST[0])
    await connector.send_message(token, outbound("m-d", "Vers une boîte inexistante"))
    await until(lambda: connector.receipts["dsn"] == 1, timeout=30)
    assert h.recorder.events == [] and not connector.refused
    await until(lambda: _empty(h.mail, h.bridge))


# -- bridge -> mail --------------------------------------------------------------------------


async def test_send_message_reaches_the_professional_with_the_mssante_headers_once(
    h: Harness,
) -> None:
    connector = h.make(request_mdn=True)
    token = await open_thread(connector, "conv-s", ALICE[0])
    assert await open_thread(connector, "conv-s", ALICE[0]) == token  # idempotent

    @asynccontextmanager
    async def pdf() -> AsyncIterator[AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"%PDF-1.4 "
            yield b"contenu"

        yield chunks()

    file = OutboundAttachment(name="cr.pdf", mime_type="application/pdf", size=16, open=pdf)
    first = await connector.send_message(token, outbound("m-s1", "Bonjour", attachment=file))
    assert await connector.send_message(token, outbound("m-s1", "Bonjour")) == first
    second = await connector.send_message(token, outbound("m-s2", "Suite"))

    [got] = await wait_for_mail(h.mail, ALICE, f'(HEADER Message-ID "{first}")')
    assert got["From"].addresses[0].display_name == "Jean DUPONT - Médecin via EIMIS"
    assert got["From"].addresses[0].addr_spec == h.bridge[1]
    assert got["Reply-To"] == connector.settings.reply_address(token)
    assert got["X-MSS-NIL"] == "NIL-TEST-1"
    assert got["Disposition-Notification-To"] == h.bridge[1]
    assert got["Subject"] == "Suivi de Mme X"
    [part] = list(got.iter_attachments())
    assert part.get_filename() == "cr.pdf" and part.get_content() == b"%PDF-1.4 contenu"
    [follow] = await wait_for_mail(h.mail, ALICE, f'(HEADER Message-ID "{second}")')
    assert follow["In-Reply-To"] == first and first in follow["References"]
    assert len(await wait_for_mail(h.mail, ALICE, f'(HEADER Message-ID "{first}")')) == 1


async def test_a_send_interrupted_before_its_end_is_sent_again_with_the_same_id(
    h: Harness,
) -> None:
    connector = h.make()
    token = await open_thread(connector, "conv-p", ALICE[0])
    # A crash after the Message-ID was recorded, before the server's answer was.
    pending = f"<pending.{time.time_ns()}@{OP1}>"
    h.store.data["sent:m-p"] = f'{{"message_id": "{pending}", "sent": false}}'
    assert await connector.send_message(token, outbound("m-p", "Encore")) == pending
    [got] = await wait_for_mail(h.mail, ALICE, f'(HEADER Message-ID "{pending}")')
    assert got.get_content().strip() == "Encore"


async def test_an_unknown_conversation_or_professional_is_refused(h: Harness) -> None:
    connector = h.make()
    with pytest.raises(ConnectorError) as caught:
        await connector.send_message("0123456789abcdef", outbound("m-u", "?"))
    assert not caught.value.retriable
    with pytest.raises(ConnectorError):
        await open_thread(connector, "conv-u", MALLORY[0])


class ExpiredFirst:
    """Hands out an expired token first (as a cache would keep one too long), then real ones."""

    def __init__(self, mail: LocalMailSystem, who: tuple[str, str]) -> None:
        self.mail, self.who, self.calls = mail, who, 0
        self.real = PscTokenSource(mail.token_url, who[0], _session)

    async def token(self) -> Token:
        self.calls += 1
        if self.calls == 1:
            stale = self.mail.psc.mint(self.who[0], self.who[1], now=time.time() - 600)
            return Token(stale, time.time() + 300)  # the cache believes it fresh
        return await self.real.token()


_sessions: list[Any] = []


def _session() -> Any:
    import aiohttp

    if not _sessions or _sessions[-1].closed:
        _sessions.append(aiohttp.ClientSession())
    return _sessions[-1]


async def test_an_expired_token_is_refreshed(h: Harness) -> None:
    tokens = ExpiredFirst(h.mail, h.bridge)
    connector = h.make(tokens=tokens)
    try:
        token = await open_thread(connector, "conv-t", ALICE[0])
        sent = await connector.send_message(token, outbound("m-t", "Jeton rafraîchi"))
        assert tokens.calls == 2
        await wait_for_mail(h.mail, ALICE, f'(HEADER Message-ID "{sent}")')
        status = await connector.probe()  # IMAP too, on the refreshed token
        assert "SMTP and IMAP" in status
    finally:
        for session in _sessions:
            await session.close()


class Counting:
    def __init__(self, source: Any) -> None:
        self.source, self.calls = source, 0

    async def token(self) -> Token:
        self.calls += 1
        token: Token = await self.source.token()
        return token


async def test_a_token_past_its_lifetime_is_fetched_again(h: Harness) -> None:
    now = [time.time()]
    connector = h.make()
    counting = Counting(connector.tokens._source)  # the PSC source
    connector.tokens = CachedToken(counting, clock=lambda: now[0])
    connector.sender.tokens = connector.tokens
    token = await open_thread(connector, "conv-e", ALICE[0])
    await connector.send_message(token, outbound("m-e1", "Un"))
    await connector.send_message(token, outbound("m-e2", "Deux"))
    assert counting.calls == 1  # cached while fresh
    now[0] += 300  # the PSC token lives 300 s: past its refresh point
    sent = await connector.send_message(token, outbound("m-e3", "Trois"))
    assert counting.calls == 2
    await wait_for_mail(h.mail, ALICE, f'(HEADER Message-ID "{sent}")')


async def test_concurrent_sends_of_one_thread_chain_their_headers(h: Harness) -> None:
    connector = h.make()
    token = await open_thread(connector, "conv-c", ALICE[0])
    ids = await asyncio.gather(
        *(connector.send_message(token, outbound(f"m-c{i}", f"n{i}")) for i in range(3))
    )
    assert len(set(ids)) == 3
    thread = await connector.threads.get(token)
    assert thread is not None and thread.message_ids == list(ids)


async def test_get_user_and_probe(h: Harness) -> None:
    connector = h.make()
    user = await connector.get_user(Idnps(ALICE[0]))
    assert user is not None and user.display_name.startswith("Alice MARTIN")
    assert await connector.get_user(Idnps(MALLORY[0])) is None
    assert "SIZE" in await connector.probe()
    assert connector.capabilities.files["m.file"].max_size == file_limit_for(
        h.mail.message_size_limit
    )
    wrong = h.make(token_idnps=MALLORY[0])  # a token for another mailbox
    with pytest.raises(ConnectorError) as caught:
        await wrong.probe()
    assert caught.value.credentials_rejected
