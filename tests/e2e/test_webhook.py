"""End to end through a real Synapse: a vendor plugged in through the webhook contract talks with
a PandaLab-style user and a native Matrix user.

The webhook vendor is the third sandbox (connectors/webhook/sandbox.py), which knows the bridge
only through openapi.yaml. Each test opens a fresh three-way conversation: a webhook-vendor user
starts it with a PandaLab user and a native Matrix user, so every feature is seen from all three
sides; each message must arrive once, in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    PNG,
    AppUser,
    ThreeWay,
    app_users_of,
    body_is,
    counter,
    edit_content,
    edit_of,
    file_named,
    published_capabilities,
    reaction_content,
    redaction_of,
    relation,
    reply_content,
    three_way,
    unique,
    vendor_copy,
)
from helpers import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    # Plain successes are reported too, so the webhook vendor's users see "delivered".
    async with LocalStack(
        Path(tmp_path_factory.mktemp("webhook")),
        config_overrides={"delivery": {"success_statuses": True}},
    ) as local:
        yield local


class Trio(ThreeWay):
    """Wendy (on the webhook vendor) opened it with Paul (PandaLab-style) and a native user."""

    wendy = property(lambda self: self.starter)
    wendy_conv = property(lambda self: self.starter_conv)
    paul = property(lambda self: self.other)
    paul_conv = property(lambda self: self.other_conv)


@pytest.fixture
async def trio(stack: LocalStack, http: ClientSession) -> AsyncIterator[Trio]:
    opener = "Bonjour de la part du webhook"
    async with three_way(stack, http, "webhook", "pandalab", "Webhook", opener) as found:
        yield Trio(**vars(found))


async def test_text_and_markdown_cross_every_way_once_and_in_order(trio: Trio) -> None:
    texts = [unique("Patient chambre 4"), unique("**Tension** 14/9"), unique("À revoir demain")]
    for text in texts:
        await trio.wendy.post(trio.wendy_conv, text=text)

    async def all_at(user: AppUser) -> list[str] | None:
        mine = [m["text"] for m in await user.inbox() if m["text"] in texts]
        return mine if len(mine) >= len(texts) else None

    assert await wait_until(lambda: all_at(trio.paul), 30, "all three at PandaLab") == texts
    events = [await trio.native.wait_for_event(trio.room_id, body_is(t), 30) for t in texts]
    bold = events[1]["content"]
    assert "<strong>Tension</strong>" in bold["formatted_body"]
    assert [e["sender"] for e in events] == [trio.ghost(trio.wendy, "webhook")] * 3
    timeline = [e["event_id"] for e in trio.native.events(trio.room_id)]
    assert [timeline.index(e["event_id"]) for e in events] == sorted(
        timeline.index(e["event_id"]) for e in events
    )

    from_paul = unique("Je passe à 15 h")
    await trio.paul.post(trio.paul_conv, text=from_paul)
    # Matrix orders the room: the native user answers once Paul's message is in it.
    await trio.native.wait_for_event(trio.room_id, body_is(from_paul), 30)
    from_native = unique("Ordonnance prête")
    await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": from_native,
            "format": "org.matrix.custom.html",
            "formatted_body": f"<em>{from_native}</em>",
        },
    )

    async def replies() -> list[dict[str, Any]] | None:
        mine = [
            m
            for m in await trio.wendy.inbox()
            if from_paul in m["text"] or from_native in m["text"]
        ]
        return mine if len(mine) >= 2 else None

    got = await wait_until(replies, 30, "both replies at the webhook vendor")
    assert [m["sender"] for m in got] == [trio.paul.idnps, trio.native.user_id]
    assert got[0]["text"] == from_paul and got[1]["text"] == f"*{from_native}*"
    assert got[0]["sender_name"].startswith(trio.paul.bridged_name)
    # Once each, everywhere.
    assert [m["text"] for m in await trio.wendy.inbox()].count(from_paul) == 1
    assert [m["text"] for m in await trio.paul.inbox()].count(texts[0]) == 1


async def test_files_cross_both_ways_byte_for_byte(trio: Trio) -> None:
    name = f"ecg-{next(counter)}.pdf"
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 2000
    file_id = await trio.wendy.upload(pdf, "application/pdf", name)
    await trio.wendy.post(trio.wendy_conv, text="", file_id=file_id)
    event = await trio.native.wait_for_event(trio.room_id, body_is(name), 30)
    assert event["content"]["msgtype"] == "m.file"
    assert await trio.native.download(event["content"]["url"]) == pdf
    at_paul = await vendor_copy(trio.paul, file_named(name))
    assert await trio.paul.download(at_paul["attachment"]["file_id"]) == pdf

    image = f"plaie-{next(counter)}.png"
    mxc = await trio.native.upload(PNG, "image/png", image)
    await trio.native.send(
        trio.room_id,
        "m.room.message",
        {"msgtype": "m.image", "body": image, "url": mxc, "info": {"mimetype": "image/png"}},
    )
    at_wendy = await vendor_copy(trio.wendy, file_named(image))
    assert at_wendy["attachment"]["mime_type"] == "image/png"
    assert await trio.wendy.download(at_wendy["attachment"]["file_id"]) == PNG

    photo = f"photo-{next(counter)}.png"
    file_id = await trio.paul.upload(PNG, "image/png", photo)
    await trio.paul.post(trio.paul_conv, text="", file_id=file_id)
    at_wendy = await vendor_copy(trio.wendy, file_named(photo))
    assert await trio.wendy.download(at_wendy["attachment"]["file_id"]) == PNG


async def test_replies_keep_their_target_in_every_direction(trio: Trio) -> None:
    question = unique("Quelle posologie ?")
    question_id = await trio.wendy.post(trio.wendy_conv, text=question)
    asked = await trio.native.wait_for_event(trio.room_id, body_is(question), 30)
    answer = unique("5 mg matin et soir")
    await trio.native.send(
        trio.room_id,
        "m.room.message",
        reply_content(answer, asked["event_id"]),
    )
    at_wendy = await vendor_copy(trio.wendy, lambda m: m["text"] == answer)
    assert at_wendy["reply_to"] == question_id
    at_paul = await vendor_copy(trio.paul, lambda m: m["text"] == answer)
    paul_question = await vendor_copy(trio.paul, lambda m: m["text"] == question)
    assert at_paul["reply_to"] == paul_question["message_id"]

    thanks = unique("Merci")
    await trio.wendy.post(trio.wendy_conv, text=thanks, reply_to=at_wendy["message_id"])
    event = await trio.native.wait_for_event(trio.room_id, body_is(thanks), 30)
    answered = await trio.native.wait_for_event(trio.room_id, body_is(answer), 30)
    assert event["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == answered["event_id"]


async def test_edits_and_deletions_cross_both_ways(trio: Trio) -> None:
    typo = unique("RDV mardi")
    message_id = await trio.wendy.post(trio.wendy_conv, text=typo)
    sent = await trio.native.wait_for_event(trio.room_id, body_is(typo), 30)
    at_paul = await vendor_copy(trio.paul, lambda m: m["text"] == typo)
    fixed = unique("RDV mercredi")
    await trio.wendy.edit(trio.wendy_conv, message_id, fixed)
    replaced = await trio.native.wait_for_event(
        trio.room_id,
        edit_of(sent["event_id"], fixed),
        30,
    )
    assert replaced["content"]["m.relates_to"]["rel_type"] == "m.replace"

    async def edited_at_paul() -> bool:
        message = await trio.paul.message(trio.paul_conv, at_paul["message_id"])
        return bool(message and message["edited"] and message["text"] == fixed)

    await wait_until(edited_at_paul, 30, "the edit at PandaLab")

    original = unique("Dose 50 mg")
    event_id = await trio.native.send(
        trio.room_id, "m.room.message", {"msgtype": "m.text", "body": original}
    )
    copy = await vendor_copy(trio.wendy, lambda m: m["text"] == original)
    corrected = unique("Dose 5 mg")
    await trio.native.send(
        trio.room_id,
        "m.room.message",
        edit_content(event_id, corrected),
    )

    async def edited_at_wendy() -> bool:
        message = await trio.wendy.message(trio.wendy_conv, copy["message_id"])
        return bool(message and message["edited"] and message["text"] == corrected)

    await wait_until(edited_at_wendy, 30, "the Matrix edit at the webhook vendor")

    await trio.wendy.delete(trio.wendy_conv, message_id)
    await trio.native.wait_for_event(
        trio.room_id,
        redaction_of(sent["event_id"]),
        30,
    )

    async def deleted_at_paul() -> bool:
        message = await trio.paul.message(trio.paul_conv, at_paul["message_id"])
        return bool(message and message["deleted"])

    await wait_until(deleted_at_paul, 30, "the deletion at PandaLab")

    await trio.native.redact(trio.room_id, event_id)

    async def deleted_at_wendy() -> bool:
        message = await trio.wendy.message(trio.wendy_conv, copy["message_id"])
        return bool(message and message["deleted"])

    await wait_until(deleted_at_wendy, 30, "the Matrix deletion at the webhook vendor")


async def test_reactions_cross_both_ways(trio: Trio) -> None:
    text = unique("Résultats normaux")
    message_id = await trio.wendy.post(trio.wendy_conv, text=text)
    event = await trio.native.wait_for_event(trio.room_id, body_is(text), 30)
    reaction_id = await trio.native.send(
        trio.room_id,
        "m.reaction",
        reaction_content(event["event_id"], "👍"),
    )

    async def reactions() -> list[dict[str, Any]]:
        message = await trio.wendy.message(trio.wendy_conv, message_id)
        return list((message or {}).get("reactions", []))

    async def reacted() -> bool:
        return any(
            r["emoji"] == "👍" and r["sender"] == trio.native.user_id for r in await reactions()
        )

    await wait_until(reacted, 30, "the Matrix reaction at the webhook vendor")
    await trio.native.redact(trio.room_id, reaction_id)

    async def unreacted() -> bool:
        return not await reactions()

    await wait_until(unreacted, 30, "the reaction removed at the webhook vendor")

    theirs = await trio.wendy.react(trio.wendy_conv, message_id, "❤️")
    reaction = await trio.native.wait_for_event(
        trio.room_id,
        lambda e: (
            e.get("type") == "m.reaction"
            and relation(e).get("event_id") == event["event_id"]
            and relation(e).get("key") == "❤️"
        ),
        30,
    )
    assert reaction["sender"] == trio.ghost(trio.wendy, "webhook")
    at_paul = await vendor_copy(trio.paul, lambda m: m["text"] == text)

    async def at_pandalab() -> bool:
        message = await trio.paul.message(trio.paul_conv, at_paul["message_id"])
        return any(r["emoji"] == "❤️" for r in (message or {}).get("reactions", []))

    await wait_until(at_pandalab, 30, "the webhook vendor's reaction at PandaLab")
    await trio.wendy.unreact(trio.wendy_conv, message_id, theirs)
    await trio.native.wait_for_event(
        trio.room_id,
        redaction_of(reaction["event_id"]),
        30,
    )


async def test_read_receipts_and_typing_cross_both_ways(trio: Trio) -> None:
    text = unique("À lire")
    message_id = await trio.wendy.post(trio.wendy_conv, text=text)
    event = await trio.native.wait_for_event(trio.room_id, body_is(text), 30)
    await trio.native.read_receipt(trio.room_id, event["event_id"])

    async def marked() -> bool:
        view = await trio.wendy.conversation(trio.wendy_conv)
        return view["read_up_to"].get(trio.native.user_id) == message_id

    await wait_until(marked, 30, "the read marker at the webhook vendor")

    from_native = unique("Lu ?")
    await trio.native.send_text(trio.room_id, from_native)
    copy = await vendor_copy(trio.wendy, lambda m: m["text"] == from_native)
    await trio.wendy.read(trio.wendy_conv, copy["message_id"])
    ghost = trio.ghost(trio.wendy, "webhook")
    sent = await trio.native.wait_for_event(trio.room_id, body_is(from_native), 30)
    await trio.native.wait_for_ephemeral(
        trio.room_id,
        lambda e: (
            e.get("type") == "m.receipt"
            and ghost in ((e["content"].get(sent["event_id"]) or {}).get("m.read") or {})
        ),
        30,
    )

    await trio.native.typing(trio.room_id, True)

    async def typing_at_wendy() -> bool:
        view = await trio.wendy.conversation(trio.wendy_conv)
        return trio.native.user_id in view["typing"]

    await wait_until(typing_at_wendy, 30, "typing at the webhook vendor")
    await trio.wendy.type(trio.wendy_conv, True)
    await trio.native.wait_for_ephemeral(
        trio.room_id,
        lambda e: e.get("type") == "m.typing" and ghost in e["content"].get("user_ids", []),
        30,
    )


async def test_the_webhook_vendor_is_told_what_became_of_its_messages(
    trio: Trio, stack: LocalStack, http: ClientSession
) -> None:
    text = unique("Confirmez-vous ?")
    message_id = await trio.wendy.post(trio.wendy_conv, text=text)

    async def reports() -> list[dict[str, Any]] | None:
        message = await trio.wendy.message(trio.wendy_conv, message_id)
        return list((message or {}).get("delivery") or []) or None

    got = await wait_until(reports, 30, "a delivery report at the webhook vendor")
    assert got[0]["status"] == "delivered"

    # A file the Medipeps-style vendor refuses (video): its sender is told, naming the vendor.
    mona = (await app_users_of(stack, http, "medipeps"))[next(counter) % 5]
    conv = await trio.wendy.start_conversation([mona.idnps], unique("Vidéo"))
    name = f"geste-{next(counter)}.mp4"
    file_id = await trio.wendy.upload(b"\x00\x00\x00\x18ftypmp42" * 50, "video/mp4", name)
    video_id = await trio.wendy.post(conv, text="", file_id=file_id)

    async def failed() -> list[dict[str, Any]] | None:
        message = await trio.wendy.message(conv, video_id)
        bad = [r for r in (message or {}).get("delivery") or [] if r["status"] == "failed"]
        return bad or None

    refused = await wait_until(failed, 30, "a failed delivery report at the webhook vendor")
    assert "medipeps" in refused[0]["detail"] and "video/mp4" in refused[0]["detail"]


async def test_portal_publishes_what_the_webhook_vendor_declared(
    trio: Trio, http: ClientSession
) -> None:
    token = trio.native.client.access_token
    published = await published_capabilities(trio.stack, http, trio.room_id, token)
    assert published["webhook"]["formatting"] == "markdown"
    assert published["webhook"]["max_text_length"] == 8000
    assert published["webhook"]["reactions"] is True
