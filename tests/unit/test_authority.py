"""Who may say what about another event (``bridge/core/authority.py``), what an encrypted event may
turn out to be (the router), and how deliveries act on relations: scoped to their portal, a
vendor's 404 on a delete never recorded as delivered, a refused quote not losing the message.

End to end through Synapse: tests/test_e2e_hostile_member.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.util.async_db import Database

from bridge.config import MediaConfig
from bridge.core import operations as op
from bridge.core.authority import Authority, Refused
from bridge.core.delivery import Delivery
from bridge.core.errors import PermanentFailure
from bridge.core.router import Router
from bridge.db.inbox import MATRIX_ORIGIN, InboxItem
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.matrix.homeserver import Homeserver
from connectors.base import Capabilities, ConnectorError, OutboundMessage, Sender

ROOM, OTHER = "!ward:eimis.example", "!other:eimis.example"
VOICE = "@eimis_bot:eimis.example"
MALLORY, CAROL = "@mallory:eimis.example", "@carol:eimis.example"


@pytest.fixture
async def stores(db: Database) -> Stores:
    return Stores.of(db)


class FakeHomeserver:
    """What the homeserver says of events (their senders) and of who may redact others."""

    def __init__(
        self, events: dict[str, dict[str, Any]], moderators: frozenset[str] = frozenset()
    ) -> None:
        self.events = events
        self.moderators = moderators
        self.asked: list[str] = []

    async def event_in_room(self, viewer: str, room_id: str, event_id: str) -> dict | None:
        self.asked.append(event_id)
        event = self.events.get(event_id)
        return event if event is not None and event["room_id"] == room_id else None

    async def may_redact_others(self, viewer: str, room_id: str, mxid: str) -> bool:
        return mxid in self.moderators


def authority(stores: Stores, hs: FakeHomeserver) -> Authority:
    return Authority(hs, stores)  # type: ignore[arg-type]


EVENTS = {
    "$carol": {"room_id": ROOM, "sender": CAROL},
    "$elsewhere": {"room_id": OTHER, "sender": CAROL},
}


async def reason_of(call: Any) -> str:
    with pytest.raises(Refused) as refused:
        await call
    return refused.value.code


async def test_only_the_author_may_edit(stores: Stores) -> None:
    auth = authority(stores, FakeHomeserver(EVENTS))
    await auth.may_edit(ROOM, CAROL, "$carol", VOICE)
    assert await reason_of(auth.may_edit(ROOM, MALLORY, "$carol", VOICE)) == "not_the_author"


async def test_redactions_come_from_the_author_or_a_member_with_the_power_to(
    stores: Stores,
) -> None:
    auth = authority(stores, FakeHomeserver(EVENTS, moderators=frozenset({"@cadre:eimis.example"})))
    await auth.may_redact(ROOM, CAROL, "$carol", VOICE)
    await auth.may_redact(ROOM, "@cadre:eimis.example", "$carol", VOICE)
    code = await reason_of(auth.may_redact(ROOM, MALLORY, "$carol", VOICE))
    assert code == "no_power_to_redact"


async def test_relations_into_another_portal_are_refused(stores: Stores) -> None:
    hs = FakeHomeserver(EVENTS)
    auth = authority(stores, hs)
    # The homeserver does not know it in this room; the message map knows it elsewhere.
    await stores.messages.add("pl", "pl-1", OTHER, "$carried")
    for call in (
        auth.same_portal(ROOM, "$carried"),
        auth.may_edit(ROOM, CAROL, "$carried", VOICE),
        auth.may_redact(ROOM, CAROL, "$carried", VOICE),
    ):
        assert await reason_of(call) == "other_portal"
    assert hs.asked == [], "refused before asking the homeserver"
    await auth.same_portal(OTHER, "$carried")
    await auth.same_portal(ROOM, "$never-carried")  # a reply to it goes, without the quote
    # What the homeserver does not have in this room cannot be edited or redacted either.
    assert await reason_of(auth.may_edit(ROOM, CAROL, "$elsewhere", VOICE)) == "unknown_target"
    assert await reason_of(auth.may_redact(ROOM, CAROL, "$nothing", VOICE)) == "unknown_target"


# --- Power levels, as the homeserver's room state says ---------------------------------------


def homeserver_with(state: dict[str, dict[str, Any] | None], events: list[Any]) -> Homeserver:
    hs = Homeserver.__new__(Homeserver)

    async def get_state(mxid: str, room_id: str, event_type: str) -> dict[str, Any] | None:
        return state.get(event_type)

    class Api:
        def user(self, mxid: Any) -> Api:
            return self

        async def request(self, *args: Any, **kwargs: Any) -> Any:
            return events

    hs.get_state = get_state  # type: ignore[method-assign]
    hs.api = Api()  # type: ignore[assignment]
    return hs


@pytest.mark.parametrize(
    ("levels", "mxid", "may"),
    [
        ({"users": {"@cadre:x": 50}, "redact": 50}, "@cadre:x", True),
        ({"users": {"@cadre:x": 50}, "redact": 50}, "@mallory:x", False),
        ({"users_default": 0}, "@mallory:x", False),  # "redact" unset: 50
        ({"users_default": 0, "redact": 0}, "@mallory:x", True),
        ({"users": {"@cadre:x": 100}, "redact": "50"}, "@cadre:x", True),  # malformed: 50
    ],
)
async def test_the_power_to_redact_others_is_the_rooms_redact_level(
    levels: dict[str, Any], mxid: str, may: bool
) -> None:
    hs = homeserver_with(
        {"m.room.power_levels": levels, "m.room.create": {"room_version": "10"}}, []
    )
    assert await hs.may_redact_others(VOICE, ROOM, mxid) is may


async def test_a_room_version_12_creator_may_redact_others() -> None:
    create = {"type": "m.room.create", "state_key": "", "sender": "@owner:x", "content": {}}
    state = {
        "m.room.power_levels": {"users_default": 0},
        "m.room.create": {"room_version": "12", "additional_creators": ["@co:x"]},
    }
    hs = homeserver_with(state, [create])
    assert await hs.may_redact_others(VOICE, ROOM, "@owner:x")
    assert await hs.may_redact_others(VOICE, ROOM, "@co:x")
    assert not await hs.may_redact_others(VOICE, ROOM, "@mallory:x")


# --- What an encrypted event may turn out to be ----------------------------------------------


class Decrypting:
    def __init__(self, inner_type: str) -> None:
        self.inner_type = inner_type

    async def decrypt(self, raw: dict[str, Any], wait_s: float = 0.0) -> dict[str, Any]:
        return {**raw, "type": self.inner_type, "content": {"redacts": "$carol"}}


@pytest.mark.parametrize(
    "inner_type",
    ["m.room.redaction", "m.room.member", "m.room.power_levels", "m.receipt", "m.typing", "x"],
)
async def test_an_encrypted_event_that_is_not_message_like_is_refused(inner_type: str) -> None:
    told: list[tuple[str, str, str]] = []

    async def on_refused(room_id: str, event_id: str, reason: str) -> None:
        told.append((room_id, event_id, reason))

    router = Router.__new__(Router)
    router.crypto = Decrypting(inner_type)  # type: ignore[assignment]
    router.ids_ours = lambda mxid: False
    router.from_matrix = SimpleNamespace(on_refused=on_refused)  # type: ignore[assignment]
    raw = {"type": "m.room.encrypted", "room_id": ROOM, "event_id": "$x", "sender": MALLORY}
    item = InboxItem(1, MATRIX_ORIGIN, ROOM, raw, 0, 0)
    with pytest.raises(PermanentFailure):
        await router._readable(item)
    assert told and told[0][:2] == (ROOM, "$x") and "chiffr" in told[0][2]


@pytest.mark.parametrize("inner_type", ["m.room.message", "m.reaction", "m.sticker"])
async def test_message_like_encrypted_events_are_read(inner_type: str) -> None:
    router = Router.__new__(Router)
    router.crypto = Decrypting(inner_type)  # type: ignore[assignment]
    router.ids_ours = lambda mxid: False
    raw = {"type": "m.room.encrypted", "room_id": ROOM, "event_id": "$x", "sender": MALLORY}
    readable = await router._readable(InboxItem(1, MATRIX_ORIGIN, ROOM, raw, 0, 0))
    assert readable is not None and readable["type"] == inner_type


# --- Deliveries act within their portal ------------------------------------------------------


class Vendor:
    """A vendor that has lost (404) every message it is asked to delete, and refuses a quote of
    a message it no longer has."""

    capabilities = Capabilities(replies=True, edits=True, deletions=True, reactions=True)

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.gone: set[str] = set()

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        if message.reply_to in self.gone:
            raise ConnectorError("404 message_not_found", retriable=False)
        self.calls.append(("send", conversation_id, message.text, str(message.reply_to)))
        return f"sent-{len(self.calls)}"

    async def edit_message(self, conversation_id: str, message_id: str, message: Any) -> None:
        self.calls.append(("edit", conversation_id, message_id))

    async def add_reaction(self, conversation_id: str, message_id: str, *args: Any) -> str:
        self.calls.append(("react", conversation_id, message_id))
        return "r1"

    async def delete_message(self, conversation_id: str, message_id: str, sender: Sender) -> bool:
        self.calls.append(("delete", conversation_id, message_id))
        return message_id not in self.gone


class Statuses:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    async def report(self, **kwargs: Any) -> None:
        self.reports.append(kwargs)


async def delivery_with(stores: Stores, vendor: Vendor) -> tuple[Delivery, Statuses]:
    for room, conversation in ((ROOM, "conv-ward"), (OTHER, "conv-other")):
        await stores.portals.create(Portal(room, None, False, VOICE))
        await stores.portals.add_link(room, "pl", conversation)
    statuses = Statuses()
    delivery = Delivery(
        stores,
        None,  # type: ignore[arg-type]
        {"pl": vendor},  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        MediaConfig(),
        statuses,  # type: ignore[arg-type]
    )
    return delivery, statuses


async def deliver(stores: Stores, delivery: Delivery, operation: str, payload: dict) -> str:
    """Queue and deliver one item in ROOM; the outcome its audit row records."""
    sender = {"mxid": CAROL, "display_name": "Carol", "connector": None, "idnps": None}
    key = f"{operation}-{payload['event_id']}"
    await stores.outbox.enqueue("pl", ROOM, operation, key, {"sender": sender, **payload})
    [item] = await stores.outbox.pending(0, 10)
    await delivery.handle(item)
    assert not await stores.outbox.pending(0, 10)
    [row] = [r for r in await stores.audit.query(portal=ROOM) if r.event_id == payload["event_id"]]
    return f"{row.outcome}:{row.detail}"


async def test_a_vendor_404_on_a_delete_is_recorded_as_not_there(stores: Stores) -> None:
    vendor = Vendor()
    delivery, statuses = await delivery_with(stores, vendor)
    await stores.messages.add("pl", "m-gone", ROOM, "$gone")
    await stores.messages.add("pl", "m-here", ROOM, "$here")
    vendor.gone.add("m-gone")

    outcome = await deliver(
        stores, delivery, op.REDACT, {"event_id": "$r1", "target_event": "$gone"}
    )
    assert outcome == "skipped:vendor_404"
    outcome = await deliver(
        stores, delivery, op.REDACT, {"event_id": "$r2", "target_event": "$here"}
    )
    assert outcome == "delivered:None"
    assert [c[2] for c in vendor.calls] == ["m-gone", "m-here"]
    assert statuses.reports == []


async def test_relations_act_only_on_messages_of_their_own_portal(stores: Stores) -> None:
    vendor = Vendor()
    delivery, _ = await delivery_with(stores, vendor)
    await stores.messages.add("pl", "m-other", OTHER, "$other")
    for operation, payload in (
        (op.EDIT_MESSAGE, {"content": {"msgtype": "m.text", "body": "faux"}}),
        (op.ADD_REACTION, {"key": "👎"}),
        (op.REDACT, {}),
    ):
        event_id = f"${operation}"
        outcome = await deliver(
            stores, delivery, operation, {"event_id": event_id, "target_event": "$other", **payload}
        )
        assert outcome == "skipped:None"
    assert vendor.calls == [], "nothing done to the other conversation's message"

    # A reply quoting it goes without the quote.
    reply = {
        "event_id": "$reply",
        "content": {"msgtype": "m.text", "body": "réponse"},
        "reply_to_event": "$other",
    }
    assert (await deliver(stores, delivery, op.SEND_MESSAGE, reply)).startswith("delivered")
    assert vendor.calls == [("send", "conv-ward", "réponse", "None")]


async def test_a_reply_whose_quote_the_vendor_refuses_is_sent_without_it(stores: Stores) -> None:
    vendor = Vendor()
    delivery, statuses = await delivery_with(stores, vendor)
    await stores.messages.add("pl", "m-deleted-there", ROOM, "$quoted")
    vendor.gone.add("m-deleted-there")
    reply = {
        "event_id": "$reply",
        "content": {"msgtype": "m.text", "body": "toujours là"},
        "reply_to_event": "$quoted",
    }
    assert await deliver(stores, delivery, op.SEND_MESSAGE, reply) == "delivered:degraded"
    assert vendor.calls == [("send", "conv-ward", "toujours là", "None")]
    [status] = statuses.reports
    assert status["outcome"] == "SUCCESS" and "sans la citation" in status["detail"]
