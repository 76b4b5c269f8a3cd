"""End to end, nothing a native Matrix user sends is dropped silently: a poll reaches a
PandaLab-style user as readable text with numbered answers and a vote follows as text, a sticker
reaches them as an image, a reaction reaches a Medipeps-style user (no reactions there) as a
French sentence, and an event of a type no vendor can take gets a FAIL send status with a reason
in French. The portals are encrypted (the product's default) and the native user is
matrix-nio with encryption on, so every event here reaches the bridge as ciphertext.

Unit level: tests/unit/test_nothing_dropped.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    PNG,
    ThreeWay,
    app_users_of,
    counter,
    encrypted_native,
    file_named,
    inbox_message,
    portal_of,
    send_status,
    unique,
    vendor_copy,
)
from helpers import wait_until
from synapse_db import event_types_in_room

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    overrides = {
        "encryption": {"enabled": True, "default": True},
        "delivery": {"success_statuses": True},
    }
    async with LocalStack(
        Path(tmp_path_factory.mktemp("nothing_dropped")), encrypted=True, config_overrides=overrides
    ) as local:
        yield local


@pytest.fixture
async def trio(stack: LocalStack, http: ClientSession, tmp_path: Path) -> AsyncIterator[ThreeWay]:
    """A PandaLab-style user opened an encrypted conversation with a Medipeps-style user and a
    native user whose device encrypts."""
    async with await encrypted_native(stack, tmp_path, "poll") as native:
        n = next(counter)
        first = (await app_users_of(stack, http, "pandalab"))[n % 5]
        second = (await app_users_of(stack, http, "medipeps"))[n % 5]
        conversation = await first.start_conversation(
            [second.idnps, native.user_id], unique("Sondages")
        )
        hello = unique("Bonjour")
        await first.post(conversation, text=hello)
        room_id = await portal_of(stack, "pandalab", conversation)
        await native.accept_invites(room_id, timeout=30)
        await native.wait_for_event(
            room_id, lambda e: (e.get("content") or {}).get("body") == hello, 30
        )
        at_other = await wait_until(
            lambda: inbox_message(second, lambda m: m["text"] == hello), 30, "the opener"
        )
        yield ThreeWay(
            first, conversation, second, str(at_other["conversation_id"]), native, room_id, stack
        )


def unescaped(text: str) -> str:
    """A PandaLab message's text as its Markdown shows it."""
    return text.replace("\\", "")


async def test_a_poll_reaches_a_vendor_as_numbered_text_and_a_vote_follows(
    trio: ThreeWay,
) -> None:
    question = unique("Réunion de service")
    poll_id = await trio.native.send(
        trio.room_id,
        "org.matrix.msc3381.poll.start",
        {
            "org.matrix.msc3381.poll.start": {
                "kind": "org.matrix.msc3381.poll.disclosed",
                "max_selections": 1,
                "question": {"org.matrix.msc1767.text": question},
                "answers": [
                    {"id": "mon", "org.matrix.msc1767.text": "Lundi"},
                    {"id": "tue", "org.matrix.msc1767.text": "Mardi"},
                ],
            },
            "org.matrix.msc1767.text": f"{question}\n1. Lundi\n2. Mardi",
        },
    )
    at_alice = await vendor_copy(trio.starter, lambda m: question in unescaped(m["text"]))
    assert unescaped(at_alice["text"]) == f"Sondage : {question}\n1. Lundi\n2. Mardi"
    status = await send_status(trio, poll_id, "pandalab")
    assert status["status"] == "SUCCESS" and "sondage" in status["message"]

    await trio.native.send(
        trio.room_id,
        "org.matrix.msc3381.poll.response",
        {
            "m.relates_to": {"rel_type": "m.reference", "event_id": poll_id},
            "org.matrix.msc3381.poll.response": {"answers": ["tue"]},
        },
    )
    vote = await vendor_copy(
        trio.starter, lambda m: f"a répondu : Mardi (sondage : {question})" in unescaped(m["text"])
    )
    assert vote["conversation_id"] == trio.starter_conv
    as_text = f"Sondage : {question}\n1. Lundi\n2. Mardi"
    await vendor_copy(trio.other, lambda m: m["text"] == as_text)  # plain text at Medipeps
    await vendor_copy(trio.other, lambda m: "a répondu : Mardi" in m["text"])

    await trio.native.send(
        trio.room_id,
        "org.matrix.msc3381.poll.end",
        {
            "m.relates_to": {"rel_type": "m.reference", "event_id": poll_id},
            "org.matrix.msc3381.poll.end": {},
            "org.matrix.msc1767.text": "Réponse retenue : Mardi",
        },
    )
    end = await vendor_copy(
        trio.starter, lambda m: unescaped(m["text"]).startswith(f"Sondage clos : {question}")
    )
    assert unescaped(end["text"]).endswith("Réponse retenue : Mardi")
    types = event_types_in_room(trio.stack.synapse, trio.room_id)
    assert "m.room.encrypted" in types and not any("poll" in t for t in types)


async def test_a_sticker_reaches_a_vendor_as_an_image(trio: ThreeWay) -> None:
    name = f"pouce-{next(counter)}.png"
    mxc = await trio.native.upload(PNG, "image/png", name)
    event_id = await trio.native.send(
        trio.room_id,
        "m.sticker",
        {"body": name, "url": mxc, "info": {"mimetype": "image/png", "size": len(PNG)}},
    )
    at_alice = await vendor_copy(trio.starter, file_named(name))
    assert at_alice["attachment"]["mime_type"] == "image/png"
    assert await trio.starter.download(at_alice["attachment"]["file_id"]) == PNG
    status = await send_status(trio, event_id, "pandalab")
    assert status["status"] == "SUCCESS" and "image" in status["message"]


async def test_an_event_no_vendor_can_take_gets_a_fail_status_in_french(trio: ThreeWay) -> None:
    event_id = await trio.native.send(trio.room_id, "com.example.vital_signs", {"pulse": 72})
    status = await send_status(trio, event_id, "eimis-bridge")
    assert status["status"] == "FAIL_PERMANENT"
    assert status["reason"] == "m_unsupported"
    assert status["message"] == (
        "ce type de contenu (com.example.vital_signs) ne peut pas être transmis "
        "aux autres participants"
    )
    # Nothing of it reached a vendor: a later message arrives, and nothing came before it.
    marker = unique("Après")
    await trio.native.send(trio.room_id, "m.room.message", {"msgtype": "m.text", "body": marker})
    await vendor_copy(trio.starter, lambda m: marker in m["text"])
    texts = [m["text"] for m in await trio.starter.inbox()]
    assert not any("vital_signs" in t or "pulse" in t for t in texts)
    notice = await trio.native.wait_for_event(
        trio.room_id,
        lambda e: "com.example.vital_signs" in (e.get("content") or {}).get("body", ""),
        30,
    )
    assert notice["content"]["body"].startswith("Un événement n'a pas été transmis hors de Matrix")


async def test_a_reaction_reaches_a_vendor_without_reactions_as_a_french_sentence(
    trio: ThreeWay,
) -> None:
    text = unique("Bilan normal")
    await trio.other.post(trio.other_conv, text=text)
    event = await trio.native.wait_for_event(
        trio.room_id, lambda e: (e.get("content") or {}).get("body") == text, 30
    )
    reaction_id = await trio.native.send(
        trio.room_id,
        "m.reaction",
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": event["event_id"], "key": "👍"}},
    )
    at_medipeps = await vendor_copy(trio.other, lambda m: m["text"].endswith(" a réagi avec 👍"))
    assert at_medipeps["conversation_id"] == trio.other_conv
    assert at_medipeps["text"].removesuffix(" a réagi avec 👍").strip()  # the native's name
    status = await send_status(trio, reaction_id, "medipeps")
    assert status["status"] == "SUCCESS"
    assert (
        status["message"] == "medipeps n'a pas de réactions : envoyée sous forme de court message"
    )
