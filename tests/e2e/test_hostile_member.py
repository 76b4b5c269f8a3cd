"""End to end through a real Synapse: a hostile Matrix member may say only what Matrix lets them.

Encrypted portals, native users on matrix-nio with encryption. A member (Mallory) tries what no
Matrix client would show: editing someone else's message, a "redaction" hidden in ciphertext,
relations pointing into another portal. Each is refused: nothing reaches the vendor, Mallory
gets a FAIL send status with a reason in French, and the conversation goes on (a later message
arrives, in order). What the rules allow still passes: one's own edit, a moderator's redaction,
a reply to an event the vendor never had (sent without the quote).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    AppUser,
    app_users_of,
    body_is,
    counter,
    edit_content,
    encrypted_native,
    portal_of,
    reaction_content,
    received,
    reply_content,
    unique,
    vendor_copy,
)
from helpers import wait_until
from matrix_user import MatrixUser

pytestmark = pytest.mark.e2e

SEND_STATUS = "com.beeper.message_send_status"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    overrides = {"encryption": {"enabled": True, "default": True}}
    async with LocalStack(
        Path(tmp_path_factory.mktemp("hostile")), encrypted=True, config_overrides=overrides
    ) as local:
        yield local


@dataclass
class Ward:
    """A PandaLab user (Alice) opened an encrypted conversation with two native users: Carol,
    a colleague, and Mallory, a hostile member (power level 0, like everyone in a portal)."""

    alice: AppUser
    conv: str
    room_id: str
    carol: MatrixUser
    mallory: MatrixUser


@contextlib.asynccontextmanager
async def ward(
    stack: LocalStack, http: ClientSession, stores: Path, alice: AppUser | None = None
) -> AsyncIterator[Ward]:
    async with (
        await encrypted_native(stack, stores, "carol") as carol,
        await encrypted_native(stack, stores, "mallory") as mallory,
    ):
        n = next(counter)
        alice = alice or (await app_users_of(stack, http, "pandalab"))[n % 5]
        conv = await alice.start_conversation([carol.user_id, mallory.user_id], unique("Service"))
        hello = unique("Bonjour à tous")
        await alice.post(conv, text=hello)
        room_id = await portal_of(stack, "pandalab", conv)
        for native in (carol, mallory):
            await native.accept_invites(room_id, timeout=30)
            await native.wait_for_event(room_id, body_is(hello), 30)
        yield Ward(alice, conv, room_id, carol, mallory)


async def status_of(
    native: MatrixUser, room_id: str, event_id: str, outcome: str = "SUCCESS"
) -> dict[str, Any]:
    """The send status (``outcome``) the bridge sends about ``event_id``: its content."""

    def match(event: dict[str, Any]) -> bool:
        content = event.get("content") or {}
        return (
            event.get("type") == SEND_STATUS
            and (content.get("m.relates_to") or {}).get("event_id") == event_id
            and content.get("status") == outcome
        )

    return dict((await native.wait_for_event(room_id, match, 60))["content"])


async def refused(native: MatrixUser, room_id: str, event_id: str) -> dict[str, Any]:
    """The FAIL status the bridge sends about a refused event (its content)."""
    status = await status_of(native, room_id, event_id, "FAIL_PERMANENT")
    assert status["reason"] == "m_no_permission"
    return status


async def goes_on(ward: Ward, *earlier: str) -> None:
    """Mallory's next ordinary message still reaches Alice, after ``earlier`` (in order): the
    refused events before it were processed (the room's events are handled in order) and
    held nothing up."""
    later = unique("Message suivant")
    await ward.mallory.send_text(ward.room_id, later)
    await wait_until(lambda: received(ward.alice, later), 60, "the next message at PandaLab")
    texts = [m["text"] for m in await ward.alice.inbox() if m["text"] in (*earlier, later)]
    assert texts == [*earlier, later]


async def copy_of(user: AppUser, conv: str, message_id: str) -> dict[str, Any]:
    message = await user.message(conv, message_id)
    assert message is not None
    return message


async def forge(native: MatrixUser, room_id: str, event_type: str, content: dict[str, Any]) -> str:
    """Send an encrypted event whose relation is inside the ciphertext only (as a modified
    client can): the homeserver cannot check it, only the bridge, once decrypted."""
    await native.send_text(room_id, unique("Préparation"))  # the room key is shared
    client = native.client
    _, encrypted = client.encrypt(room_id, event_type, content)
    encrypted.pop("m.relates_to", None)
    url = (
        f"{client.homeserver}/_matrix/client/v3/rooms/{room_id}/send/m.room.encrypted/"
        f"forged{next(counter)}"
    )
    headers = {"Authorization": f"Bearer {client.access_token}"}
    async with ClientSession() as http, http.put(url, json=encrypted, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["event_id"])


# --- Edits -----------------------------------------------------------------------------------


async def test_only_the_author_may_edit_a_message(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    async with ward(stack, http, tmp_path) as w:
        allergy = unique("Allergie : pénicilline")
        allergy_id = await w.alice.post(w.conv, text=allergy)
        at_matrix = await w.mallory.wait_for_event(w.room_id, body_is(allergy), 30)

        # Mallory rewrites Alice's (a vendor user's) message: refused, Alice's copy unchanged.
        forged = await w.mallory.send(
            w.room_id, "m.room.message", edit_content(at_matrix["event_id"], "Allergie : aucune")
        )
        status = await refused(w.mallory, w.room_id, forged)
        assert "auteur" in status["message"]

        # ... and Carol's (another native user's) message.
        dose = unique("Dose 50 mg")
        dose_id = await w.carol.send_text(w.room_id, dose)
        dose_at_alice = await vendor_copy(w.alice, lambda m: m["text"] == dose)
        forged = await w.mallory.send(
            w.room_id, "m.room.message", edit_content(dose_id, "Dose 500 mg")
        )
        await refused(w.mallory, w.room_id, forged)

        # Carol's own correction is applied as before.
        fixed = unique("Dose 5 mg")
        await w.carol.send(w.room_id, "m.room.message", edit_content(dose_id, fixed))

        async def corrected() -> bool:
            copy = await copy_of(
                w.alice, dose_at_alice["conversation_id"], dose_at_alice["message_id"]
            )
            return copy["text"] == fixed

        await wait_until(corrected, 60, "Carol's own correction at PandaLab")
        await goes_on(w, fixed)
        mine = await copy_of(w.alice, w.conv, allergy_id)
        assert mine["text"] == allergy and not mine["edited"]
        assert not any("Dose 500 mg" in t for t in [m["text"] for m in await w.alice.inbox()])


# --- Redactions ------------------------------------------------------------------------------


async def test_a_redaction_hidden_in_ciphertext_is_refused(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    async with ward(stack, http, tmp_path) as w:
        note = unique("Patient sous anticoagulants")
        note_id = await w.carol.send_text(w.room_id, note)
        at_alice = await vendor_copy(w.alice, lambda m: m["text"] == note)

        # No client encrypts a redaction (the homeserver must read it); Mallory's client does.
        forged = await w.mallory.send(w.room_id, "m.room.redaction", {"redacts": note_id})
        status = await refused(w.mallory, w.room_id, forged)
        assert "chiffr" in status["message"]
        # Nor any other type that is never encrypted: a receipt, a membership.
        receipt = await w.mallory.send(
            w.room_id, "m.receipt", {note_id: {"m.read": {w.carol.user_id: {"ts": 1}}}}
        )
        await refused(w.mallory, w.room_id, receipt)

        await goes_on(w, note)
        copy = await copy_of(w.alice, at_alice["conversation_id"], at_alice["message_id"])
        assert copy["text"] == note and not copy["deleted"]


async def test_a_moderator_may_redact_anothers_message(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    """In a room a native user created (power level 100 there), their redaction of another
    member's message is applied at the vendor."""
    alice = (await app_users_of(stack, http, "pandalab"))[next(counter) % 5]
    ghost = f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"
    async with (
        await encrypted_native(stack, tmp_path, "cadre") as moderator,
        await encrypted_native(stack, tmp_path, "carol") as carol,
    ):
        room_id = await moderator.create_encrypted_room(
            invite=[carol.user_id, ghost], name=unique("Staff")
        )
        await carol.accept_invites(room_id, timeout=30)
        await moderator.wait_for_join(room_id, ghost, timeout=30)
        await carol.wait_for_join(room_id, ghost, timeout=30)
        wrong = unique("Mauvais dossier")
        await carol.send_text(room_id, wrong)
        at_alice = await vendor_copy(alice, lambda m: m["text"] == wrong)
        wrong_id = (await moderator.wait_for_event(room_id, body_is(wrong), 30))["event_id"]

        await moderator.redact(room_id, wrong_id)

        async def deleted() -> bool:
            copy = await alice.message(at_alice["conversation_id"], at_alice["message_id"])
            return bool(copy and copy["deleted"])

        await wait_until(deleted, 60, "the moderator's deletion at PandaLab")


# --- Relations stay in their portal ----------------------------------------------------------


async def test_relations_into_another_portal_are_refused(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    async with ward(stack, http, tmp_path) as w:
        # Another conversation Mallory is not in, with the same PandaLab user.
        async with ward(stack, http, tmp_path / "other", alice=w.alice) as other:
            secret = unique("Résultat confidentiel")
            secret_id = await other.carol.send_text(other.room_id, secret)
            secret_at_alice = await vendor_copy(w.alice, lambda m: m["text"] == secret)
        conv, mid = secret_at_alice["conversation_id"], secret_at_alice["message_id"]

        # A reply quoting it is refused like any relation into another portal: nothing of it
        # reaches the vendor (the quote would carry the other conversation's content here).
        reply = unique("Je cite l'autre conversation")
        reply_id = await w.mallory.send(
            w.room_id, "m.room.message", reply_content(reply, secret_id)
        )
        status = await refused(w.mallory, w.room_id, reply_id)
        assert "autre conversation" in status["message"]

        forged = [
            await forge(w.mallory, w.room_id, "m.room.message", edit_content(secret_id, "Faux")),
            await forge(w.mallory, w.room_id, "m.reaction", reaction_content(secret_id, "👎")),
        ]
        for event_id in forged:
            status = await refused(w.mallory, w.room_id, event_id)
            assert "autre conversation" in status["message"]
        # A redaction of it: Synapse refuses a local client's redaction of another room's event
        # ("Cannot redact event from a different room"); one inside ciphertext is refused by the
        # bridge (over federation, the portal check is the same: tests/test_authority.py).
        redaction = await w.mallory.send(w.room_id, "m.room.redaction", {"redacts": secret_id})
        await refused(w.mallory, w.room_id, redaction)

        await goes_on(w)
        assert not await received(w.alice, reply)
        copy = await copy_of(w.alice, conv, mid)
        assert copy["text"] == secret and not copy["edited"] and not copy["deleted"]
        assert copy.get("reactions", []) == []


async def test_a_reply_to_an_unknown_event_is_delivered_without_the_quote(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    async with ward(stack, http, tmp_path) as w:
        text = unique("Réponse à un message inconnu")
        unknown = f"$unknown{next(counter)}:{stack.synapse.server_name}"
        await w.carol.send(w.room_id, "m.room.message", reply_content(text, unknown))
        at_alice = await vendor_copy(w.alice, lambda m: m["text"] == text)
        assert at_alice["reply_to"] is None
