"""A conversation lives (issue 13), vendor -> Matrix, on both storage engines, the homeserver and
the vendors played by fakes: people added and removed by a vendor user enter and leave the
portal (as that user's ghost asks; Matrix users removed by the bot), each change recorded for
the vendor that made it first (its echo is never routed back to it), the last member of a vendor
leaving closes its link, titles and topics follow (room state or an encrypted notice, relayed to
the other vendors), Matrix users are invited by the creator's ghost, and a new portal gets its
conversation's history, in order and with its original times, once. End to end:
tests/e2e/test_conversation_life.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.errors import MatrixRequestError, make_request_error

from bridge.config import BackfillConfig, DatabaseConfig, MediaConfig
from bridge.core import operations as op
from bridge.core.backfill import VISITOR_KEY
from bridge.core.ghost_ids import GhostIds
from bridge.core.portals import Portals
from bridge.core.send_status import StatusReporter
from bridge.core.to_matrix import ToMatrix
from bridge.db.database import open_database
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.values.permissions import BLOCK_ALL
from bridge.values.trust import TrustList
from connectors.base import (
    Capabilities,
    ConversationCreated,
    ConversationRenamed,
    HistorySource,
    MemberLeft,
    MessageReceived,
    Participant,
    ParticipantsAdded,
    ParticipantsRemoved,
    RemoteUser,
    TopicChanged,
)
from connectors.idnps import Idnps

DOMAIN = "eimis.example"
IDS = GhostIds("eimis_", DOMAIN, "eimis_bot")
BOT = IDS.bot_mxid
CAMILLE = Idnps("810000001916")  # pandalab
JULIEN = Idnps("899700218896")  # pandalab
ANA = Idnps("810000005479")  # medipeps
NOBODY = Idnps("0012807590")
NATIVE = "@lea:eimis.example"
OUTSIDER = "@eve:untrusted.example"
ROOM = "!portal:eimis.example"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def ghost(connector: str, idnps: str) -> str:
    return IDS.mxid(connector, Idnps(idnps))


class FakeVendor:
    type_name = "fake"
    capabilities = Capabilities()

    def __init__(self, *users: RemoteUser) -> None:
        self.users = {str(u.idnps): u for u in users}

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        return self.users.get(str(idnps))


class HistoryVendor(FakeVendor, HistorySource):
    def __init__(self, *users: RemoteUser) -> None:
        super().__init__(*users)
        self.messages: list[MessageReceived] = []
        self.asked: list[tuple[str, int, datetime]] = []

    async def history(
        self, conversation_id: str, *, limit: int, since: datetime
    ) -> Sequence[MessageReceived]:
        self.asked.append((conversation_id, limit, since))
        return [m for m in self.messages if m.timestamp >= since][-limit:]


class FakeConnectors:
    def __init__(self, **vendors: FakeVendor) -> None:
        self.vendors = vendors

    def get(self, connector_id: str) -> FakeVendor | None:
        return self.vendors.get(connector_id)

    def __contains__(self, connector_id: object) -> bool:
        return connector_id in self.vendors

    def __iter__(self) -> Iterator[tuple[str, FakeVendor]]:
        return iter(self.vendors.items())

    def ids(self) -> list[str]:
        return list(self.vendors)


class FakeIntent:
    def __init__(self, hs: FakeHomeserver, mxid: str) -> None:
        self.hs, self.mxid = hs, mxid

    async def ensure_joined(self, room_id: str) -> None:
        self.hs.members.setdefault(room_id, set()).add(self.mxid)
        self.hs.log.append(("join", self.mxid, room_id))

    async def invite_user(
        self, room_id: str, user_id: str, extra_content: dict[str, Any] | None = None, **_: Any
    ) -> None:
        recorded = {c: await self.hs.stores.portals.participants(room_id, c) for c in ("pl", "mp")}
        self.hs.invites.append((self.mxid, user_id, extra_content, recorded))

    async def leave_room(
        self, room_id: str, reason: str | None = None, extra_content: Any = None, **_: Any
    ) -> None:
        self.hs.members.get(room_id, set()).discard(self.mxid)
        self.hs.log.append(("leave", self.mxid, extra_content or reason))

    async def kick_user(self, room_id: str, user_id: str, reason: str = "") -> None:
        self.hs.members.get(room_id, set()).discard(user_id)
        self.hs.log.append(("kick", self.mxid, user_id, reason))

    async def send_state_event(self, *args: Any, **kwargs: Any) -> None:
        return None


class FakeHomeserver:
    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.config = SimpleNamespace(bot_mxid=BOT)
        self.trust = TrustList(DOMAIN, [])
        self.titles_in_room_state = False
        self.encrypt_new_portals = False
        self.members: dict[str, set[str]] = {}
        self.invites: list[tuple[str, str, dict[str, Any] | None, dict[str, set[str]]]] = []
        self.log: list[tuple[Any, ...]] = []
        self.sent: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.state: list[tuple[str, str, str, dict[str, Any]]] = []
        self.refuse_state = False

    def intent(self, mxid: str) -> FakeIntent:
        return FakeIntent(self, mxid)

    async def ensure_ghost(self, mxid: str, display_name: str | None) -> None:
        return None

    async def get_state(self, *args: Any) -> None:
        return None

    async def create_portal_room(self, **kwargs: Any) -> str:
        self.created.append(kwargs)
        self.members[ROOM] = {BOT}
        return ROOM

    async def record_direct(self, *args: Any) -> None:
        return None

    async def joined_members(self, room_id: str, *, viewer: str) -> list[str]:
        return sorted(self.members.get(room_id, set()))

    async def send_event(
        self,
        mxid: str,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        txn_id: str,
        ts_ms: int | None = None,
    ) -> str:
        for sent in self.sent:
            if sent["txn_id"] == txn_id and sent["sender"] == mxid:
                return sent["event_id"]  # the homeserver's transaction dedup
        event_id = f"$e{len(self.sent)}"
        self.sent.append(
            {
                "sender": mxid,
                "type": event_type,
                "content": content,
                "txn_id": txn_id,
                "ts_ms": ts_ms,
                "event_id": event_id,
            }
        )
        return event_id

    async def send_message(self, mxid: str, room_id: str, content: dict[str, Any], **kw: Any):
        return await self.send_event(mxid, room_id, "m.room.message", content, **kw)

    async def send_notice(self, room_id: str, text: str, *, txn_id: str) -> None:
        content = {"msgtype": "m.notice", "body": text}
        await self.send_event(BOT, room_id, "m.room.message", content, txn_id=txn_id)

    async def put_state(
        self, mxid: str, room_id: str, event_type: str, content: dict[str, Any]
    ) -> str:
        if self.refuse_state:
            raise make_request_error(403, "", "M_FORBIDDEN", "no power")
        self.state.append((mxid, room_id, event_type, content))
        return f"$state{len(self.state)}"

    async def timeline_page(self, viewer: str, room_id: str, token: Any, limit: int) -> dict:
        return {"chunk": list(reversed(self.sent))[:limit]}

    def notices(self) -> list[tuple[str, str]]:
        return [
            (s["sender"], s["content"]["body"])
            for s in self.sent
            if s["content"].get("msgtype") == "m.notice"
        ]


def user(idnps: str, given: str, family: str) -> RemoteUser:
    return RemoteUser(Idnps(idnps), given, family, "Infirmier")


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Stores]:
    db = await open_database(DatabaseConfig(url=database_url))
    try:
        yield Stores.of(db)
    finally:
        await db.stop()


class Bridge:
    """ToMatrix over the fakes; ``relayed``: the events it handed to the Matrix -> vendors
    routing."""

    def __init__(self, stores: Stores, *, backfill: BackfillConfig | None = None) -> None:
        self.stores = stores
        self.hs = FakeHomeserver(stores)
        self.pl = HistoryVendor(
            user(CAMILLE, "Camille", "Martin"), user(JULIEN, "Julien", "Bernard")
        )
        self.mp = FakeVendor(user(ANA, "Ana", "Garcia"))
        connectors = FakeConnectors(pl=self.pl, mp=self.mp)
        self.portals = Portals(stores, self.hs, connectors, IDS)  # type: ignore[arg-type]

        async def no_outsiders(room_id: str, voice: str) -> list[str]:
            return []

        self.portals.outsiders = no_outsiders  # type: ignore[method-assign]
        self.relayed: list[dict[str, Any]] = []

        async def relay(event: dict[str, Any]) -> list[Any]:
            self.relayed.append(event)
            return []

        self.to_matrix = ToMatrix(
            stores,
            self.hs,  # type: ignore[arg-type]
            self.portals,
            None,  # type: ignore[arg-type]
            MediaConfig(),
            StatusReporter(stores, self.hs, connectors),  # type: ignore[arg-type]
            lambda: None,
            relay,
            backfill=backfill,
        )

    async def portal(self, *members: str) -> None:
        """A portal of pl conversation ``conv`` with these members joined."""
        await self.stores.portals.create(Portal(ROOM, None, False, BOT))
        await self.stores.portals.add_link(ROOM, "pl", "conv")
        await self.stores.portals.add_participants(ROOM, "pl", members)
        self.hs.members[ROOM] = {BOT, *members}

    async def handle(self, event: Any, **kwargs: Any) -> list[Any]:
        return await self.to_matrix.handle("pl", event, **kwargs)


def at(n: int = 0) -> dict[str, Any]:
    return {"event_id": f"ev{n}", "conversation_id": "conv", "timestamp": NOW}


# --- Adding people ------------------------------------------------------------------------


async def test_people_added_join_each_recorded_for_its_vendor_before_the_invite(
    stores: Stores,
) -> None:
    bridge = Bridge(stores)
    camille = ghost("pl", CAMILLE)
    await bridge.portal(camille)
    await stores.permissions.set_default(NOBODY, BLOCK_ALL, keep_exceptions=False)
    bridge.mp.users[NOBODY] = user(NOBODY, "Paul", "Blocked")

    added = ParticipantsAdded(
        **at(1),
        sender=CAMILLE,
        members=(JULIEN,),
        participants=(
            Participant(mxid=NATIVE),
            Participant(idnps=ANA),
            Participant(mxid=OUTSIDER),
            Participant(idnps=NOBODY),
            Participant(idnps=Idnps("810000009836")),
        ),
    )
    writes = await bridge.handle(added)

    julien, ana = ghost("pl", JULIEN), ghost("mp", ANA)
    # Everyone reachable is invited by Camille's ghost, each recorded for pl first.
    assert [(i[0], i[1]) for i in bridge.hs.invites] == [
        (camille, julien),
        (camille, NATIVE),
        (camille, ana),
    ]
    for _, invitee, _, recorded in bridge.hs.invites:
        assert invitee in recorded["pl"], "recorded before the invite: no echo to pl"
    assert {julien, ana} <= bridge.hs.members[ROOM]
    assert await stores.portals.participants(ROOM, "pl") == {camille, julien, NATIVE, ana}
    # Medipeps had no conversation here: one is queued, with everyone in it, recorded.
    link = await stores.portals.link(ROOM, "mp")
    assert link is not None and link.conversation_id is None
    [create, *told] = await stores.outbox.pending(0, 10)
    assert create.connector == "mp" and create.dedup_key == f"create:{ROOM}"
    # Both notices are told to the vendors' users too, as system messages (mp after its
    # conversation is opened: one FIFO per portal).
    assert {(t.connector, t.operation) for t in told} == {
        ("pl", op.SYSTEM_NOTICE),
        ("mp", op.SYSTEM_NOTICE),
    }
    assert len(told) == 4
    assert ana in await stores.portals.participants(ROOM, "mp")
    assert julien in await stores.portals.participants(ROOM, "mp")
    # Refused and unreachable people are named in French notices.
    bodies = [body for _, body in bridge.hs.notices()]
    assert any("810000009836" in b and b.startswith("Impossible d'ajouter") for b in bodies)
    refusal = next(b for b in bodies if OUTSIDER in b)
    assert refusal.startswith("Impossible d'ajouter") and NOBODY in refusal
    assert len(writes) == 1  # its audit row

    # Delivered again (a retry): nothing new is sent.
    sent = len(bridge.hs.sent)
    await bridge.handle(added, retrying=True)
    assert len(bridge.hs.sent) == sent
    assert len(await stores.outbox.pending(0, 10)) == 5, "nothing queued twice"


# --- Removing people ----------------------------------------------------------------------


async def test_people_removed_leave_or_are_removed_by_the_bot_recorded_first(
    stores: Stores,
) -> None:
    bridge = Bridge(stores)
    camille, julien, ana = ghost("pl", CAMILLE), ghost("pl", JULIEN), ghost("mp", ANA)
    await bridge.portal(camille, julien, NATIVE, ana)
    await stores.ghosts.upsert(camille, "pl", CAMILLE, "Camille MARTIN - Infirmier")

    removed = ParticipantsRemoved(
        **at(2),
        sender=CAMILLE,
        members=(JULIEN,),
        participants=(Participant(mxid=NATIVE), Participant(idnps=ANA)),
    )
    await bridge.handle(removed)

    reason = "Retiré(e) de la conversation par Camille MARTIN - Infirmier"
    assert ("leave", julien, reason) in bridge.hs.log
    assert ("leave", ana, reason) in bridge.hs.log
    assert ("kick", BOT, NATIVE, reason) in bridge.hs.log
    assert await stores.portals.participants(ROOM, "pl") == {camille}
    assert bridge.hs.members[ROOM] == {BOT, camille}
    # Camille is still there: the link stays open.
    assert await stores.portals.by_conversation("pl", "conv") == ROOM
    # Again: already gone is fine.
    await bridge.handle(removed, retrying=True)


async def test_the_last_member_leaving_closes_the_link_and_says_so(stores: Stores) -> None:
    bridge = Bridge(stores)
    camille, julien = ghost("pl", CAMILLE), ghost("pl", JULIEN)
    await bridge.portal(camille, julien, NATIVE)
    await stores.outbox.enqueue("pl", ROOM, "send_message", "$before", {"x": 1})

    await bridge.handle(MemberLeft(**at(3), sender=JULIEN))
    assert ("leave", julien, None) in bridge.hs.log
    assert await stores.portals.participants(ROOM, "pl") == {camille, NATIVE}
    assert await stores.portals.by_conversation("pl", "conv") == ROOM
    assert bridge.hs.notices() == []

    await bridge.handle(MemberLeft(**at(4), sender=CAMILLE))
    link = await stores.portals.link(ROOM, "pl")
    assert link is not None and link.closed
    assert await stores.portals.by_conversation("pl", "conv") is None
    [(sender, body)] = bridge.hs.notices()
    assert sender == BOT and body.startswith("Plus aucun participant pl")
    # What was queued before is kept.
    assert [i.dedup_key for i in await stores.outbox.pending(0, 10)] == ["$before"]


# --- Titles and topics --------------------------------------------------------------------


async def test_a_rename_is_a_notice_by_the_ghost_relayed_as_a_room_name(stores: Stores) -> None:
    bridge = Bridge(stores)
    camille = ghost("pl", CAMILLE)
    await bridge.portal(camille)
    await stores.ghosts.upsert(camille, "pl", CAMILLE, "Camille MARTIN - Infirmier")

    await bridge.handle(ConversationRenamed(**at(5), sender=CAMILLE, title="Suivi M. X"))
    [notice] = bridge.hs.sent
    assert notice["sender"] == camille and notice["content"]["msgtype"] == "m.notice"
    assert notice["content"]["body"] == (
        "Camille MARTIN - Infirmier a renommé la conversation : « Suivi M. X »"
    )
    assert bridge.hs.state == []
    [relayed] = bridge.relayed
    assert relayed["type"] == "m.room.name" and relayed["content"] == {"name": "Suivi M. X"}
    assert relayed["sender"] == camille and relayed["event_id"] == notice["event_id"]
    assert relayed["state_key"] == ""
    # The same event again sends nothing new (derived transaction id).
    await bridge.handle(ConversationRenamed(**at(5), sender=CAMILLE, title="Suivi M. X"))
    assert len(bridge.hs.sent) == 1


async def test_titles_and_topics_go_in_room_state_when_configured(stores: Stores) -> None:
    bridge = Bridge(stores)
    bridge.hs.titles_in_room_state = True
    camille = ghost("pl", CAMILLE)
    await bridge.portal(camille)

    await bridge.handle(ConversationRenamed(**at(6), sender=CAMILLE, title="Staff"))
    await bridge.handle(TopicChanged(**at(7), sender=CAMILLE, topic="Préparer la sortie"))
    assert bridge.hs.state == [
        (camille, ROOM, "m.room.name", {"name": "Staff"}),
        (camille, ROOM, "m.room.topic", {"topic": "Préparer la sortie"}),
    ]
    assert bridge.hs.sent == []
    assert [(r["type"], r["content"]) for r in bridge.relayed] == [
        ("m.room.name", {"name": "Staff"}),
        ("m.room.topic", {"topic": "Préparer la sortie"}),
    ]

    # A room where the ghost may not set state: said in a notice instead.
    bridge.hs.refuse_state = True
    await bridge.handle(TopicChanged(**at(8), sender=CAMILLE, topic=None))
    [notice] = bridge.hs.sent
    assert notice["content"]["body"].endswith("a retiré le sujet de la conversation.")
    assert bridge.relayed[-1]["type"] == "m.room.topic"


# --- Opening: who is asking -----------------------------------------------------------------


async def test_a_new_portals_matrix_users_are_invited_by_the_creators_ghost(
    stores: Stores,
) -> None:
    bridge = Bridge(stores, backfill=BackfillConfig(max_messages=0))
    created = ConversationCreated(
        **at(9),
        creator=CAMILLE,
        members=(CAMILLE,),
        participants=(Participant(mxid=NATIVE),),
    )
    await bridge.handle(created)
    camille = ghost("pl", CAMILLE)
    [made] = bridge.hs.created
    assert made["invite"] == [camille] and made["is_direct"]
    [(inviter, invitee, extra, _)] = bridge.hs.invites
    assert (inviter, invitee, extra) == (camille, NATIVE, {"is_direct": True})
    assert await stores.portals.participants(ROOM, "pl") == {camille, NATIVE}


async def test_a_group_portal_records_each_vendors_participants(stores: Stores) -> None:
    bridge = Bridge(stores, backfill=BackfillConfig(max_messages=0))
    created = ConversationCreated(
        **at(10),
        creator=CAMILLE,
        members=(CAMILLE, JULIEN),
        participants=(Participant(mxid=NATIVE), Participant(idnps=ANA)),
        title="Staff",
    )
    await bridge.handle(created)
    everyone = {ghost("pl", CAMILLE), ghost("pl", JULIEN), ghost("mp", ANA), NATIVE}
    assert bridge.hs.created[0]["is_direct"] is False
    assert [(i[0], i[1], i[2]) for i in bridge.hs.invites] == [(ghost("pl", CAMILLE), NATIVE, None)]
    assert await stores.portals.participants(ROOM, "pl") == everyone
    assert await stores.portals.participants(ROOM, "mp") == everyone


async def test_a_conversation_opened_with_a_topic_gives_it_to_the_other_vendors(
    stores: Stores,
) -> None:
    bridge = Bridge(stores, backfill=BackfillConfig(max_messages=0))
    created = ConversationCreated(
        **at(10),
        creator=CAMILLE,
        members=(CAMILLE,),
        participants=(Participant(mxid=NATIVE), Participant(idnps=ANA)),
        title="Staff",
        topic="Suivi post-opératoire",
    )
    await bridge.handle(created)
    # Kept out of the clear room state unless the operator said so (titles_in_room_state).
    assert bridge.hs.created[0]["topic"] == "Suivi post-opératoire"
    queued = [
        (i.operation, op.from_stored(i.operation, i.payload))
        for i in await stores.outbox.pending(0, 100)
        if i.connector == "mp"
    ]
    assert [kind for kind, _ in queued] == [op.CREATE_CONVERSATION, op.SET_TOPIC]
    topic = queued[1][1]
    assert isinstance(topic, op.SetTopic) and topic.topic == "Suivi post-opératoire"
    assert topic.by.mxid == ghost("pl", CAMILLE)


# --- Backfill -----------------------------------------------------------------------------


def history_message(n: int, sender: str, minutes_ago: int) -> MessageReceived:
    return MessageReceived(
        event_id=f"h{n}",
        conversation_id="conv",
        timestamp=datetime.now(UTC) - timedelta(minutes=minutes_ago),
        message_id=f"m{n}",
        sender=Idnps(sender),
        text=f"message {n}",
    )


async def test_a_new_portal_gets_its_history_in_order_with_its_times_once(
    stores: Stores,
) -> None:
    bridge = Bridge(stores, backfill=BackfillConfig(max_messages=3, max_age_days=1))
    old = history_message(0, CAMILLE, 60 * 24 * 3)  # too old
    gone = history_message(2, NOBODY, 20)  # nobody describes this sender
    bridge.pl.messages = [
        old,
        history_message(1, CAMILLE, 30),
        gone,
        history_message(3, JULIEN, 10),
        history_message(4, CAMILLE, 5),
    ]
    created = ConversationCreated(
        **at(11),
        creator=CAMILLE,
        members=(CAMILLE, JULIEN),
        participants=(Participant(idnps=ANA),),
    )
    await bridge.handle(created)

    [(cid, limit, since)] = bridge.pl.asked
    assert (cid, limit) == ("conv", 3)
    assert timedelta(hours=23) < datetime.now(UTC) - since < timedelta(hours=25)
    messages = [s for s in bridge.hs.sent if s["content"].get("msgtype") == "m.text"]
    assert [(s["sender"], s["content"]["body"]) for s in messages] == [
        (ghost("pl", JULIEN), "message 3"),
        (ghost("pl", CAMILLE), "message 4"),
    ], "the last 3, oldest first; the one nobody describes skipped"
    expected_ts = [int(m.timestamp.timestamp() * 1000) for m in bridge.pl.messages[3:]]
    assert [s["ts_ms"] for s in messages] == expected_ts
    assert bridge.to_matrix.backfill.skipped == 1
    # Mapped, and relayed to the other vendor like live messages.
    assert await stores.messages.event_for("pl", "m3", room_id=ROOM) == messages[0]["event_id"]
    assert [r["event_id"] for r in bridge.relayed] == [m["event_id"] for m in messages]

    # The creation redelivered (a crash before it was marked done): nothing is doubled.
    await bridge.handle(created, retrying=True, recovered=True)
    assert len([s for s in bridge.hs.sent if s["content"].get("msgtype") == "m.text"]) == 2
    assert len(bridge.relayed) == 2


async def test_a_backfill_cut_short_resumes_without_doubling(stores: Stores) -> None:
    bridge = Bridge(stores, backfill=BackfillConfig(max_messages=10))
    bridge.pl.messages = [history_message(n, CAMILLE, 50 - n) for n in range(4)]
    created = ConversationCreated(
        **at(12), creator=CAMILLE, members=(CAMILLE,), participants=(Participant(mxid=NATIVE),)
    )
    # The homeserver fails on the third message: the creation is retried later.
    real_send = bridge.hs.send_event
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> str:
        nonlocal calls
        if args[2] == "m.room.message" and args[3].get("msgtype") == "m.text":
            calls += 1
            if calls == 3:
                raise make_request_error(502, "", None, None)
        return await real_send(*args, **kwargs)

    bridge.hs.send_event = flaky  # type: ignore[method-assign]
    with pytest.raises(MatrixRequestError):
        await bridge.handle(created)
    assert await stores.messages.event_for("pl", "m1", room_id=ROOM) is not None
    assert await stores.messages.event_for("pl", "m2", room_id=ROOM) is None

    await bridge.handle(created, retrying=True, recovered=True)
    bodies = [
        s["content"]["body"] for s in bridge.hs.sent if s["content"].get("msgtype") == "m.text"
    ]
    assert bodies == [f"message {n}" for n in range(4)]


async def test_a_former_members_messages_are_shown_by_their_ghost_which_then_leaves(
    stores: Stores,
) -> None:
    bridge = Bridge(stores)
    bridge.pl.messages = [history_message(1, JULIEN, 30), history_message(2, CAMILLE, 20)]
    created = ConversationCreated(
        **at(13), creator=CAMILLE, members=(CAMILLE,), participants=(Participant(idnps=ANA),)
    )
    await bridge.handle(created)
    julien = ghost("pl", JULIEN)
    [first, _] = [s for s in bridge.hs.sent if s["content"].get("msgtype") == "m.text"]
    assert first["sender"] == julien
    assert ("leave", julien, {VISITOR_KEY: True}) in bridge.hs.log
    assert julien not in bridge.hs.members[ROOM]
    # Told to every side before the join: the join routes nowhere.
    assert julien in await stores.portals.participants(ROOM, "pl")
    assert julien in await stores.portals.participants(ROOM, "mp")

    # The vendor then pushes a message the backfill already put in: not doubled.
    live = history_message(2, CAMILLE, 20)
    assert await bridge.handle(live) == []
    assert len([s for s in bridge.hs.sent if s["content"].get("msgtype") == "m.text"]) == 2


async def test_a_vendor_adding_someone_of_a_vendor_that_had_left_reopens_its_link(
    stores: Stores,
) -> None:
    bridge = Bridge(stores)
    camille = ghost("pl", CAMILLE)
    await bridge.portal(camille)
    await stores.portals.add_link(ROOM, "mp", "mp-conv")
    await stores.portals.close_link(ROOM, "mp")

    await bridge.handle(
        ParticipantsAdded(**at(14), sender=CAMILLE, participants=(Participant(idnps=ANA),))
    )
    link = await stores.portals.link(ROOM, "mp")
    assert link is not None and not link.closed and link.conversation_id == "mp-conv"
    assert await stores.outbox.pending(0, 10) == [], "no second conversation for mp"
    assert ghost("mp", ANA) in bridge.hs.members[ROOM]


async def test_no_title_enters_a_room_with_members_of_untrusted_servers(stores: Stores) -> None:
    bridge = Bridge(stores)
    camille = ghost("pl", CAMILLE)
    await bridge.portal(camille)

    async def outsiders(room_id: str, voice: str) -> list[str]:
        return ["untrusted.example"]

    bridge.portals.outsiders = outsiders  # type: ignore[method-assign]
    [audit] = await bridge.handle(ConversationRenamed(**at(15), sender=CAMILLE, title="Patient X"))
    assert audit.record.outcome == "refused"
    assert bridge.hs.sent == [] and bridge.hs.state == [] and bridge.relayed == []
