"""Participant changes, names and topics at a vendor (``executors/membership.py``,
``executors/titles.py``): the connector's own operation where it has it, else a French line
from "EIMIS" in its conversation; a vendor user removed where the vendor cannot remove anyone
is told so, and once none of that vendor's users is left in the portal its link closes. Such a
change failing for good is told in the room (no send status: it is nobody's message)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.util.async_db import Database

from bridge.config import MediaConfig
from bridge.core import operations as op
from bridge.core.delivery import Delivery
from bridge.core.executors import Delivered, Executors, MessageMapped
from bridge.core.ghost_ids import GhostIds
from bridge.core.members import Member
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from connectors.base import (
    Capabilities,
    ConnectorError,
    OutboundMessage,
    ParticipantChange,
    Sender,
)
from connectors.idnps import Idnps, luhn_check_digit

IDS = GhostIds("eimis_", "eimis.example", "eimis_bot")
BOT = IDS.bot_mxid
ROOM = "!ward:eimis.example"


def idnps(rpps: str) -> Idnps:
    return Idnps(f"8{rpps}{luhn_check_digit(rpps)}")


A, B = idnps("1000000001"), idnps("1000000002")
ALICE = Member("@alice:eimis.example", "Alice Martin")
GHOST_A = Member(IDS.mxid("mp", A), "Dr A", "mp", A)
GHOST_B = Member(IDS.mxid("mp", B), "Dr B", "mp", B)
EIMIS = Sender(mxid=BOT, display_name="EIMIS")

ALL = Capabilities(
    replies=True, add_participants=True, remove_participants=True, titles=True, topics=True
)
MEDIPEPS = Capabilities(replies=True, add_participants=True, titles=True)
NONE = Capabilities(replies=True)


class Vendor:
    def __init__(self, capabilities: Capabilities, fail: ConnectorError | None = None) -> None:
        self.capabilities = capabilities
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        self.calls.append(("send", conversation_id, message.sender, message.text))
        return f"m-{len(self.calls)}"

    async def add_participants(self, conversation_id: str, change: ParticipantChange) -> None:
        self.calls.append(("add", conversation_id, change))

    async def remove_external(self, conversation_id: str, change: ParticipantChange) -> None:
        self.calls.append(("remove_external", conversation_id, change))

    async def remove_members(self, conversation_id: str, change: ParticipantChange) -> None:
        self.calls.append(("remove_members", conversation_id, change))

    async def set_title(self, conversation_id: str, title: str | None, by: Sender) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append(("title", conversation_id, title, by))

    async def set_topic(self, conversation_id: str, topic: str | None, by: Sender) -> None:
        self.calls.append(("topic", conversation_id, topic, by))


class Homeserver:
    def __init__(self) -> None:
        self.config = SimpleNamespace(bot_mxid=BOT)
        self.joined: list[str] = [BOT, ALICE.mxid, GHOST_A.mxid]

    async def joined_members(self, room_id: str, *, viewer: str) -> list[str]:
        assert viewer == BOT
        return list(self.joined)


@pytest.fixture
async def stores(db: Database) -> Stores:
    stores = Stores.of(db)
    await stores.portals.create(Portal(ROOM, None, False, BOT))
    await stores.portals.add_link(ROOM, "mp", "conv")
    await stores.ghosts.upsert(GHOST_A.mxid, "mp", A, "Dr A")
    return stores


def executors(stores: Stores, vendor: Vendor, hs: Homeserver | None = None) -> Executors:
    portals = SimpleNamespace(ids=IDS)
    return Executors(
        stores,
        hs or Homeserver(),  # type: ignore[arg-type]
        {"mp": vendor},  # type: ignore[dict-item]
        None,  # type: ignore[arg-type]
        MediaConfig(),
        portals,  # type: ignore[arg-type]
    )


# --- Joining ------------------------------------------------------------------------------------


async def test_people_joining_are_added_where_the_vendor_adds_people(stores: Stores) -> None:
    vendor = Vendor(ALL)
    add = op.AddParticipants(event_id="$j", members=(A,), external=(ALICE,), by=GHOST_B)
    assert await executors(stores, vendor).run("mp", ROOM, add) == Delivered("conv")
    change = ParticipantChange(
        request_id="$j", members=(A,), external=(ALICE.as_sender(),), by=GHOST_B.as_sender()
    )
    assert vendor.calls == [("add", "conv", change)]


async def test_elsewhere_eimis_says_who_joined(stores: Stores) -> None:
    vendor = Vendor(NONE)
    add = op.AddParticipants(event_id="$j", members=(A,), external=(ALICE,), by=GHOST_B)
    outcome = await executors(stores, vendor).run("mp", ROOM, add)
    assert outcome == Delivered("conv", (), (MessageMapped("m-1", "$j"),))
    assert vendor.calls == [
        (
            "send",
            "conv",
            EIMIS,
            "Dr A et Alice Martin ont rejoint la conversation (ajout par Dr B).",
        )
    ]


# --- Leaving ------------------------------------------------------------------------------------


async def test_people_outside_the_vendor_leave_it(stores: Stores) -> None:
    vendor = Vendor(MEDIPEPS)
    remove = op.RemoveParticipants(event_id="$l", external=(ALICE,), by=GHOST_A, reason="fin")
    assert await executors(stores, vendor).run("mp", ROOM, remove) == Delivered("conv")
    change = ParticipantChange(
        request_id="$l", external=(ALICE.as_sender(),), by=GHOST_A.as_sender(), reason="fin"
    )
    assert vendor.calls == [("remove_external", "conv", change)]
    # Where the vendor cannot take anyone out, its users are told.
    quiet = Vendor(NONE)
    await executors(stores, quiet).run("mp", ROOM, remove)
    assert quiet.calls == [
        (
            "send",
            "conv",
            EIMIS,
            "Alice Martin a été retiré(e) de la conversation par Dr A (motif : fin).",
        )
    ]


async def test_the_vendor_s_user_is_removed_where_the_vendor_removes_users(
    stores: Stores,
) -> None:
    vendor = Vendor(ALL)
    remove = op.RemoveParticipants(event_id="$k", members=(A,), by=ALICE)
    hs = Homeserver()
    hs.joined = [BOT, ALICE.mxid, GHOST_B.mxid]  # another user of that vendor stays
    assert await executors(stores, vendor, hs).run("mp", ROOM, remove) == Delivered("conv")
    assert vendor.calls == [
        ("remove_members", "conv", ParticipantChange("$k", (A,), (), ALICE.as_sender()))
    ]
    link = await stores.portals.link(ROOM, "mp")
    assert link is not None and not link.closed


async def test_where_nobody_can_be_removed_the_user_is_told_and_the_link_closes(
    stores: Stores,
) -> None:
    vendor = Vendor(MEDIPEPS)
    remove = op.RemoveParticipants(event_id="$k", members=(A,), by=ALICE, reason="erreur")
    hs = Homeserver()
    hs.joined = [BOT, ALICE.mxid]  # the ghost was kicked: none of that vendor is left
    outcome = await executors(stores, vendor, hs).run("mp", ROOM, remove)
    assert outcome == Delivered("conv", (), (MessageMapped("m-1", "$k"),))
    [(kind, conversation, sender, text)] = vendor.calls
    assert (kind, conversation, sender) == ("send", "conv", EIMIS)
    assert text.startswith("Dr A : vous avez été retiré(e) de cette conversation par Alice Martin")
    assert "(motif : erreur)" in text and "Vous ne recevrez plus les messages" in text
    link = await stores.portals.link(ROOM, "mp")
    assert link is not None and link.closed
    assert await stores.portals.open_links(ROOM) == []
    # What was queued before still goes there.
    later = op.SetTitle(event_id="$n", title="x", by=ALICE)
    assert await executors(stores, vendor, hs).run("mp", ROOM, later) == Delivered("conv")


# --- Names and topics ---------------------------------------------------------------------------


async def test_names_and_topics_where_the_vendor_has_them(stores: Stores) -> None:
    vendor = Vendor(ALL)
    run = executors(stores, vendor).run
    assert await run("mp", ROOM, op.SetTitle(event_id="$n", title="Lit 4", by=ALICE)) == (
        Delivered("conv")
    )
    assert await run("mp", ROOM, op.SetTopic(event_id="$t", topic=None, by=GHOST_B)) == (
        Delivered("conv")
    )
    assert vendor.calls == [
        ("title", "conv", "Lit 4", ALICE.as_sender()),
        ("topic", "conv", None, GHOST_B.as_sender()),
    ]


async def test_elsewhere_eimis_says_what_changed(stores: Stores) -> None:
    vendor = Vendor(NONE)
    run = executors(stores, vendor).run
    await run("mp", ROOM, op.SetTitle(event_id="$n", title="Lit 4", by=ALICE))
    await run("mp", ROOM, op.SetTitle(event_id="$n2", title=None, by=ALICE))
    await run("mp", ROOM, op.SetTopic(event_id="$t", topic="Suivi", by=ALICE))
    assert [call[2:] for call in vendor.calls] == [
        (EIMIS, "Alice Martin a renommé la conversation : « Lit 4 »"),
        (EIMIS, "Alice Martin a retiré le nom de la conversation"),
        (EIMIS, "Alice Martin a changé le sujet de la conversation : « Suivi »"),
    ]


# --- Failures -----------------------------------------------------------------------------------


class Status:
    def __init__(self) -> None:
        self.notices: list[str] = []
        self.reports: list[Any] = []

    async def notice(self, room_id: str, text: str, *, txn_id: str) -> None:
        self.notices.append(text)

    async def tell_everyone(
        self, room_id: str, text: str, *, txn_id: str, exclude: tuple[str, ...] = ()
    ) -> None:
        self.told = (text, exclude)
        await self.notice(room_id, text, txn_id=txn_id)

    async def report(self, **kwargs: Any) -> None:
        self.reports.append(kwargs)


async def test_a_change_refused_for_good_is_told_in_the_room_in_french(
    stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    vendor = Vendor(ALL, fail=ConnectorError("title too long", retriable=False))
    status = Status()
    delivery = Delivery(
        stores,
        Homeserver(),  # type: ignore[arg-type]
        {"mp": vendor},  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        MediaConfig(),
        status,  # type: ignore[arg-type]
        portals=SimpleNamespace(ids=IDS),  # type: ignore[arg-type]
    )
    rename = op.SetTitle(event_id="$n", title="Secret ward name", by=ALICE)
    await stores.outbox.enqueue("mp", ROOM, rename.kind, "$n", rename.to_json())
    [item] = await stores.outbox.pending(0, 10)
    await delivery.handle(item)
    assert status.reports == []
    assert status.notices == [
        "mp n'a pas pu appliquer le changement de nom de la conversation : title too long"
    ]
    assert status.told[1] == ("mp",), "the other vendors' users are told, not mp's"
    assert "Secret ward name" not in caplog.text
