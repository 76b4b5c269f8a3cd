"""End to end through a real Synapse and a real mail system: the MSSanté connector (issue 15).

One ``LocalStack`` (encrypted portals) and one ``LocalMailSystem`` (Postfix + Dovecot + the Pro
Santé Connect stand-in, root needed) for the module. The stack gains an ``mssante`` connector
reading the bridge's mailbox on op1; the professional's mailbox is on op2; the directory knows
them (a national extract with the ``Adresse BAL`` column, imported as an operator would). The
professional's mail client is smtplib/imaplib with XOAUTH2 (tests/unit/test_mailsystem.py).

Until ``pip install --no-deps -e .`` has registered the ``mssante`` entry point, the module adds
the type the way tests add their own connector types (tests/e2e/test_connector_runtime.py).
"""

from __future__ import annotations

import asyncio
import email.message
import email.policy
import email.utils
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

import bridge.core.connectors as connector_types
from bridge.devtools.mailsystem import LocalMailSystem
from bridge.devtools.stack import LocalStack
from bridge.directory.importer import import_file
from bridge.directory.sample import HEADER, MAILBOX_COLUMNS, extract_line, rpps_idnps
from connectors.mssante import MssanteConnector
from tests.unit.test_mailsystem import _require_system, smtp_login, token_for, wait_for_mail

from e2e_helpers import app_users_of, encrypted_native, member_state, portal_of, unique
from helpers import wait_until
from matrix_user import MatrixUser

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

OP1, OP2 = "op1.mssante.localhost", "op2.mssante.localhost"
BRIDGE_BOX = ("899900000001", f"eimis@{OP1}")
"""The bridge's applicative mailbox and the IDNPS whose PSC token opens it."""
PRO = (rpps_idnps(4242), f"claire.leroy@{OP2}")
PRO_GIVEN, PRO_FAMILY, PRO_PROFESSION = "Claire", "LEROY", "Médecin"
PRO_GHOST_NAME = f"{PRO_GIVEN} {PRO_FAMILY} - {PRO_PROFESSION}"


class _MssanteType:
    name = "mssante"

    def load(self) -> type[MssanteConnector]:
        return MssanteConnector


@pytest.fixture(scope="module")
async def mail() -> AsyncIterator[LocalMailSystem]:
    _require_system()
    state = Path(tempfile.mkdtemp(prefix="eimis-e2e-mss-"))
    system = LocalMailSystem(state, domains=(OP1, OP2), users=[BRIDGE_BOX, PRO])
    try:
        async with system:
            yield system
    finally:
        if not os.environ.get("EIMIS_KEEP_MAIL_STATE"):
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
async def stack(
    mail: LocalMailSystem, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalStack]:
    mssante = {
        "type": "mssante",
        "settings": {
            "smtp": mail.smtp,
            "imap": mail.imap,
            "ca_file": str(mail.ca_file),
            "mailbox": BRIDGE_BOX[1],
            "token_url": mail.token_url,
            "token_idnps": BRIDGE_BOX[0],
            "trusted_domains": [OP1, OP2],
            "x_mss_nil": "NIL-E2E-1",
            "poll_interval_s": 2.0,
        },
    }
    real = connector_types.entry_points

    def entry_points(*, group: str) -> list[Any]:
        found = list(real(group=group))
        if group == connector_types.ENTRY_POINT_GROUP and "mssante" not in {e.name for e in found}:
            found.append(_MssanteType())
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connector_types, "entry_points", entry_points)
        local = LocalStack(
            Path(tmp_path_factory.mktemp("mssante")),
            encrypted=True,
            config_overrides={"encryption": {"enabled": True, "default": True, "key_wait_s": 20}},
            extra_connectors={"mssante": mssante},
        )
        async with local:
            await _import_directory(local)
            yield local


async def _import_directory(stack: LocalStack) -> None:
    """The professional, with their secure mailbox, as the national extract lists them."""
    line = extract_line(PRO[0], PRO_FAMILY, PRO_GIVEN.upper(), "10", PRO_PROFESSION)
    path = stack.state_dir / "PS_LibreAcces_mssante.txt"
    path.write_text(f"{HEADER}{MAILBOX_COLUMNS}\n{line}PER|{PRO[1]}|\n", encoding="utf-8")
    assert stack.bridge is not None
    report = await import_file(stack.bridge.stores.directory, path, progress=False)
    assert not report.rejected


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


@pytest.fixture
async def native(stack: LocalStack, tmp_path: Path) -> AsyncIterator[MatrixUser]:
    async with await encrypted_native(stack, tmp_path, "mss") as user:
        yield user


async def reply_as_professional(mail: LocalMailSystem, to: str, msg: email.message.Message) -> None:
    """Sent from the professional's mail client (XOAUTH2 without initial response)."""
    token = await token_for(mail, PRO[0])

    def send() -> None:
        smtp = smtp_login(mail, PRO[1], token)
        try:
            smtp.send_message(msg, to_addrs=[to])
        finally:
            smtp.quit()

    await asyncio.to_thread(send)


async def test_a_vendor_user_a_native_user_and_a_mail_professional_talk_in_one_thread(
    stack: LocalStack, mail: LocalMailSystem, http: ClientSession, native: MatrixUser
) -> None:
    starter = (await app_users_of(stack, http, "pandalab"))[0]
    ghost = f"@eimis_mssante_{PRO[0]}:{stack.synapse.server_name}"

    # The PandaLab user opens a conversation with the professional (by IDNPS) and the native user.
    title = unique("Suivi de Mme X")
    conversation = await starter.start_conversation([PRO[0], native.user_id], title)
    opener = unique("Bonjour, les résultats de Mme X sont arrivés")
    await starter.post(conversation, text=opener)
    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=30)

    # The professional finds it in their IMAP mailbox, from "<name> via EIMIS".
    (first,) = await wait_for_mail(mail, PRO, f'SUBJECT "{title}"', timeout=30)
    name, address = email.utils.parseaddr(str(first["From"]))
    # "<Given> <FAMILY> - <Profession> via EIMIS": the sender as the bridge names them.
    assert name.startswith(f"{starter.bridged_name} - ") and name.endswith(" via EIMIS"), name
    assert address == BRIDGE_BOX[1]
    assert opener in first.get_body(("plain",)).get_content()
    reply_to = email.utils.parseaddr(str(first["Reply-To"]))[1]
    assert reply_to.startswith("eimis+") and reply_to.endswith(f"@{OP1}")

    # They answer from their mail client, to the Reply-To address.
    answer_text = unique("Merci, je passe voir Mme X demain")
    answer = email.message.EmailMessage()
    answer["From"], answer["To"] = PRO[1], reply_to
    answer["Subject"] = f"Re: {first['Subject']}"
    answer["Message-ID"] = email.utils.make_msgid(domain=OP2)
    answer["In-Reply-To"] = answer["References"] = first["Message-ID"]
    answer.set_content(f"{answer_text}\n")
    await reply_as_professional(mail, reply_to, answer)

    # The native user and the PandaLab user each see it once, from the professional's ghost.
    seen = await native.wait_for_message(
        room_id, lambda e: getattr(e, "body", "").strip() == answer_text, 30
    )
    assert seen.sender == ghost
    state = await member_state(native, room_id, ghost)
    assert state["displayname"] == PRO_GHOST_NAME

    async def at_starter() -> list[dict[str, Any]]:
        return [m for m in await starter.inbox() if m["text"].strip() == answer_text]

    (at_vendor,) = await wait_until(at_starter, 30, "the reply at PandaLab")
    assert at_vendor["sender"] == PRO[0]
    assert at_vendor["sender_name"] == PRO_GHOST_NAME

    # The native user writes: the professional receives it in the same thread.
    follow_up = unique("Je serai aussi present demain matin")
    await native.send_text(room_id, follow_up)
    (second,) = await wait_for_mail(mail, PRO, f'BODY "{follow_up}"', timeout=30)
    assert second["In-Reply-To"] is not None
    thread_ids = str(second["References"]).split()
    assert first["Message-ID"] in thread_ids and answer["Message-ID"] in thread_ids
    assert str(second["Subject"]).startswith("Re: ")
    assert follow_up in second.get_body(("plain",)).get_content()

    # Once each: the mailbox got exactly the two mails, the vendor and Matrix the reply once.
    assert len(await at_starter()) == 1
    assert [
        e for e in native.messages(room_id) if getattr(e, "body", "").strip() == answer_text
    ] == [seen]
