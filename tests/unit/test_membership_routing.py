"""Matrix -> vendors: joins, departures, names and topics of a portal (``membership.py``), and
invites into a portal already linked to the invited ghost's vendor.

A change reaches each open vendor side once (what each side was told is recorded with its
deliveries), never the side it came from; the bot's own membership is not bridged; a native
member of a portal the bot speaks for is raised to ``MEMBER_LEVEL``. The deliveries are real
outbox rows, read back as their operations.
"""

from __future__ import annotations

from typing import Any

import pytest
from mautrix.util.async_db import Database

from bridge.core import operations as op
from bridge.core.from_matrix import FromMatrix
from bridge.core.ghost_ids import GhostIds
from bridge.core.members import BRIDGE_LEAVE, Member
from bridge.core.portals import Portals as RealPortals
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.matrix.homeserver import MEMBER_LEVEL
from connectors.base import Capabilities
from connectors.idnps import Idnps, luhn_check_digit

IDS = GhostIds("eimis_", "eimis.example", "eimis_bot")
BOT = IDS.bot_mxid
ROOM = "!ward:eimis.example"
ALICE = "@alice:eimis.example"
BOB = "@bob:eimis.example"


def idnps(rpps: str) -> Idnps:
    return Idnps(f"8{rpps}{luhn_check_digit(rpps)}")


A, B, C = idnps("1000000001"), idnps("1000000002"), idnps("1000000003")
PL_A = IDS.mxid("pl", A)
MP_B = IDS.mxid("mp", B)
PL_C = IDS.mxid("pl", C)
NAMES = {ALICE: "Alice (@alice)", BOB: "Bob (@bob)", PL_A: "Dr A", MP_B: "Dr B", PL_C: "Dr C"}


class Trust:
    def is_trusted(self, mxid: str) -> bool:
        return not mxid.endswith(":evil.example")


class Homeserver:
    def __init__(self) -> None:
        self.trust = Trust()
        self.levels: dict[str, Any] = {"users": {BOT: 100}, "users_default": 0, "kick": 1}
        self.put: list[tuple[str, str, dict[str, Any]]] = []

    async def get_state(self, mxid: str, room_id: str, event_type: str) -> dict[str, Any] | None:
        assert event_type == "m.room.power_levels"
        return self.levels

    async def put_state(
        self, mxid: str, room_id: str, event_type: str, content: dict[str, Any]
    ) -> str:
        self.put.append((mxid, event_type, content))
        self.levels = content
        return "$pl"


class Portals:
    def __init__(self) -> None:
        self.ids = IDS
        self.connectors = {"pl": object(), "mp": object()}

    def member_changed(self, *_: Any) -> None:
        return None

    async def sender(self, room_id: str, mxid: str, voice: str) -> Member:
        ref = IDS.parse(mxid)
        if ref is not None:
            return Member(mxid, NAMES[mxid], ref.connector, ref.idnps)
        return Member(mxid, NAMES.get(mxid, mxid))


class Bridge:
    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.hs = Homeserver()
        self.from_matrix = FromMatrix(stores, self.hs, Portals())  # type: ignore[arg-type]
        self._seen = 0

    async def handle(self, event: dict[str, Any]) -> list[tuple[str, op.Operation]]:
        """Route one event and commit its writes; the new deliveries, by connector."""
        writes = await self.from_matrix.handle({"room_id": ROOM, **event})
        await self.stores.commit.commit(writes)
        items = await self.stores.outbox.pending(self._seen, 1000)
        if items:
            self._seen = items[-1].seq
        return sorted((i.connector, op.from_stored(i.operation, i.payload)) for i in items)

    async def told(self, connector: str) -> set[str]:
        return await self.stores.portals.participants(ROOM, connector)


@pytest.fixture
async def bridge(db: Database) -> Bridge:
    stores = Stores.of(db)
    await stores.portals.create(Portal(ROOM, None, False, BOT))
    await stores.portals.add_link(ROOM, "pl", "conv-pl")
    await stores.portals.add_link(ROOM, "mp", "conv-mp")
    await stores.portals.add_participants(ROOM, "pl", [PL_A, ALICE, MP_B])
    await stores.portals.add_participants(ROOM, "mp", [PL_A, ALICE, MP_B])
    return Bridge(stores)


def member_event(event_id: str, sender: str, target: str, membership: str, **content: Any):
    return {
        "event_id": event_id,
        "type": "m.room.member",
        "sender": sender,
        "state_key": target,
        "content": {"membership": membership, **content},
    }


def member(mxid: str) -> Member:
    ref = IDS.parse(mxid)
    if ref is not None:
        return Member(mxid, NAMES[mxid], ref.connector, ref.idnps)
    return Member(mxid, NAMES[mxid])


async def test_a_native_join_is_told_to_every_side_once_and_recorded(bridge: Bridge) -> None:
    join = member_event("$j", BOB, BOB, "join")
    assert await bridge.handle(join) == [
        ("mp", op.AddParticipants(event_id="$j", external=(member(BOB),))),
        ("pl", op.AddParticipants(event_id="$j", external=(member(BOB),))),
    ]
    assert BOB in await bridge.told("pl") and BOB in await bridge.told("mp")
    # The homeserver pushes it again, or a display name changes: nothing more.
    assert await bridge.handle(join) == []
    assert await bridge.handle(member_event("$j2", BOB, BOB, "join", displayname="B")) == []


async def test_a_profile_change_is_nobody_joining(bridge: Bridge) -> None:
    """Members of portals from before the sides were recorded: a new display name of theirs
    (the homeserver gives the previous membership) adds nobody."""
    rename = member_event("$p", BOB, BOB, "join", displayname="Bob B")
    rename["unsigned"] = {"prev_content": {"membership": "join", "displayname": "Bob"}}
    assert await bridge.handle(rename) == []
    rejoin = {**rename, "event_id": "$p2", "unsigned": {"prev_content": {"membership": "leave"}}}
    assert [c for c, _ in await bridge.handle(rejoin)] == ["mp", "pl"]


async def test_a_ghost_joining_is_its_vendor_s_own_user_there_and_external_elsewhere(
    bridge: Bridge,
) -> None:
    assert await bridge.handle(member_event("$g", PL_C, PL_C, "join")) == [
        ("mp", op.AddParticipants(event_id="$g", external=(member(PL_C),))),
        ("pl", op.AddParticipants(event_id="$g", members=(C,))),
    ]
    assert PL_C in await bridge.told("pl") and PL_C in await bridge.told("mp")


async def test_a_change_the_vendor_made_itself_is_not_sent_back(bridge: Bridge) -> None:
    """The vendor → Matrix path records its own changes before making them on Matrix."""
    await bridge.stores.portals.add_participants(ROOM, "pl", [PL_C])
    assert await bridge.handle(member_event("$g", PL_C, PL_C, "join")) == [
        ("mp", op.AddParticipants(event_id="$g", external=(member(PL_C),))),
    ]
    await bridge.stores.portals.remove_participants(ROOM, "pl", [PL_A])
    assert await bridge.handle(member_event("$l", PL_A, PL_A, "leave")) == [
        ("mp", op.RemoveParticipants(event_id="$l", external=(member(PL_A),))),
    ]


@pytest.mark.parametrize("why", ["room_policy", "unencrypted"])
async def test_a_ghost_leaving_for_the_bridge_s_own_reasons_is_nobody_leaving(
    bridge: Bridge, why: str
) -> None:
    """A ghost that leaves a room opened to anyone (or an erasure ...) did not leave its
    conversation: no vendor is told, its user stays in the vendor conversation."""
    leave = member_event("$p", PL_A, PL_A, "leave", reason="publique", **{BRIDGE_LEAVE: why})
    assert await bridge.handle(leave) == []
    assert PL_A in await bridge.told("pl") and PL_A in await bridge.told("mp")


async def test_a_kick_is_a_removal_by_the_kicker_with_its_reason(bridge: Bridge) -> None:
    kick = member_event("$k", ALICE, MP_B, "leave", reason="fin de garde")
    assert await bridge.handle(kick) == [
        (
            "mp",
            op.RemoveParticipants(
                event_id="$k", members=(B,), by=member(ALICE), reason="fin de garde"
            ),
        ),
        (
            "pl",
            op.RemoveParticipants(
                event_id="$k", external=(member(MP_B),), by=member(ALICE), reason="fin de garde"
            ),
        ),
    ]
    assert MP_B not in await bridge.told("pl") and MP_B not in await bridge.told("mp")
    assert await bridge.handle(kick) == []


async def test_leaving_and_bans(bridge: Bridge) -> None:
    assert await bridge.handle(member_event("$l", ALICE, ALICE, "leave")) == [
        ("mp", op.RemoveParticipants(event_id="$l", external=(member(ALICE),))),
        ("pl", op.RemoveParticipants(event_id="$l", external=(member(ALICE),))),
    ]
    await bridge.handle(member_event("$j", BOB, BOB, "join"))
    banned = await bridge.handle(member_event("$b", PL_A, BOB, "ban"))
    assert [(c, o.kind, o.by) for c, o in banned] == [  # type: ignore[union-attr]
        ("mp", op.REMOVE_PARTICIPANTS, member(PL_A)),
        ("pl", op.REMOVE_PARTICIPANTS, member(PL_A)),
    ]
    # Someone who never was in (an invite declined) is nobody's news.
    assert (
        await bridge.handle(
            member_event("$x", "@carol:eimis.example", "@carol:eimis.example", "leave")
        )
        == []
    )


async def test_the_bot_s_membership_and_untrusted_servers_are_not_bridged(bridge: Bridge) -> None:
    assert await bridge.handle(member_event("$bj", BOT, BOT, "join")) == []
    assert await bridge.handle(member_event("$bl", BOT, BOT, "leave")) == []
    mallory = "@mallory:evil.example"
    assert await bridge.handle(member_event("$m", mallory, mallory, "join")) == []
    assert bridge.from_matrix.untrusted_dropped == 1
    # A kick by the bot (the bridge doing a vendor's removal) names nobody as remover.
    removed = await bridge.handle(member_event("$bk", BOT, ALICE, "leave"))
    assert {o.by for _, o in removed} == {None}  # type: ignore[union-attr]


async def test_a_closed_link_gets_nothing_new(bridge: Bridge) -> None:
    await bridge.stores.portals.close_link(ROOM, "mp")
    assert await bridge.handle(member_event("$j", BOB, BOB, "join")) == [
        ("pl", op.AddParticipants(event_id="$j", external=(member(BOB),))),
    ]
    rename = {
        "event_id": "$n",
        "type": "m.room.name",
        "sender": BOB,
        "state_key": "",
        "content": {"name": "Chambre 3"},
    }
    assert [c for c, _ in await bridge.handle(rename)] == ["pl"]
    message = {
        "event_id": "$m",
        "type": "m.room.message",
        "sender": BOB,
        "content": {"msgtype": "m.text", "body": "x"},
    }
    assert [c for c, _ in await bridge.handle(message)] == ["pl"]


async def test_a_native_joining_a_bot_portal_may_remove_ghosts(bridge: Bridge) -> None:
    await bridge.handle(member_event("$j", BOB, BOB, "join"))
    assert bridge.hs.put == [
        (
            BOT,
            "m.room.power_levels",
            {"users": {BOT: 100, BOB: MEMBER_LEVEL}, "users_default": 0, "kick": 1},
        )
    ]
    # Already there: nothing written; ghosts are never raised.
    await bridge.handle(member_event("$j2", BOB, BOB, "leave"))
    await bridge.handle(member_event("$j3", BOB, BOB, "join"))
    await bridge.handle(member_event("$g", PL_C, PL_C, "join"))
    assert len(bridge.hs.put) == 1


async def test_a_ghost_voiced_portal_is_not_touched(db: Database) -> None:
    stores = Stores.of(db)
    await stores.portals.create(Portal(ROOM, None, False, PL_A))
    await stores.portals.add_link(ROOM, "pl", "conv-pl")
    bridge = Bridge(stores)
    await bridge.handle(member_event("$j", BOB, BOB, "join"))
    assert bridge.hs.put == []


def state(event_id: str, kind: str, sender: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": kind,
        "sender": sender,
        "state_key": "",
        "content": content,
    }


async def test_a_rename_goes_everywhere_but_where_it_came_from(bridge: Bridge) -> None:
    by_alice = state("$n", "m.room.name", ALICE, {"name": "Chambre 12"})
    assert await bridge.handle(by_alice) == [
        ("mp", op.SetTitle(event_id="$n", title="Chambre 12", by=member(ALICE))),
        ("pl", op.SetTitle(event_id="$n", title="Chambre 12", by=member(ALICE))),
    ]
    # A vendor's rename relayed by the vendor → Matrix path, then pushed by the homeserver.
    relayed = state("$v", "m.room.name", PL_A, {"name": "Chambre 14"})
    expected = [("mp", op.SetTitle(event_id="$v", title="Chambre 14", by=member(PL_A)))]
    assert await bridge.handle(relayed) == expected
    assert await bridge.handle(relayed) == []
    # The portal keeps the current title: a vendor linked later is given it.
    assert (await bridge.stores.portals.get(ROOM)).title == "Chambre 14"  # type: ignore[union-attr]
    # Removing the name, and the bot's own changes.
    cleared = await bridge.handle(state("$c", "m.room.name", ALICE, {}))
    assert {o.title for _, o in cleared} == {None}  # type: ignore[union-attr]
    assert await bridge.handle(state("$b", "m.room.name", BOT, {"name": "x"})) == []


async def test_a_topic_goes_everywhere_but_where_it_came_from(bridge: Bridge) -> None:
    assert await bridge.handle(state("$t", "m.room.topic", MP_B, {"topic": "Suivi"})) == [
        ("pl", op.SetTopic(event_id="$t", topic="Suivi", by=member(MP_B))),
    ]
    # Not the room's topic (another state key), or a portal the bridge does not know.
    other = {**state("$o", "m.room.topic", ALICE, {"topic": "x"}), "state_key": "x"}
    assert await bridge.handle(other) == []
    elsewhere = {**state("$e", "m.room.topic", ALICE, {"topic": "x"}), "room_id": "!other:x"}
    assert await bridge.from_matrix.handle(elsewhere) == []


# --- Invites into a portal already linked to the ghost's vendor ---------------------------------


class Intent:
    def __init__(self, mxid: str, log: list[tuple[str, ...]]) -> None:
        self.mxid = mxid
        self.log = log

    async def join_room(self, room_id: str, **_: Any) -> None:
        self.log.append(("join", self.mxid))

    async def leave_room(self, room_id: str, reason: str | None = None) -> None:
        self.log.append(("leave", self.mxid, reason or ""))


class InviteHomeserver(Homeserver):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, ...]] = []

    def intent(self, mxid: str) -> Intent:
        return Intent(mxid, self.log)

    async def send_event(
        self, mxid: str, room_id: str, event_type: str, content: dict[str, Any], *, txn_id: str
    ) -> str:
        self.log.append(("say", mxid, content["body"]))
        return "$notice"


async def test_a_vendor_that_adds_nobody_refuses_the_invite_in_french(db: Database) -> None:
    stores = Stores.of(db)
    await stores.portals.create(Portal(ROOM, None, False, BOT))
    await stores.portals.add_link(ROOM, "mp", "conv-mp")
    await stores.ghosts.upsert(IDS.mxid("mp", C), "mp", C, "Dr C")
    hs = InviteHomeserver()
    vendor = type("Vendor", (), {"capabilities": Capabilities()})()
    portals = RealPortals(stores, hs, {"mp": vendor}, IDS)  # type: ignore[arg-type]
    ghost = IDS.mxid("mp", C)
    assert not await portals.open_from_invite(ROOM, ALICE, ghost, False)
    reason = "mp ne permet pas d'ajouter une personne à une conversation existante"
    assert hs.log == [
        ("say", BOT, f"Dr C ne peut pas être ajouté(e) : {reason}."),
        ("leave", ghost, reason),
    ]
    assert await stores.outbox.pending(0, 10) == []
