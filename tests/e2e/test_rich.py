"""End to end, rich messages: formatting, files, replies, edits, deletions, reactions, receipts,
typing and honest degradation, between PandaLab-style, Medipeps-style and native Matrix users.

Each test opens a fresh three-way conversation (a PandaLab user starts it with a Medipeps user and
a native Matrix user), so every feature is seen from all three sides.
"""

from __future__ import annotations

import hashlib
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
    body_is,
    counter,
    edit_content,
    edit_of,
    file_named,
    published_capabilities,
    reaction_content,
    redaction_of,
    reply_content,
    send_status,
    three_way,
    unique,
    vendor_copy,
)
from helpers import wait_until

pytestmark = pytest.mark.e2e

OGG_VORBIS = b"OggS\x00\x02" + bytes(20) + b"\x01\x1e\x01vorbis" + bytes(40)
"""The first page of an Ogg Vorbis stream, as far as a file-type reader looks."""


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    # Plain successes are confirmed too here, so every test can look for its status.
    async with LocalStack(
        Path(tmp_path_factory.mktemp("rich")),
        config_overrides={"delivery": {"success_statuses": True}},
    ) as local:
        yield local


class Trio(ThreeWay):
    """Alice (PandaLab-style) opened it with Bob (Medipeps-style) and a native user."""

    alice = property(lambda self: self.starter)
    alice_conv = property(lambda self: self.starter_conv)
    bob = property(lambda self: self.other)
    bob_conv = property(lambda self: self.other_conv)


@pytest.fixture
async def trio(stack: LocalStack, http: ClientSession) -> AsyncIterator[Trio]:
    async with three_way(stack, http, "pandalab", "medipeps", "Rich", "Bonjour à tous") as found:
        yield Trio(**vars(found))


# --- Formatted text ------------------------------------------------------------------------------


async def test_matrix_html_reaches_pandalab_as_markdown_and_medipeps_as_plain_text_sanitised(
    trio: Trio,
) -> None:
    marker = unique("Dose")
    html = (
        f"<p>{marker}: <strong>5 mg</strong> <a href='https://example.org/x'>protocole</a>"
        "<script>alert(1)</script><img src='https://evil.example/t.png' onerror='x()'></p>"
    )
    event_id = await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": f"{marker}: 5 mg protocole",
            "format": "org.matrix.custom.html",
            "formatted_body": html,
        },
    )
    at_alice = await vendor_copy(trio.alice, lambda m: marker in m["text"])
    assert "**5 mg**" in at_alice["text"]
    assert "[protocole](https://example.org/x)" in at_alice["text"]
    at_bob = await vendor_copy(trio.bob, lambda m: marker in m["text"])
    assert "5 mg" in at_bob["text"] and "**" not in at_bob["text"]
    for text in (at_alice["text"], at_bob["text"]):
        assert "script" not in text and "alert" not in text and "evil.example" not in text
    assert (await send_status(trio, event_id, "pandalab"))["status"] == "SUCCESS"
    medipeps = await send_status(trio, event_id, "medipeps")
    assert medipeps["status"] == "SUCCESS" and "texte brut" in medipeps["message"]


async def test_pandalab_markdown_reaches_matrix_as_safe_html_and_medipeps_as_plain_text(
    trio: Trio,
) -> None:
    marker = unique("Consigne")
    await trio.alice.post(
        trio.alice_conv, text=f"{marker} **à jeun** <script>alert(1)</script> 🩺 مرحبا"
    )
    event = await trio.native.wait_for_event(
        trio.room_id, lambda e: marker in (e.get("content") or {}).get("body", ""), 30
    )
    html = event["content"]["formatted_body"]
    assert "<strong>à jeun</strong>" in html
    assert "<script" not in html
    assert "🩺 مرحبا" in event["content"]["body"]
    at_bob = await vendor_copy(trio.bob, lambda m: marker in m["text"])
    assert (
        "à jeun" in at_bob["text"] and "**" not in at_bob["text"] and "🩺 مرحبا" in at_bob["text"]
    )


async def test_mentions_become_pills_on_matrix_and_vendor_mentions_on_pandalab(trio: Trio) -> None:
    alice_ghost = trio.ghost(trio.alice, "pandalab")
    marker = unique("Avis")
    await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": f"{marker} Alice ?",
            "format": "org.matrix.custom.html",
            "formatted_body": f'{marker} <a href="https://matrix.to/#/{alice_ghost}">Alice</a> ?',
            "m.mentions": {"user_ids": [alice_ghost]},
        },
    )
    at_alice = await vendor_copy(trio.alice, lambda m: marker in m["text"])
    assert trio.alice.idnps in at_alice["mentions"]

    reply = unique("Vu")
    # PandaLab knows the Matrix user by their id only, so that is the name its app writes.
    await trio.alice.post(
        trio.alice_conv, text=f"@{trio.native.user_id} {reply}", mentions=[trio.native.user_id]
    )
    event = await trio.native.wait_for_event(
        trio.room_id, lambda e: reply in (e.get("content") or {}).get("body", ""), 30
    )
    assert f"https://matrix.to/#/{trio.native.user_id}" in event["content"]["formatted_body"]
    assert trio.native.user_id in event["content"]["m.mentions"]["user_ids"]


# --- Message types -------------------------------------------------------------------------------


async def test_notice_emote_and_location_map_or_fall_back_readably(trio: Trio) -> None:
    emote = unique("signe l'ordonnance")
    await trio.native.send(trio.room_id, "m.room.message", {"msgtype": "m.emote", "body": emote})
    at_alice = await vendor_copy(trio.alice, lambda m: emote in m["text"])
    assert at_alice["kind"] == "emote"
    at_bob = await vendor_copy(trio.bob, lambda m: emote in m["text"])
    assert at_bob["text"].startswith("* ") and at_bob["text"].endswith(emote)

    place = unique("Service de cardiologie")
    event_id = await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.location",
            "body": place,
            "geo_uri": "geo:48.8566,2.3522",
        },
    )
    at_alice = await vendor_copy(
        trio.alice, lambda m: (m.get("location") or {}).get("label") == place
    )
    assert at_alice["location"]["lat"] == pytest.approx(48.8566)
    at_bob = await vendor_copy(trio.bob, lambda m: place in m["text"])
    assert "geo:48.8566,2.3522" in at_bob["text"]
    assert "lien vers une carte" in (await send_status(trio, event_id, "medipeps"))["message"]

    pin = unique("Point de rendez-vous")
    await trio.alice.post(
        trio.alice_conv, text="", location={"lat": 45.76, "lon": 4.84, "label": pin}
    )
    event = await trio.native.wait_for_event(trio.room_id, body_is(pin), 30)
    assert event["content"]["msgtype"] == "m.location"
    assert event["content"]["geo_uri"].startswith("geo:45.76,4.84")


async def test_unknown_message_types_and_empty_messages_are_handled_and_reported(
    trio: Trio,
) -> None:
    custom = unique("Contenu d'un type inconnu")
    event_id = await trio.native.send(
        trio.room_id, "m.room.message", {"msgtype": "org.example.custom", "body": custom}
    )
    await vendor_copy(trio.alice, lambda m: m["text"] == custom)
    assert "org.example.custom" in (await send_status(trio, event_id, "pandalab"))["message"]

    empty = await trio.native.send(
        trio.room_id, "m.room.message", {"msgtype": "m.text", "body": ""}
    )
    status = await send_status(trio, empty, "pandalab")
    assert status["status"] == "FAIL_PERMANENT" and "vide" in status["message"]


async def test_text_over_medipeps_limit_is_split_in_order_and_the_sender_told(trio: Trio) -> None:
    marker = unique("Compte rendu")
    paragraphs = [f"{marker} §{i} " + "x" * 900 for i in range(6)]  # ~5,500 characters
    text = "\n\n".join(paragraphs)
    event_id = await trio.native.send(
        trio.room_id, "m.room.message", {"msgtype": "m.text", "body": text}
    )

    async def parts() -> list[str] | None:
        mine = [m["text"] for m in await trio.bob.inbox() if marker in m["text"]]
        return mine if sum(len(p) for p in mine) >= len(text) - 10 else None

    received = await wait_until(parts, 30, "every part at Medipeps")
    assert len(received) == 2 and all(len(p) <= 4000 for p in received)
    assert "§0" in received[0] and "§5" in received[1]
    assert "découpé en 2" in (await send_status(trio, event_id, "medipeps"))["message"]
    whole = await vendor_copy(trio.alice, lambda m: marker in m["text"])
    assert len(whole["text"]) >= len(text) - 10


# --- Files ---------------------------------------------------------------------------------------


async def test_matrix_image_reaches_both_vendors_byte_for_byte(trio: Trio) -> None:
    name = f"plaie-{next(counter)}.png"
    mxc = await trio.native.upload(PNG, "image/png", name)
    event_id = await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.image",
            "body": name,
            "url": mxc,
            "info": {"mimetype": "image/png", "size": len(PNG)},
        },
    )
    for user in (trio.alice, trio.bob):
        message = await vendor_copy(user, file_named(name))
        assert await user.download(message["attachment"]["file_id"]) == PNG
    assert (await send_status(trio, event_id, "medipeps"))["status"] == "SUCCESS"


async def test_file_over_a_vendor_limit_or_of_a_forbidden_type_is_refused_with_a_reason(
    trio: Trio,
) -> None:
    # A little over 2 MiB, a PDF by its first bytes (the bridge reads types from the content).
    big = b"%PDF-1.4\n" + bytes(range(256)) * (2 * 1024 * 1024 // 256 + 1)
    name = f"bilan-{next(counter)}.pdf"
    mxc = await trio.native.upload(big, "application/pdf", name)
    event_id = await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.file",
            "body": name,
            "url": mxc,
            "info": {"mimetype": "application/pdf", "size": len(big)},
        },
    )
    at_alice = await vendor_copy(trio.alice, file_named(name))
    got = await trio.alice.download(at_alice["attachment"]["file_id"])
    assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    refused = await send_status(trio, event_id, "medipeps")
    assert refused["status"] == "FAIL_PERMANENT" and "Mio" in refused["message"]
    await trio.native.wait_for_event(
        trio.room_id,
        lambda e: "n'a pas pu être remis à medipeps" in (e.get("content") or {}).get("body", ""),
    )

    exe = f"outil-{next(counter)}.exe"
    mxc = await trio.native.upload(b"MZ\x90\x00", "application/x-msdownload", exe)
    event_id = await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.file",
            "body": exe,
            "url": mxc,
            "info": {"mimetype": "application/x-msdownload", "size": 4},
        },
    )
    for network in ("pandalab", "medipeps"):
        status = await send_status(trio, event_id, network)
        assert status["status"] == "FAIL_PERMANENT" and "ne sont pas autorisés" in status["message"]


async def test_vendor_files_reach_matrix_through_authenticated_media(trio: Trio) -> None:
    name = f"ecg-{next(counter)}.pdf"
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 4000
    file_id = await trio.alice.upload(pdf, "application/pdf", name)
    await trio.alice.post(trio.alice_conv, text="", file_id=file_id)
    event = await trio.native.wait_for_event(trio.room_id, body_is(name), 30)
    assert event["content"]["msgtype"] == "m.file"
    assert await trio.native.download(event["content"]["url"]) == pdf

    image = f"photo-{next(counter)}.png"
    file_id = await trio.bob.upload(PNG, "image/png", image)
    await trio.bob.post(trio.bob_conv, text="", file_id=file_id)
    event = await trio.native.wait_for_event(trio.room_id, body_is(image), 30)
    assert event["content"]["msgtype"] == "m.image"
    assert await trio.native.download(event["content"]["url"]) == PNG
    # ... and on to the other vendor, through Matrix.
    at_alice = await vendor_copy(trio.alice, file_named(image))
    assert await trio.alice.download(at_alice["attachment"]["file_id"]) == PNG


async def test_vendor_file_refused_by_the_other_vendor_is_reported_to_its_sender(
    trio: Trio,
) -> None:
    name = f"video-{next(counter)}.mp4"
    file_id = await trio.alice.upload(b"\x00\x00\x00\x18ftypmp42" * 100, "video/mp4", name)
    message_id = await trio.alice.post(trio.alice_conv, text="", file_id=file_id)

    async def failed() -> list[dict[str, Any]] | None:
        message = await trio.alice.message(trio.alice_conv, message_id)
        reports = (message or {}).get("delivery") or []
        bad = [r for r in reports if r["status"] == "failed" and "medipeps" in r["detail"]]
        return bad or None

    reports = await wait_until(failed, 30, "a failed delivery report at PandaLab")
    assert "video/mp4" in reports[0]["detail"]


# --- Replies, edits, deletions, reactions --------------------------------------------------------


async def test_replies_keep_their_target_in_every_direction(trio: Trio) -> None:
    question = unique("Quelle posologie ?")
    question_id = await trio.alice.post(trio.alice_conv, text=question)
    asked = await trio.native.wait_for_event(trio.room_id, body_is(question), 30)

    answer = unique("5 mg matin et soir")
    await trio.native.send(
        trio.room_id,
        "m.room.message",
        reply_content(answer, asked["event_id"]),
    )
    at_alice = await vendor_copy(trio.alice, lambda m: m["text"] == answer)
    assert at_alice["reply_to"] == question_id
    at_bob = await vendor_copy(trio.bob, lambda m: m["text"] == answer)
    bob_question = await vendor_copy(trio.bob, lambda m: m["text"] == question)
    assert at_bob["reply_to"] == bob_question["message_id"]

    follow_up = unique("Merci")
    await trio.bob.post(trio.bob_conv, text=follow_up, reply_to=bob_question["message_id"])
    event = await trio.native.wait_for_event(trio.room_id, body_is(follow_up), 30)
    assert event["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == asked["event_id"]


async def test_edits_reach_pandalab_as_edits_and_medipeps_as_marked_corrections(
    trio: Trio,
) -> None:
    original = unique("Dose 50 mg")
    event_id = await trio.native.send(
        trio.room_id, "m.room.message", {"msgtype": "m.text", "body": original}
    )
    await vendor_copy(trio.bob, lambda m: m["text"] == original)
    corrected = unique("Dose 5 mg")
    edit_id = await trio.native.send(
        trio.room_id,
        "m.room.message",
        edit_content(event_id, corrected),
    )
    edited = await vendor_copy(trio.alice, lambda m: m["text"] == corrected)
    assert edited["edited"] is True
    correction = await vendor_copy(trio.bob, lambda m: corrected in m["text"])
    assert correction["text"].startswith("✏️ Correction")
    assert "correction" in (await send_status(trio, edit_id, "medipeps"))["message"]

    typo = unique("RDV mardi")
    message_id = await trio.alice.post(trio.alice_conv, text=typo)
    sent = await trio.native.wait_for_event(trio.room_id, body_is(typo), 30)
    fixed = unique("RDV mercredi")
    await trio.alice.edit(trio.alice_conv, message_id, fixed)
    replaced = await trio.native.wait_for_event(
        trio.room_id,
        edit_of(sent["event_id"], fixed),
        30,
    )
    assert replaced["content"]["m.relates_to"]["rel_type"] == "m.replace"


async def test_deletions_cross_in_both_directions(trio: Trio) -> None:
    oops = unique("Mauvais patient")
    event_id = await trio.native.send(
        trio.room_id, "m.room.message", {"msgtype": "m.text", "body": oops}
    )
    at_alice = await vendor_copy(trio.alice, lambda m: m["text"] == oops)
    at_bob = await vendor_copy(trio.bob, lambda m: m["text"] == oops)
    await trio.native.redact(trio.room_id, event_id)
    for user, copy in ((trio.alice, at_alice), (trio.bob, at_bob)):
        conv = copy["conversation_id"]

        async def gone(
            user: AppUser = user, conv: str = conv, mid: str = copy["message_id"]
        ) -> bool:
            message = await user.message(conv, mid)
            return bool(message and message["deleted"])

        await wait_until(gone, 30, "the deletion at the vendor")

    wrong = unique("Erreur de saisie")
    message_id = await trio.bob.post(trio.bob_conv, text=wrong)
    sent = await trio.native.wait_for_event(trio.room_id, body_is(wrong), 30)
    await trio.bob.delete(trio.bob_conv, message_id)
    await trio.native.wait_for_event(
        trio.room_id,
        redaction_of(sent["event_id"]),
        30,
    )


async def test_reactions_reach_pandalab_and_become_short_messages_at_medipeps(
    trio: Trio,
) -> None:
    text = unique("Résultats normaux")
    message_id = await trio.alice.post(trio.alice_conv, text=text)
    event = await trio.native.wait_for_event(trio.room_id, body_is(text), 30)
    reaction_id = await trio.native.send(
        trio.room_id,
        "m.reaction",
        reaction_content(event["event_id"], "👍"),
    )

    async def reacted() -> bool:
        message = await trio.alice.message(trio.alice_conv, message_id)
        return any(r["emoji"] == "👍" for r in (message or {}).get("reactions", []))

    await wait_until(reacted, 30, "the reaction at PandaLab")
    notice = await vendor_copy(trio.bob, lambda m: "a réagi avec 👍" in m["text"])
    assert notice["reply_to"]
    assert "court message" in (await send_status(trio, reaction_id, "medipeps"))["message"]

    await trio.native.redact(trio.room_id, reaction_id)

    async def unreacted() -> bool:
        message = await trio.alice.message(trio.alice_conv, message_id)
        return not (message or {}).get("reactions")

    await wait_until(unreacted, 30, "the reaction removed at PandaLab")

    theirs = await trio.alice.react(trio.alice_conv, message_id, "❤️")
    reaction = await trio.native.wait_for_event(
        trio.room_id,
        lambda e: (
            e.get("type") == "m.reaction"
            and e["content"]["m.relates_to"]["event_id"] == event["event_id"]
            and e["content"]["m.relates_to"]["key"] == "❤️"
        ),
        30,
    )
    await trio.alice.unreact(trio.alice_conv, message_id, theirs)
    await trio.native.wait_for_event(
        trio.room_id,
        redaction_of(reaction["event_id"]),
        30,
    )


# --- Receipts and typing -------------------------------------------------------------------------


async def test_read_receipts_cross_in_both_directions(trio: Trio) -> None:
    text = unique("À lire")
    message_id = await trio.alice.post(trio.alice_conv, text=text)
    event = await trio.native.wait_for_event(trio.room_id, body_is(text), 30)
    await trio.native.read_receipt(trio.room_id, event["event_id"])

    async def marked() -> bool:
        view = await trio.alice.conversation(trio.alice_conv)
        return view["read_up_to"].get(trio.native.user_id) == message_id

    await wait_until(marked, 30, "the read marker at PandaLab")

    bob_copy = await vendor_copy(trio.bob, lambda m: m["text"] == text)

    async def marked_at_bob() -> bool:
        view = await trio.bob.conversation(trio.bob_conv)
        return view["read_up_to"].get(trio.native.user_id) == bob_copy["message_id"]

    await wait_until(marked_at_bob, 30, "the read marker at Medipeps")
    await trio.bob.read(trio.bob_conv, bob_copy["message_id"])
    bob_ghost = trio.ghost(trio.bob, "medipeps")
    await trio.native.wait_for_ephemeral(
        trio.room_id,
        lambda e: (
            e.get("type") == "m.receipt"
            and bob_ghost in ((e["content"].get(event["event_id"]) or {}).get("m.read") or {})
        ),
        30,
    )


async def test_typing_crosses_where_the_vendor_has_it(trio: Trio) -> None:
    await trio.native.typing(trio.room_id, True)

    async def typing_at_alice() -> bool:
        view = await trio.alice.conversation(trio.alice_conv)
        return trio.native.user_id in view["typing"]

    await wait_until(typing_at_alice, 30, "typing at PandaLab")
    await trio.alice.type(trio.alice_conv, True)
    alice_ghost = trio.ghost(trio.alice, "pandalab")
    await trio.native.wait_for_ephemeral(
        trio.room_id,
        lambda e: e.get("type") == "m.typing" and alice_ghost in e["content"].get("user_ids", []),
        30,
    )


# --- Capabilities --------------------------------------------------------------------------------


async def test_portal_rooms_publish_what_each_vendor_supports(
    trio: Trio, http: ClientSession
) -> None:
    token = trio.native.client.access_token
    published = await published_capabilities(trio.stack, http, trio.room_id, token)
    assert published["pandalab"]["reactions"] is True
    assert published["medipeps"]["reactions"] is False
    assert published["medipeps"]["edits"] is False
    assert published["medipeps"]["max_text_length"] == 4000
    assert "m.image" in published["medipeps"]["files"]


# --- Hostile input -------------------------------------------------------------------------------


async def test_malformed_matrix_events_neither_crash_nor_block_the_conversation(
    trio: Trio, http: ClientSession
) -> None:
    def bad(n: int, kind: str, content: Any) -> dict[str, Any]:
        return {
            "event_id": f"$malformed-{next(counter)}-{n}",
            "room_id": trio.room_id,
            "type": kind,
            "sender": trio.native.user_id,
            "origin_server_ts": 1,
            "content": content,
        }

    transaction = {
        "events": [
            bad(1, "m.room.message", "not an object"),
            bad(2, "m.room.message", {"msgtype": "m.text", "body": 12345}),
            bad(3, "m.room.message", {"msgtype": "m.image", "url": 7}),
            bad(4, "m.reaction", {"m.relates_to": "nonsense"}),
            bad(5, "m.room.redaction", {"redacts": ["x"]}),
            bad(
                6,
                "m.room.message",
                {
                    "msgtype": "m.text",
                    "body": "x",
                    "m.relates_to": {"rel_type": "m.replace", "event_id": 5},
                },
            ),
        ]
    }
    url = f"{trio.stack.bridge_url}/_matrix/app/v1/transactions/malformed-{next(counter)}"
    headers = {"Authorization": f"Bearer {trio.stack.registration['hs_token']}"}
    async with http.put(url, json=transaction, headers=headers) as resp:
        assert resp.status == 200
    after = unique("Toujours là")
    await trio.native.send_text(trio.room_id, after)
    await vendor_copy(trio.alice, lambda m: m["text"] == after)
    await vendor_copy(trio.bob, lambda m: m["text"] == after)


async def test_audio_and_video_reach_the_vendor_that_takes_them_and_are_refused_elsewhere(
    trio: Trio,
) -> None:
    # Each one what its type says by its first bytes (the bridge reads types from the content).
    for msgtype, mime, name, head in (
        ("m.audio", "audio/ogg", f"dictee-{next(counter)}.ogg", OGG_VORBIS),
        ("m.video", "video/mp4", f"geste-{next(counter)}.mp4", b"\x00\x00\x00\x18ftypmp42"),
    ):
        data = head + bytes(range(256)) * 64
        mxc = await trio.native.upload(data, mime, name)
        event_id = await trio.native.send(
            trio.room_id,
            "m.room.message",
            {
                "msgtype": msgtype,
                "body": name,
                "url": mxc,
                "info": {"mimetype": mime, "size": len(data)},
            },
        )
        at_alice = await vendor_copy(trio.alice, file_named(name))
        assert at_alice["attachment"]["mime_type"] == mime
        assert await trio.alice.download(at_alice["attachment"]["file_id"]) == data
        refused = await send_status(trio, event_id, "medipeps")
        assert refused["status"] == "FAIL_PERMANENT" and mime in refused["message"]
