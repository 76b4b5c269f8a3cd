"""Outbox operations as types (``bridge/core/operations.py``) and their executors
(``bridge/core/executors/``).

Every kind stores the very JSON the bridge stored before the operations had types, and reads it
back as the same operation; rows queued by an earlier version (sealed, or in clear from before
sealing) are delivered by this one; each executor says what it created at the vendor (its
message ids, its reaction ids), and delivery records exactly that in the message map.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from mautrix.util.async_db import Database

from bridge.config import MediaConfig
from bridge.core import operations as op
from bridge.core.delivery import Delivery
from bridge.core.errors import PermanentFailure
from bridge.core.executors import (
    Delivered,
    Executors,
    MessageMapped,
    ReactionMapped,
    Skipped,
)
from bridge.core.members import Member
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.i18n import set_locale
from bridge.secrets import SecretBox, generate_key
from connectors.base import Capabilities, NewConversation, OutboundMessage, Sender
from connectors.idnps import Idnps, luhn_check_digit

ROOM = "!ward:eimis.example"
VOICE = "@eimis_bot:eimis.example"
RPPS = "1234567890"
IDNPS = Idnps(f"8{RPPS}{luhn_check_digit(RPPS)}")
ALICE = Member("@alice:eimis.example", "Alice Martin", None, None)
GHOST = Member(f"@pl_{IDNPS}:eimis.example", "Dr Bob", "mp", IDNPS)
ALICE_JSON = {
    "mxid": "@alice:eimis.example",
    "display_name": "Alice Martin",
    "connector": None,
    "idnps": None,
}
GHOST_JSON = {
    "mxid": f"@pl_{IDNPS}:eimis.example",
    "display_name": "Dr Bob",
    "connector": "mp",
    "idnps": str(IDNPS),
}

EXAMPLES: list[tuple[op.Operation, dict[str, Any]]] = [
    (
        op.CreateConversation(title="Chambre 12", members=(IDNPS,), external=(ALICE, GHOST)),
        {"title": "Chambre 12", "members": [str(IDNPS)], "external": [ALICE_JSON, GHOST_JSON]},
    ),
    (
        op.SendMessage(
            event_id="$m",
            sender=ALICE,
            content={"msgtype": "m.text", "body": "bonjour"},
            ts=1700000000000,
            reply_to_event="$q",
        ),
        {
            "event_id": "$m",
            "sender": ALICE_JSON,
            "content": {"msgtype": "m.text", "body": "bonjour"},
            "ts": 1700000000000,
            "reply_to_event": "$q",
        },
    ),
    (
        op.EditMessage(
            event_id="$e",
            target_event="$m",
            sender=GHOST,
            content={"msgtype": "m.text", "body": "bonsoir"},
            ts=1700000000001,
        ),
        {
            "event_id": "$e",
            "target_event": "$m",
            "sender": GHOST_JSON,
            "content": {"msgtype": "m.text", "body": "bonsoir"},
            "ts": 1700000000001,
        },
    ),
    (
        op.Redact(event_id="$d", target_event="$m", sender=ALICE, ts=None),
        {"event_id": "$d", "target_event": "$m", "sender": ALICE_JSON, "ts": None},
    ),
    (
        op.AddReaction(event_id="$r", target_event="$m", sender=ALICE, key="👍", ts=5),
        {"event_id": "$r", "target_event": "$m", "sender": ALICE_JSON, "key": "👍", "ts": 5},
    ),
    (
        op.MarkRead(event_id="$m", sender=ALICE),
        {"event_id": "$m", "sender": ALICE_JSON},
    ),
    (
        op.AddParticipants(event_id="$j", members=(IDNPS,), external=(ALICE,), by=GHOST),
        {
            "event_id": "$j",
            "members": [str(IDNPS)],
            "external": [ALICE_JSON],
            "by": GHOST_JSON,
        },
    ),
    (
        op.RemoveParticipants(event_id="$k", external=(ALICE,), by=None, reason="fin de séjour"),
        {
            "event_id": "$k",
            "members": [],
            "external": [ALICE_JSON],
            "by": None,
            "reason": "fin de séjour",
        },
    ),
    (
        op.SetTitle(event_id="$n", title="Chambre 14", by=ALICE),
        {"event_id": "$n", "title": "Chambre 14", "by": ALICE_JSON},
    ),
    (
        op.SetTopic(event_id="$t", topic=None, by=GHOST),
        {"event_id": "$t", "topic": None, "by": GHOST_JSON},
    ),
    (
        op.SystemNotice(event_id="system:x", text="Impossible d'ajouter : X."),
        {"event_id": "system:x", "text": "Impossible d'ajouter : X."},
    ),
]
"""Each kind with the payload the bridge wrote for it before operations had types (the dicts
``from_matrix.py`` and ``portals.py`` built by hand): the stored format, key order included."""


# --- The union and its stored form ------------------------------------------------------------


def test_every_kind_has_an_example() -> None:
    assert {type(example) for example, _ in EXAMPLES} == set(op.OPERATION_TYPES)
    assert [t.kind for t in op.OPERATION_TYPES] == [
        op.CREATE_CONVERSATION,
        op.SEND_MESSAGE,
        op.EDIT_MESSAGE,
        op.REDACT,
        op.ADD_REACTION,
        op.MARK_READ,
        op.ADD_PARTICIPANTS,
        op.REMOVE_PARTICIPANTS,
        op.SET_TITLE,
        op.SET_TOPIC,
        op.SYSTEM_NOTICE,
    ]


@pytest.mark.parametrize(("operation", "stored"), EXAMPLES, ids=lambda v: getattr(v, "kind", ""))
def test_each_kind_stores_the_json_it_always_stored(
    operation: op.Operation, stored: dict[str, Any]
) -> None:
    assert json.dumps(operation.to_json()) == json.dumps(stored)


@pytest.mark.parametrize(("operation", "stored"), EXAMPLES, ids=lambda v: getattr(v, "kind", ""))
def test_each_kind_round_trips_through_its_stored_json(
    operation: op.Operation, stored: dict[str, Any]
) -> None:
    written = json.loads(json.dumps(operation.to_json()))
    read = op.from_stored(operation.kind, written)
    assert read == operation and type(read) is type(operation)
    assert op.from_stored(operation.kind, stored) == operation


def test_rows_of_older_writers_read_with_defaults() -> None:
    """Payloads from before some fields existed (a sender without connector or IDNPS, no ``ts``,
    no ``reply_to_event``) read as the operation they were."""
    bare = {"mxid": "@alice:eimis.example", "display_name": "Alice Martin"}
    message = op.from_stored(
        "send_message", {"event_id": "$m", "sender": bare, "content": {"body": "x"}}
    )
    assert message == op.SendMessage(
        event_id="$m", sender=ALICE, content={"body": "x"}, ts=None, reply_to_event=None
    )
    redaction = op.from_stored("redact", {"event_id": "$d", "target_event": "$m", "sender": bare})
    assert redaction == op.Redact(event_id="$d", target_event="$m", sender=ALICE, ts=None)


def test_a_row_no_operation_reads_is_a_permanent_failure_without_its_content() -> None:
    with pytest.raises(op.UnreadableOperation, match="unknown outbox operation 'teleport'"):
        op.from_stored("teleport", {"event_id": "$m"})
    with pytest.raises(PermanentFailure) as missing:
        op.from_stored("send_message", {"event_id": "$m", "content": {"body": "secret"}})
    assert "secret" not in str(missing.value) and "send_message" in str(missing.value)
    with pytest.raises(op.UnreadableOperation):
        op.from_stored("add_reaction", {**EXAMPLES[4][1], "key": 3})
    assert op.readable("teleport", {}) is None
    assert op.readable("mark_read", EXAMPLES[5][1]) == EXAMPLES[5][0]


# --- Executors say what they created -------------------------------------------------------------


class Vendor:
    """A vendor whose capabilities the test sets; it numbers what it creates."""

    def __init__(self, capabilities: Capabilities) -> None:
        self.capabilities = capabilities
        self.calls: list[tuple[Any, ...]] = []
        self.gone: set[str] = set()

    async def create_conversation(self, conversation: NewConversation) -> str:
        self.calls.append(("create", conversation.request_id, conversation.members))
        return "conv-new"

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        self.calls.append(("send", conversation_id, message.text, message.reply_to))
        return f"m-{len(self.calls)}"

    async def edit_message(
        self, conversation_id: str, message_id: str, message: OutboundMessage
    ) -> None:
        self.calls.append(("edit", conversation_id, message_id, message.text))

    async def delete_message(self, conversation_id: str, message_id: str, sender: Sender) -> bool:
        self.calls.append(("delete", conversation_id, message_id))
        return message_id not in self.gone

    async def add_reaction(
        self, conversation_id: str, message_id: str, sender: Sender, key: str, request_id: str
    ) -> str:
        self.calls.append(("react", conversation_id, message_id, key))
        return f"r-{len(self.calls)}"

    async def remove_reaction(
        self, conversation_id: str, message_id: str, reaction_id: str, sender: Sender
    ) -> bool:
        self.calls.append(("unreact", conversation_id, message_id, reaction_id))
        return True

    async def mark_read(self, conversation_id: str, reader: Sender, message_id: str) -> None:
        self.calls.append(("read", conversation_id, message_id))


ALL = Capabilities(replies=True, edits=True, deletions=True, reactions=True, read_receipts=True)
NONE = Capabilities(replies=True)


@pytest.fixture
async def stores(db: Database) -> Stores:
    stores = Stores.of(db)
    await stores.portals.create(Portal(ROOM, None, False, VOICE))
    await stores.portals.add_link(ROOM, "pl", "conv")
    return stores


def executors(stores: Stores, vendor: Vendor) -> Executors:
    return Executors(stores, None, {"pl": vendor}, None, MediaConfig())  # type: ignore[arg-type]


def text(event_id: str, body: str) -> op.SendMessage:
    return op.SendMessage(
        event_id=event_id, sender=ALICE, content={"msgtype": "m.text", "body": body}, ts=0
    )


async def test_a_message_maps_each_vendor_message_it_became(stores: Stores) -> None:
    vendor = Vendor(Capabilities(max_text_length=10))
    outcome = await executors(stores, vendor).run("pl", ROOM, text("$m", "abcdefgh ijklmnop"))
    assert isinstance(outcome, Delivered) and outcome.conversation == "conv"
    assert [call[2].strip() for call in vendor.calls] == ["abcdefgh", "ijklmnop"]
    assert outcome.mapped == (MessageMapped("m-1", "$m"), MessageMapped("m-2", "$m"))
    assert any("découpé en 2 messages" in note for note in outcome.notes)


async def test_a_reaction_maps_the_vendor_reaction(stores: Stores) -> None:
    await stores.messages.add("pl", "m-9", ROOM, "$m")
    reaction = op.AddReaction(event_id="$r", target_event="$m", sender=ALICE, key="👍")
    outcome = await executors(stores, Vendor(ALL)).run("pl", ROOM, reaction)
    assert outcome == Delivered("conv", (), (ReactionMapped("m-9", "r-1", "$r"),))
    assert outcome.mapped[0].ref == op.reaction_ref("m-9", "r-1")


STAND_INS = {
    "fr": (
        [
            "✏️ Correction : x",
            "Alice Martin a réagi avec 👍",
            "🗑 Alice Martin a supprimé un message.",
        ],
        [
            ("pl ne permet pas de modifier un message : envoyé comme une correction signalée",),
            ("pl n'a pas de réactions : envoyée sous forme de court message",),
            ("pl ne permet pas de supprimer un message : ses utilisateurs en ont été informés",),
        ],
    ),
    "en": (
        [
            "✏️ Correction: x",
            "Alice Martin reacted 👍",
            "🗑 Alice Martin deleted a message.",
        ],
        [
            ("pl has no edits: sent as a marked correction",),
            ("pl has no reactions: sent as a short message",),
            ("pl cannot delete messages: its users were told",),
        ],
    ),
}


@pytest.fixture(params=sorted(STAND_INS))
def locale(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each locale in turn (the default, French, restored after)."""
    set_locale(request.param)
    yield request.param
    set_locale("fr")


async def test_what_a_vendor_cannot_do_maps_its_stand_in_message(
    stores: Stores, locale: str
) -> None:
    """An edit, a deletion, a reaction to a vendor without them: one stand-in message each,
    quoting the message it is about, mapped to the Matrix event it stands for, in the bridge's
    locale (French by default)."""
    await stores.messages.add("pl", "m-9", ROOM, "$m")
    vendor = Vendor(NONE)
    run = executors(stores, vendor).run
    edit = op.EditMessage(
        event_id="$e", target_event="$m", sender=ALICE, content={"msgtype": "m.text", "body": "x"}
    )
    reaction = op.AddReaction(event_id="$r", target_event="$m", sender=ALICE, key="👍")
    redaction = op.Redact(event_id="$d", target_event="$m", sender=ALICE)
    outcomes = [await run("pl", ROOM, o) for o in (edit, reaction, redaction)]
    assert [o.mapped for o in outcomes if isinstance(o, Delivered)] == [
        (MessageMapped("m-1", "$e"),),
        (MessageMapped("m-2", "$r"),),
        (MessageMapped("m-3", "$d"),),
    ]
    texts, notes = STAND_INS[locale]
    assert vendor.calls == [("send", "conv", t, "m-9") for t in texts]
    assert [o.notes for o in outcomes if isinstance(o, Delivered)] == notes


async def test_what_changes_nothing_new_maps_nothing(stores: Stores) -> None:
    await stores.messages.add("pl", "m-9", ROOM, "$m")
    await stores.messages.add("pl", op.reaction_ref("m-9", "r-7"), ROOM, "$r")
    vendor = Vendor(ALL)
    run = executors(stores, vendor).run
    edit = op.EditMessage(
        event_id="$e", target_event="$m", sender=ALICE, content={"msgtype": "m.text", "body": "x"}
    )
    assert await run("pl", ROOM, edit) == Delivered("conv")
    assert await run("pl", ROOM, op.MarkRead(event_id="$m", sender=ALICE)) == Delivered("conv")
    unreact = op.Redact(event_id="$u", target_event="$r", sender=ALICE)
    assert await run("pl", ROOM, unreact) == Delivered("conv")
    assert vendor.calls == [
        ("edit", "conv", "m-9", "x"),
        ("read", "conv", "m-9"),
        ("unreact", "conv", "m-9", "r-7"),
    ]


async def test_nothing_to_do_there_is_skipped(stores: Stores) -> None:
    """Relations to what never reached the vendor, and deletions of what it no longer has."""
    await stores.messages.add("pl", "m-gone", ROOM, "$gone")
    vendor = Vendor(ALL)
    vendor.gone.add("m-gone")
    run = executors(stores, vendor).run
    never = op.AddReaction(event_id="$r", target_event="$never", sender=ALICE, key="👍")
    assert await run("pl", ROOM, never) == Skipped("conv")
    assert await run("pl", ROOM, op.MarkRead(event_id="$never", sender=ALICE)) == Skipped("conv")
    gone = op.Redact(event_id="$d", target_event="$gone", sender=ALICE)
    assert await run("pl", ROOM, gone) == Skipped("conv", "vendor_404")


async def test_a_conversation_is_opened_once(stores: Stores) -> None:
    other = "!new:eimis.example"
    await stores.portals.create(Portal(other, None, False, VOICE))
    await stores.portals.add_link(other, "pl", None)
    vendor = Vendor(ALL)
    create = op.CreateConversation(title=None, members=(IDNPS,), external=(ALICE,))
    outcome = await executors(stores, vendor).run("pl", other, create)
    assert outcome == Delivered("conv-new", opened=True)
    assert vendor.calls == [("create", other, (IDNPS,))]
    assert await executors(stores, vendor).run("pl", ROOM, create) == Skipped("conv")


# --- Rows queued before the upgrade are delivered ---------------------------------------------


class Statuses:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.notices: list[str] = []

    async def report(self, **kwargs: Any) -> None:
        self.reports.append(kwargs)

    async def notice(self, room_id: str, text: str, *, txn_id: str) -> None:
        self.notices.append(text)


async def queue_as_before(
    db: Database, box: SecretBox | None, room: str, kind: str, key: str, payload: dict[str, Any]
) -> None:
    """An outbox row exactly as the bridge wrote it before operations had types: the payload
    dict as JSON, sealed for its row (or in clear, as before sealing existed)."""
    stored = json.dumps(payload)
    if box is not None:
        stored = box.seal(stored, f"outbox|pl|{key}")
    await db.execute(
        "INSERT INTO outbox (connector, room_id, operation, dedup_key, payload, created_at) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        "pl",
        room,
        kind,
        key,
        stored,
        1,
    )


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "in-clear"])
async def test_rows_queued_before_the_upgrade_are_delivered(db: Database, sealed: bool) -> None:
    box = SecretBox(base64.b64decode(generate_key())) if sealed else None
    stores = Stores.of(db, secrets=box)
    room = "!old:eimis.example"
    await stores.portals.create(Portal(room, None, False, VOICE))
    await stores.portals.add_link(room, "pl", None)
    payloads = {o.kind: stored for o, stored in EXAMPLES}
    rows = [
        ("create_conversation", f"create:{room}", payloads["create_conversation"]),
        ("send_message", "$m", {**payloads["send_message"], "reply_to_event": None}),
        ("add_reaction", "$r", payloads["add_reaction"]),
        ("edit_message", "$e", payloads["edit_message"]),
        ("mark_read", "read:@alice:eimis.example:$m", payloads["mark_read"]),
        ("redact", "$d", {**payloads["redact"], "target_event": "$r"}),
    ]
    for kind, key, payload in rows:
        await queue_as_before(db, box, room, kind, key, payload)
    vendor = Vendor(ALL)
    statuses = Statuses()
    delivery = Delivery(
        stores,
        None,  # type: ignore[arg-type]
        {"pl": vendor},  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        MediaConfig(),
        statuses,  # type: ignore[arg-type]
    )
    for item in await stores.outbox.pending(0, 10):
        await delivery.handle(item)

    assert await stores.outbox.pending(0, 10) == []
    assert vendor.calls == [
        ("create", room, (IDNPS,)),
        ("send", "conv-new", "bonjour", None),
        ("react", "conv-new", "m-2", "👍"),
        ("edit", "conv-new", "m-2", "bonsoir"),
        ("read", "conv-new", "m-2"),
        ("unreact", "conv-new", "m-2", "r-3"),
    ]
    link = await stores.portals.link(room, "pl")
    assert link is not None and link.conversation_id == "conv-new"
    assert await stores.messages.remotes_for("pl", "$m", room_id=room) == ["m-2"]
    assert await stores.messages.remotes_for("pl", "$r", room_id=room) == ["reaction:m-2:r-3"]
    audit = [(r.kind, r.outcome, r.event_id, r.remote_id) for r in await stores.audit.query()]
    assert audit == [
        ("conversation", "delivered", None, None),
        ("text", "delivered", "$m", "m-2"),
        ("reaction", "delivered", "$r", "reaction:m-2:r-3"),
        ("edit", "delivered", "$e", None),
        ("read", "delivered", "$m", None),
        ("deletion", "delivered", "$d", None),
    ]
    assert statuses.reports == [] and statuses.notices == []
