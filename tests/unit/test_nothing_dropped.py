"""Nothing a portal member sends is dropped silently (``bridge/core/matrix_content.py``, routed by
``from_matrix.py``): polls become text with numbered answers, votes and ends follow as text,
stickers become images, events of other types that carry a text become that text, and anything
else gets a FAIL send status with a reason in French.

End to end through Synapse: tests/e2e/test_nothing_dropped.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from mautrix.util.async_db import Database

from bridge.core import matrix_content as mc
from bridge.core import operations as op
from bridge.core.from_matrix import FromMatrix
from bridge.core.ghost_ids import GhostIds
from bridge.core.members import Member
from bridge.core.router import _message_like
from bridge.db.portal import Portal
from bridge.db.stores import Stores

IDS = GhostIds("eimis_", "eimis.example", "eimis_bot")
BOT = IDS.bot_mxid
ROOM = "!ward:eimis.example"
ALICE = "@alice:eimis.example"

STABLE_POLL = {
    "m.poll": {
        "kind": "m.disclosed",
        "max_selections": 1,
        "question": {"m.text": [{"body": "Réunion de service ?"}]},
        "answers": [
            {"m.id": "mon", "m.text": [{"body": "Lundi"}]},
            {"m.id": "tue", "m.text": [{"body": "Mardi"}]},
        ],
    },
    "m.text": [{"body": "Réunion de service ?\n1. Lundi\n2. Mardi"}],
}
UNSTABLE_POLL = {
    "org.matrix.msc3381.poll.start": {
        "kind": "org.matrix.msc3381.poll.disclosed",
        "max_selections": 1,
        "question": {"org.matrix.msc1767.text": "Garde du week-end ?"},
        "answers": [
            {"id": "a", "org.matrix.msc1767.text": "Oui"},
            {"id": "b", "org.matrix.msc1767.text": "Non"},
        ],
    },
    "org.matrix.msc1767.text": "Garde du week-end ?\n1. Oui\n2. Non",
}


class Trust:
    def is_trusted(self, mxid: str) -> bool:
        return True


class Homeserver:
    def __init__(self) -> None:
        self.trust = Trust()
        self.events: dict[str, dict[str, Any]] = {}

    async def event_in_room(self, viewer: str, room_id: str, event_id: str) -> dict | None:
        event = self.events.get(event_id)
        return event if event is not None and event.get("room_id") == room_id else None


class Portals:
    def __init__(self) -> None:
        self.ids = IDS
        self.connectors = {"pl": object(), "mp": object()}

    def member_changed(self, *_: Any) -> None:
        return None

    async def sender(self, room_id: str, mxid: str, voice: str) -> Member:
        return Member(mxid, "Alice Martin")


class Bridge:
    def __init__(self, stores: Stores, decrypt: Any = None) -> None:
        self.stores = stores
        self.hs = Homeserver()
        self.unsupported: list[tuple[str, str, str]] = []
        self.from_matrix = FromMatrix(
            stores,
            self.hs,  # type: ignore[arg-type]
            Portals(),  # type: ignore[arg-type]
            on_unsupported=self._unsupported,
            decrypt=decrypt,
        )
        self._seen = 0

    async def _unsupported(self, room_id: str, event_id: str, reason: str) -> None:
        self.unsupported.append((room_id, event_id, reason))

    async def handle(self, event_id: str, kind: str, content: Any, **extra: Any) -> list[Any]:
        """Route one event and commit its writes; the new deliveries' operations (pl's only:
        every connector gets the same)."""
        event = {
            "room_id": ROOM,
            "event_id": event_id,
            "type": kind,
            "sender": ALICE,
            "content": content,
            **extra,
        }
        writes = await self.from_matrix.handle(event)
        await self.stores.commit.commit(writes)
        items = await self.stores.outbox.pending(self._seen, 1000)
        if items:
            self._seen = items[-1].seq
        assert sorted({i.connector for i in items}) in ([], ["mp", "pl"])
        return [op.from_stored(i.operation, i.payload) for i in items if i.connector == "pl"]


@pytest.fixture
async def bridge(db: Database) -> Bridge:
    stores = Stores.of(db)
    await stores.portals.create(Portal(ROOM, None, False, BOT))
    await stores.portals.add_link(ROOM, "pl", "conv-pl")
    await stores.portals.add_link(ROOM, "mp", "conv-mp")
    return Bridge(stores)


def refers(event_id: str) -> dict[str, str]:
    return {"rel_type": "m.reference", "event_id": event_id}


def only_text(operations: list[Any]) -> str:
    assert len(operations) == 1
    message = operations[0]
    assert isinstance(message, op.SendMessage)
    assert message.content["msgtype"] == "m.text"
    return str(message.content["body"])


async def test_a_stable_poll_becomes_text_with_numbered_answers_and_its_votes_follow(
    bridge: Bridge,
) -> None:
    sent = await bridge.handle("$poll", "m.poll.start", STABLE_POLL)
    assert only_text(sent) == "Sondage : Réunion de service ?\n1. Lundi\n2. Mardi"
    assert sent[0].content["eimis.converted"] == "poll"
    vote = {
        "m.relates_to": {"rel_type": "m.reference", "event_id": "$poll"},
        "m.selections": ["tue"],
    }
    text = only_text(await bridge.handle("$vote", "m.poll.response", vote))
    assert text == "Alice Martin a répondu : Mardi (sondage : Réunion de service ?)"
    end = {
        "m.relates_to": {"rel_type": "m.reference", "event_id": "$poll"},
        "m.text": [{"body": "Le sondage est clos. Réponse retenue : Mardi"}],
    }
    text = only_text(await bridge.handle("$end", "m.poll.end", end))
    assert (
        text == "Sondage clos : Réunion de service ?\nLe sondage est clos. Réponse retenue : Mardi"
    )
    assert bridge.unsupported == []


async def test_an_unstable_poll_and_a_vote_read_back_from_the_homeserver(bridge: Bridge) -> None:
    # The poll was routed before a restart: the vote's answer is read from the homeserver.
    bridge.hs.events["$old"] = {
        "room_id": ROOM,
        "type": "org.matrix.msc3381.poll.start",
        "content": UNSTABLE_POLL,
    }
    vote = {
        "m.relates_to": {"rel_type": "m.reference", "event_id": "$old"},
        "org.matrix.msc3381.poll.response": {"answers": ["a"]},
    }
    text = only_text(await bridge.handle("$v", "org.matrix.msc3381.poll.response", vote))
    assert text == "Alice Martin a répondu : Oui (sondage : Garde du week-end ?)"
    # A vote on a poll nobody can find still goes, as a generic sentence.
    lost = {"m.relates_to": {"rel_type": "m.reference", "event_id": "$gone"}, "m.selections": ["x"]}
    assert only_text(await bridge.handle("$v2", "m.poll.response", lost)) == (
        "Alice Martin a répondu au sondage"
    )
    end = {"m.relates_to": {"rel_type": "m.reference", "event_id": "$gone"}}
    assert only_text(await bridge.handle("$e", "org.matrix.msc3381.poll.end", end)) == (
        "Sondage clos"
    )


async def test_a_vote_on_an_encrypted_poll_reads_it_decrypted(db: Database) -> None:
    async def decrypt(event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "type": "m.poll.start", "content": STABLE_POLL}

    stores = Stores.of(db)
    await stores.portals.create(Portal(ROOM, None, False, BOT))
    await stores.portals.add_link(ROOM, "pl", "conv-pl")
    await stores.portals.add_link(ROOM, "mp", "conv-mp")
    bridge = Bridge(stores, decrypt)
    bridge.hs.events["$enc"] = {"room_id": ROOM, "type": "m.room.encrypted", "content": {}}
    vote = {
        "m.relates_to": {"rel_type": "m.reference", "event_id": "$enc"},
        "m.selections": ["mon"],
    }
    text = only_text(await bridge.handle("$v", "m.poll.response", vote))
    assert text.startswith("Alice Martin a répondu : Lundi")


async def test_a_poll_only_its_fallback_can_be_read_from_goes_as_that_text(bridge: Bridge) -> None:
    content = {"org.matrix.msc1767.text": "Qui vient ?\n1. Moi"}
    assert only_text(await bridge.handle("$p", "org.matrix.msc3381.poll.start", content)) == (
        "Sondage : Qui vient ?\n1. Moi"
    )


async def test_a_sticker_becomes_an_image(bridge: Bridge) -> None:
    sticker = {
        "body": "Pouce levé",
        "url": "mxc://eimis.example/sticker",
        "info": {"mimetype": "image/png", "w": 64, "h": 64, "size": 120},
    }
    (message,) = await bridge.handle("$s", "m.sticker", sticker)
    assert message.content["msgtype"] == "m.image"
    assert message.content["url"] == "mxc://eimis.example/sticker"
    assert message.content["info"]["mimetype"] == "image/png"
    assert message.content["body"] == "Pouce levé"
    encrypted = {"body": "x", "file": {"url": "mxc://eimis.example/enc", "key": {}}, "info": {}}
    (message,) = await bridge.handle("$s2", "m.sticker", encrypted)
    assert message.content["file"]["url"] == "mxc://eimis.example/enc"
    assert await bridge.handle("$s3", "m.sticker", {"body": "no url"}) == []
    assert bridge.unsupported[-1][1] == "$s3"


async def test_an_event_of_another_type_goes_as_its_text_or_is_refused_in_french(
    bridge: Bridge,
) -> None:
    text = only_text(await bridge.handle("$x", "com.example.note", {"body": "Patient vu"}))
    assert text == "Patient vu"
    text = only_text(await bridge.handle("$y", "org.example.card", {"m.text": [{"body": "Fiche"}]}))
    assert text == "Fiche"
    assert await bridge.handle("$z", "com.example.blob", {"data": [1, 2]}) == []
    ((room, event_id, reason),) = bridge.unsupported
    assert (room, event_id) == (ROOM, "$z")
    assert reason == (
        "ce type de contenu (com.example.blob) ne peut pas être transmis aux autres participants"
    )


async def test_state_protocol_and_the_bridge_s_own_events_are_neither_bridged_nor_refused(
    bridge: Bridge,
) -> None:
    assert await bridge.handle("$st", "com.example.state", {"x": 1}, state_key="") == []
    for kind in ("m.call.candidates", "m.key.verification.start", "m.room.encrypted"):
        assert await bridge.handle(f"${kind}", kind, {"x": 1}) == []
    # The bot's own events (its notices, statuses) reach no vendor and are not refused.
    event = {"room_id": ROOM, "event_id": "$g", "type": "com.example.blob", "sender": BOT}
    assert await bridge.from_matrix.handle({**event, "content": {}}) == []
    assert bridge.unsupported == []


async def test_a_converted_message_says_so_in_its_send_status() -> None:
    poll = mc.poll_start_message(STABLE_POLL)
    assert poll is not None
    assert mc.note(poll, "pl") == "sondage envoyé sous forme de texte : pl n'a pas de sondages"
    other = mc.other_event_message("com.example.note", {"body": "x"})
    assert other is not None
    assert mc.note(other, "pl") == "événement de type com.example.note envoyé sous forme de texte"
    assert mc.note({"msgtype": "m.text", "body": "x"}, "pl") is None


def test_an_encrypted_poll_or_client_event_is_taken_a_forged_state_event_is_not() -> None:
    for kind in ("m.poll.start", "org.matrix.msc3381.poll.response", "m.sticker", "com.x.y"):
        assert _message_like({"type": kind})
    for kind in ("m.room.name", "m.room.redaction", "m.receipt", "m.room.member"):
        assert not _message_like({"type": kind})
    assert not _message_like({"type": "com.x.y", "state_key": ""})


async def test_a_voice_message_goes_as_the_audio_file_it_is(bridge: Bridge) -> None:
    # No vendor contract has a voice flag: the message stays an m.audio file, flags kept.
    voice = {
        "msgtype": "m.audio",
        "body": "Message vocal",
        "url": "mxc://eimis.example/voice",
        "info": {"mimetype": "audio/ogg", "duration": 3000},
        "org.matrix.msc3245.voice": {},
        "org.matrix.msc1767.audio": {"duration": 3000},
    }
    (message,) = await bridge.handle("$voice", "m.room.message", voice)
    assert message.content["msgtype"] == "m.audio"
    assert "org.matrix.msc3245.voice" in message.content
